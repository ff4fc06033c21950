//! Training checkpoints: `<run>/checkpoints/step-<N>/` holding safetensors files (weights,
//! optimizer moments, EMA weights) and `state.json`, written last, which records the step, the
//! run's state and the byte size of every file. A checkpoint whose files do not have the recorded
//! sizes (cut short by a kill or a full disk) is refused, never half-loaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};

use super::{io_error, read_json, write_json, PretrainError, Result};

const STATE_FILE: &str = "state.json";
/// The trained variables' file in a checkpoint.
pub const WEIGHTS_FILE: &str = "weights.safetensors";
/// How many checkpoints a run keeps; older ones are deleted.
const KEEP: usize = 3;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: usize,
    /// The RNG position of the data/noise stream, so a resumed run draws what it would have.
    pub rng_word_pos: u128,
    /// Byte size of each tensor file, as written.
    pub files: HashMap<String, u64>,
    /// The run's configuration, as JSON (checked against the resumed run's).
    pub config: serde_json::Value,
}

pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: CheckpointState,
}

impl Checkpoint {
    /// Loads one tensor file of this checkpoint, onto `device`.
    pub fn tensors(&self, name: &str, device: &Device) -> Result<HashMap<String, Tensor>> {
        let path = self.dir.join(name);
        candle_core::safetensors::load(&path, device).map_err(|e| PretrainError::Checkpoint {
            path: path.clone(),
            message: format!("cannot read tensors: {e}"),
        })
    }

    /// Sets every variable of `varmap` from this checkpoint's weights.
    pub fn load_weights(&self, varmap: &candle_nn::VarMap, device: &Device) -> Result<()> {
        let weights = self.tensors(WEIGHTS_FILE, device)?;
        load_varmap(varmap, &weights, &self.dir.join(WEIGHTS_FILE))
    }
}

pub fn checkpoints_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("checkpoints")
}

/// Writes `tensor_files` (file name -> tensors) and then `state.json` into
/// `<run>/checkpoints/step-<step>/`, and prunes old checkpoints.
pub fn save(
    run_dir: &Path,
    step: usize,
    rng_word_pos: u128,
    config: serde_json::Value,
    tensor_files: &[(&str, HashMap<String, Tensor>)],
) -> Result<PathBuf> {
    let root = checkpoints_dir(run_dir);
    let dir = root.join(format!("step-{step:07}"));
    std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let mut files = HashMap::new();
    for (name, tensors) in tensor_files {
        let path = dir.join(name);
        candle_core::safetensors::save(tensors, &path).map_err(|e| PretrainError::Checkpoint {
            path: path.clone(),
            message: format!("cannot write: {e}"),
        })?;
        let size = std::fs::metadata(&path).map_err(io_error(&path))?.len();
        files.insert(name.to_string(), size);
    }
    let state = CheckpointState {
        step,
        rng_word_pos,
        files,
        config,
    };
    write_json(&dir.join(STATE_FILE), &state)?;
    prune(&root)?;
    Ok(dir)
}

fn step_dirs(root: &Path) -> Result<Vec<(usize, PathBuf)>> {
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut dirs = Vec::new();
    for entry in std::fs::read_dir(root).map_err(io_error(root))? {
        let entry = entry.map_err(io_error(root))?;
        let name = entry.file_name();
        let Some(step) = name
            .to_str()
            .and_then(|n| n.strip_prefix("step-"))
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        dirs.push((step, entry.path()));
    }
    dirs.sort();
    Ok(dirs)
}

fn prune(root: &Path) -> Result<()> {
    let complete: Vec<(usize, PathBuf)> = step_dirs(root)?
        .into_iter()
        .filter(|(_, dir)| dir.join(STATE_FILE).is_file())
        .collect();
    if complete.len() > KEEP {
        for (_, dir) in &complete[..complete.len() - KEEP] {
            std::fs::remove_dir_all(dir).map_err(io_error(dir))?;
        }
    }
    Ok(())
}

