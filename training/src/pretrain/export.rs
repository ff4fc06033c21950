//! Export of a pretraining run to the diffusers layout the pipeline loads (`model_index.json`,
//! `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), in f16 to keep the shipped
//! model small (the loader upcasts).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use rl4pix_model::pipeline::{GuidanceDefaults, InstructPix2Pix};
use rl4pix_model::scheduler::SchedulerKind;
use serde_json::json;

use super::{checkpoint, io_error, read_json, write_json, PretrainError, Result};

fn save_tensors(tensors: &HashMap<String, Tensor>, dtype: DType, path: &Path) -> Result<()> {
    let converted = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    candle_core::safetensors::save(&converted, path).map_err(|e| PretrainError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot write: {e}"),
    })
}

fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(prefix)
                .map(|rest| (rest.to_string(), v.clone()))
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io_error(to))?;
    for entry in std::fs::read_dir(from).map_err(io_error(from))? {
        let entry = entry.map_err(io_error(from))?;
        if entry.path().is_file() {
            let target = to.join(entry.file_name());
            std::fs::copy(entry.path(), &target).map_err(io_error(&target))?;
        }
    }
    Ok(())
}

/// How [`export_model`] writes the model.
#[derive(Debug, Clone)]
pub struct ExportOptions {
    /// The EMA weights when the checkpoint has them, else the raw ones.
    pub use_ema: bool,
    pub dtype: DType,
    /// Take the VAE from this folder instead of the run's copy (e.g. one whose decoder was
    /// fine-tuned after the UNet was trained; its encoder must be the run's).
    pub vae_source: Option<PathBuf>,
    /// The model's own scheduler class; the run's (Euler ancestral) when absent. The noise
    /// schedule and prediction type are the training run's either way.
    pub scheduler: Option<SchedulerKind>,
    /// Guidance the model recommends for itself (`model_index.json` -> `rl4pix.sampling`).
    pub sampling: Option<GuidanceDefaults>,
}

impl Default for ExportOptions {
    fn default() -> Self {
        Self {
            use_ema: true,
            dtype: DType::F16,
            vae_source: None,
            scheduler: None,
            sampling: None,
        }
    }
}

/// The parts of a diffusers folder the export writes; anything else in `out` (a README, the
/// CLIP, pictures) is left alone.
const PARTS: [&str; 6] = [
    "model_index.json",
    "unet",
    "text_encoder",
    "vae",
    "tokenizer",
    "scheduler",
];

/// Writes the model of a `pretrain` run (its newest checkpoint, or `checkpoint_dir`) to `out`.
///
/// Everything is read and the result loaded back as an editing model in a staging folder beside
/// `out` before `out` is touched, so a missing file, a cut-short checkpoint or a bad guidance
/// value leaves `out` as it was.
pub fn export_model(
    run_dir: &Path,
    checkpoint_dir: Option<&Path>,
    out: &Path,
    options: &ExportOptions,
) -> Result<()> {
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).map_err(io_error(&parent))?;
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "model".into());
    let staging = parent.join(format!(".{name}.export-{}", std::process::id()));
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_error(&staging))?;
    }
    let written = write_model(run_dir, checkpoint_dir, &staging, options).and_then(|()| {
        // Refuse what the loader would refuse, now rather than at serving time.
        InstructPix2Pix::load(&staging, &Device::Cpu)?;
        Ok(())
    });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    for part in PARTS {
        let (from, to) = (staging.join(part), out.join(part));
        if to.is_dir() {
            std::fs::remove_dir_all(&to).map_err(io_error(&to))?;
        } else if to.exists() {
            std::fs::remove_file(&to).map_err(io_error(&to))?;
        }
        std::fs::rename(&from, &to).map_err(io_error(&to))?;
    }
    std::fs::remove_dir_all(&staging).map_err(io_error(&staging))
}

fn write_model(
    run_dir: &Path,
    checkpoint_dir: Option<&Path>,
    out: &Path,
    options: &ExportOptions,
) -> Result<()> {
    let ckpt = match checkpoint_dir {
        Some(dir) => checkpoint::open(dir)?,
        None => checkpoint::resolve(run_dir)?,
    };
    let device = Device::Cpu;
    let use_ema = options.use_ema && ckpt.state.files.contains_key("ema.safetensors");
    let tensors = if use_ema {
        ckpt.tensors("ema.safetensors", &device)?
    } else {
        ckpt.tensors("weights.safetensors", &device)?
    };
    let vae_source = options
        .vae_source
        .clone()
        .unwrap_or_else(|| run_dir.join("vae"));
    let unet_config: serde_json::Value = read_json(&run_dir.join("unet_config.json"))?;
    let text_config: serde_json::Value = read_json(&run_dir.join("text_encoder_config.json"))?;
    let vae_config: serde_json::Value = read_json(&vae_source.join("config.json"))?;
    let vae_weights = vae_source.join("diffusion_pytorch_model.safetensors");
    let vae_tensors = candle_core::safetensors::load(&vae_weights, &device).map_err(|e| {
        PretrainError::Checkpoint {
            path: vae_weights.clone(),
            message: e.to_string(),
        }
    })?;
    let mut scheduler: serde_json::Value = read_json(&run_dir.join("scheduler_config.json"))?;
    if let Some(kind) = options.scheduler {
        scheduler["_class_name"] = json!(kind.class_name());
    }
    // The index names the class the scheduler folder holds.
    let scheduler_class = scheduler["_class_name"].clone();
    let mut rl4pix = json!({
        "trained_steps": ckpt.state.step,
        "ema": use_ema,
        "training_config": ckpt.state.config,
    });
    if let Some(sampling) = &options.sampling {
        rl4pix["sampling"] = serde_json::to_value(sampling).map_err(|e| PretrainError::Json {
            path: out.join("model_index.json"),
            message: e.to_string(),
        })?;
    }

    std::fs::create_dir_all(out).map_err(io_error(out))?;
    write_json(
        &out.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionInstructPix2PixPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", scheduler_class],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "rl4pix": rl4pix,
        }),
    )?;
    let unet_dir = out.join("unet");
    std::fs::create_dir_all(&unet_dir).map_err(io_error(&unet_dir))?;
    write_json(&unet_dir.join("config.json"), &unet_config)?;
    save_tensors(
        &strip_prefix(&tensors, "unet."),
        options.dtype,
        &unet_dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    let text_dir = out.join("text_encoder");
    std::fs::create_dir_all(&text_dir).map_err(io_error(&text_dir))?;
    write_json(&text_dir.join("config.json"), &text_config)?;
    save_tensors(
        &strip_prefix(&tensors, "text_encoder."),
        options.dtype,
        &text_dir.join("model.safetensors"),
    )?;
    let vae_dir = out.join("vae");
    std::fs::create_dir_all(&vae_dir).map_err(io_error(&vae_dir))?;
    write_json(&vae_dir.join("config.json"), &vae_config)?;
    save_tensors(
        &vae_tensors,
        options.dtype,
        &vae_dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    copy_dir(&run_dir.join("tokenizer"), &out.join("tokenizer"))?;
    let scheduler_dir = out.join("scheduler");
    std::fs::create_dir_all(&scheduler_dir).map_err(io_error(&scheduler_dir))?;
    write_json(&scheduler_dir.join("scheduler_config.json"), &scheduler)?;
    Ok(())
}