/// The newest complete checkpoint of a run, if any (a folder without `state.json` was being
/// written when the run stopped and is skipped).
pub fn latest(run_dir: &Path) -> Result<Option<PathBuf>> {
    Ok(step_dirs(&checkpoints_dir(run_dir))?
        .into_iter()
        .rev()
        .map(|(_, dir)| dir)
        .find(|dir| dir.join(STATE_FILE).is_file()))
}

/// Opens a checkpoint folder and checks that every file it lists is there at its recorded size.
pub fn open(dir: &Path) -> Result<Checkpoint> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.is_file() {
        return Err(PretrainError::Checkpoint {
            path: dir.to_path_buf(),
            message: format!("incomplete: no {STATE_FILE} (it is written last)"),
        });
    }
    let state: CheckpointState = read_json(&state_path).map_err(|e| PretrainError::Checkpoint {
        path: state_path.clone(),
        message: format!("unreadable state: {e}"),
    })?;
    for (name, &expected) in &state.files {
        let path = dir.join(name);
        let actual = std::fs::metadata(&path)
            .map_err(|e| PretrainError::Checkpoint {
                path: path.clone(),
                message: format!("missing: {e}"),
            })?
            .len();
        if actual != expected {
            return Err(PretrainError::Checkpoint {
                path,
                message: format!(
                    "truncated or corrupt: {actual} bytes on disk, {expected} were written"
                ),
            });
        }
    }
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
    })
}

/// Resolves `--resume`: a checkpoint folder, or a run folder (its newest checkpoint).
pub fn resolve(path: &Path) -> Result<Checkpoint> {
    if path.join(STATE_FILE).is_file() {
        return open(path);
    }
    match latest(path)? {
        Some(dir) => open(&dir),
        None => Err(PretrainError::Checkpoint {
            path: path.to_path_buf(),
            message: "neither a checkpoint (state.json) nor a run folder with complete checkpoints"
                .to_string(),
        }),
    }
}

/// Resolves `--resume` and refuses a checkpoint made with another configuration (only the step
/// count may change between the original run and its continuation).
pub fn resolve_same_run(path: &Path, config: &serde_json::Value) -> Result<Checkpoint> {
    let ckpt = resolve(path)?;
    if !same_run(&ckpt.state.config, config) {
        return Err(PretrainError::Checkpoint {
            path: ckpt.dir.clone(),
            message: format!(
                "was made with another configuration: {} (this run: {config})",
                ckpt.state.config
            ),
        });
    }
    Ok(ckpt)
}

/// Sets every variable of `varmap` from `tensors`, refusing a missing or misshapen tensor.
pub fn load_varmap(
    varmap: &candle_nn::VarMap,
    tensors: &HashMap<String, Tensor>,
    file: &Path,
) -> Result<()> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    for (name, var) in data.iter() {
        let saved = tensors.get(name).ok_or_else(|| PretrainError::Checkpoint {
            path: file.to_path_buf(),
            message: format!("no tensor `{name}`"),
        })?;
        if saved.dims() != var.dims() {
            return Err(PretrainError::Checkpoint {
                path: file.to_path_buf(),
                message: format!(
                    "tensor `{name}` has shape {:?}, the model needs {:?}",
                    saved.dims(),
                    var.dims()
                ),
            });
        }
        var.set(&saved.to_dtype(var.dtype())?)?;
    }
    Ok(())
}

/// All variables of a VarMap as plain tensors (for saving).
pub fn varmap_tensors(varmap: &candle_nn::VarMap) -> HashMap<String, Tensor> {
    let data = varmap.data().lock().unwrap_or_else(|e| e.into_inner());
    data.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
        .collect()
}

/// Whether a checkpoint's configuration allows resuming with `current`: every setting equal
/// except the total number of steps, which a run may extend (the schedule stretches to the new
/// total from where it is).
pub fn same_run(saved: &serde_json::Value, current: &serde_json::Value) -> bool {
    let strip = |v: &serde_json::Value| {
        let mut v = v.clone();
        if let Some(map) = v.as_object_mut() {
            map.remove("steps");
        }
        v
    };
    strip(saved) == strip(current)
}
