//! What makes `reproduce` resumable: synthetic sets kept when their parameters match, DDPO runs
//! continued from their latest checkpoint (a finished one kept), and evaluations read back when
//! their inputs (model, adapter bytes, test set, sampler, CLIP) are unchanged. Anything in the run
//! folder made with other parameters is refused, never overwritten.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use rl4pix_model::pipeline::InstructPix2Pix;
use rl4pix_model::scheduler::SchedulerKind;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use super::spec::{SamplerSpec, SynthSpec};
use super::table::RunSummary;
use crate::data::Dataset;
use crate::ddpo::audit::reward_formula;
use crate::ddpo::config::flatten;
use crate::ddpo::prompts::load_prompts;
use crate::ddpo::trainer::{list_checkpoints, BEST_DIR, CHECKPOINTS_DIR, LOG_FILE};
use crate::ddpo::{DdpoConfig, EpochLog, Trainer};
use crate::eval::{evaluate, Baseline, EvalReport, ModelImages, SamplerSettings};
use crate::metrics::ClipScorer;
use crate::synth::{write_folder, SynthWorld};

/// Written next to a synthetic folder: what it holds, so a rerun can keep it.
const SYNTH_MANIFEST: &str = "rl4pix_synth.json";
/// Written into a DDPO run folder once its adapter is saved.
const RUN_DONE_FILE: &str = "done.json";
const RUN_ADAPTER_FILE: &str = "adapter.safetensors";

#[derive(Debug, Serialize, Deserialize)]
struct SynthManifest {
    #[serde(flatten)]
    spec: SynthSpec,
    /// False while the folder is being written: a rerun then writes it again.
    complete: bool,
}

pub fn write_text(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

/// Writes the synthetic set `spec` into `dir` unless a complete one with the same parameters is
/// already there. A folder holding anything else is refused rather than overwritten.
pub fn ensure_synth(dir: &Path, spec: &SynthSpec, threads: usize) -> anyhow::Result<()> {
    let manifest_path = dir.join(SYNTH_MANIFEST);
    if manifest_path.is_file() {
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?;
        let manifest: SynthManifest = serde_json::from_str(&text).with_context(|| {
            format!("{}: not a synthetic set manifest", manifest_path.display())
        })?;
        if manifest.spec != *spec {
            bail!(
                "{} holds a synthetic set with seed {}, {} sessions, size {} (asked: seed {}, {} sessions, size {}): choose another --out or remove it",
                dir.display(),
                manifest.spec.seed,
                manifest.spec.count,
                manifest.spec.size,
                spec.seed,
                spec.count,
                spec.size
            );
        }
        if manifest.complete && dir.join(crate::data::SESSIONS_FILE).is_file() {
            tracing::info!(dir = %dir.display(), "synthetic set already there: kept");
            return Ok(());
        }
    } else if dir.is_dir()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty and was not written by `reproduce` (no {SYNTH_MANIFEST}): choose another --out",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write_manifest = |complete: bool| -> anyhow::Result<()> {
        let manifest = SynthManifest {
            spec: spec.clone(),
            complete,
        };
        write_text(
            &manifest_path,
            &(serde_json::to_string_pretty(&manifest)? + "\n"),
        )
    };
    write_manifest(false)?;
    let started = std::time::Instant::now();
    let world = SynthWorld::new(spec.size, spec.seed);
    let summary = write_folder(&world, dir, spec.count, threads, &|| {})
        .with_context(|| format!("writing the synthetic set {}", dir.display()))?;
    write_manifest(true)?;
    tracing::info!(
        dir = %dir.display(),
        sessions = summary.sessions,
        turns = summary.turns,
        seed = spec.seed,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "synthetic set written"
    );
    Ok(())
}

/// The configuration keys a run's identity depends on: all but its length, checkpointing and
/// folder, which may change between reruns.
fn comparable_config(config: &Value) -> Vec<(String, Value)> {
    let mut flat = Vec::new();
    flatten(config, "", &mut flat);
    flat.retain(|(key, _)| {
        !matches!(
            key.as_str(),
            "num_epochs" | "save_freq" | "num_checkpoint_limit" | "logdir" | "resume_from"
        )
    });
    flat
}

/// Refuses to continue a run that was started with another configuration.
fn check_same_config(run_dir: &Path, config: &DdpoConfig) -> anyhow::Result<()> {
    let path = run_dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let saved: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let saved = comparable_config(&saved);
    let now = comparable_config(&config.to_json());
    let differences: Vec<String> = now
        .iter()
        .filter_map(|(key, value)| {
            let before = saved.iter().find(|(k, _)| k == key).map(|(_, v)| v);
            (before != Some(value)).then(|| {
                format!(
                    "{key}: {} before, {value} now",
                    before.map_or("absent".to_string(), |v| v.to_string())
                )
            })
        })
        .collect();
    if !differences.is_empty() {
        bail!(
            "{} was trained with another configuration ({}): choose another --out, or remove the run to start it again",
            run_dir.display(),
            differences.join("; ")
        );
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
struct RunDone {
    epochs: usize,
}

/// Trains (or continues, or keeps) the run in `config.logdir` and summarizes it.
pub fn train_variant(
    pipeline: &InstructPix2Pix,
    name: &str,
    config: &DdpoConfig,
    world_dir: &Path,
    progress: bool,
) -> anyhow::Result<RunSummary> {
    let run_dir = PathBuf::from(&config.logdir);
    let adapter_path = run_dir.join(RUN_ADAPTER_FILE);
    let done_path = run_dir.join(RUN_DONE_FILE);
    check_same_config(&run_dir, config)?;
    let done: Option<RunDone> = std::fs::read_to_string(&done_path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    let finished = done.is_some_and(|d| d.epochs == config.num_epochs) && adapter_path.is_file();
    if finished {
        tracing::info!(run = %run_dir.display(), epochs = config.num_epochs, "DDPO run already finished: kept");
    } else {
        let prompts = load_prompts(world_dir, &config.data, pipeline.vae_scale_factor() as u32)?;
        let mut trainer = Trainer::new(pipeline, config.clone(), prompts)?;
        if !config.validation.dataset.is_empty() {
            let data = crate::ddpo::config::DataConfig {
                max_prompts: config.validation.max_turns,
                ..config.data.clone()
            };
            let validation = load_prompts(
                Path::new(&config.validation.dataset),
                &data,
                pipeline.vae_scale_factor() as u32,
            )?;
            trainer.set_validation(validation)?;
        }
        let checkpoints = run_dir.join(CHECKPOINTS_DIR);
        if checkpoints.is_dir() && !list_checkpoints(&checkpoints)?.is_empty() {
            trainer.resume(&run_dir)?;
            let epochs = trainer.epochs_completed();
            if epochs > config.num_epochs {
                bail!(
                    "{} already holds {epochs} epochs, more than num_epochs = {}: raise num_epochs or choose another --out",
                    run_dir.display(),
                    config.num_epochs
                );
            }
            tracing::info!(run = %run_dir.display(), epoch = epochs, "DDPO run resumed");
        } else {
            tracing::info!(run = %run_dir.display(), reward = name, "DDPO run started");
        }
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        write_text(
            &run_dir.join("config.json"),
            &(serde_json::to_string_pretty(&config.to_json())? + "\n"),
        )?;
        // A stale marker must not survive a run that is being extended.
        if done_path.exists() {
            std::fs::remove_file(&done_path)
                .with_context(|| format!("removing {}", done_path.display()))?;
        }
        trainer.run(progress)?;
        let partial = run_dir.join(format!("{RUN_ADAPTER_FILE}.partial"));
        trainer.adapter(name)?.save(&partial)?;
        std::fs::rename(&partial, &adapter_path)
            .with_context(|| format!("writing {}", adapter_path.display()))?;
        write_text(
            &done_path,
            &(serde_json::to_string(&RunDone {
                epochs: config.num_epochs,
            })? + "\n"),
        )?;
    }
    let history = read_history(&run_dir.join(LOG_FILE))?;
    let (first, last) = first_last_tenth(&history, |l| l.reward_mean);
    let (l1_first, l1_last) = first_last_tenth(&history, |l| l.oracle_l1_mean);
    let best = run_dir.join(BEST_DIR).join(RUN_ADAPTER_FILE);
    let selected_epoch = std::fs::read_to_string(run_dir.join(BEST_DIR).join("validation.json"))
        .ok()
        .and_then(|t| serde_json::from_str::<Value>(&t).ok())
        .and_then(|v| v["epoch"].as_u64())
        .map(|e| e as usize);
    // Epoch 0 is the base itself (a zero adapter): when no epoch beat it on the validation world,
    // the last adapter is evaluated instead, to show what training did.
    let selected_epoch = selected_epoch.filter(|&e| e > 0);
    let adapter = if best.is_file() && selected_epoch.is_some() {
        best
    } else {
        adapter_path
    };
    Ok(RunSummary {
        name: name.to_string(),
        run_dir,
        adapter,
        reward: reward_formula(&config.reward),
        epochs: history.len(),
        selected_epoch,
        reward_first_tenth: first,
        reward_last_tenth: last,
        train_l1_first_tenth: l1_first,
        train_l1_last_tenth: l1_last,
        seconds_per_epoch: mean(history.iter().map(|l| l.seconds)),
    })
}

fn read_history(path: &Path) -> anyhow::Result<Vec<EpochLog>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not an epoch log", path.display(), i + 1))
        })
        .collect()
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, count) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (count > 0).then(|| sum / count as f64)
}

/// Mean of `value` over the first and the last tenth of the epochs (at least one each), as the
/// adapter's `rl4pix.reward_summary` counts them.
pub fn first_last_tenth(
    history: &[EpochLog],
    value: fn(&EpochLog) -> f64,
) -> (Option<f64>, Option<f64>) {
    let n = history.len();
    let tenth = (n / 10).max(1).min(n);
    (
        mean(history[..tenth].iter().map(value)),
        mean(history[n - tenth..].iter().map(value)),
    )
}

/// One test set's evaluation context: every row of it sampled alike.
pub struct EvalContext {
    pub out: PathBuf,
    pub test_dir: PathBuf,
    pub test_spec: SynthSpec,
    pub model_dir: PathBuf,
    pub fingerprint: String,
    pub sampler: SamplerSpec,
    pub clip: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CachedEval {
    key: Value,
    report: EvalReport,
}

/// FNV-1a of a file's bytes: enough to notice that an adapter changed.
fn file_fnv1a(path: &Path) -> anyhow::Result<u64> {
    use std::hash::Hasher;
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hash = fnv::FnvHasher::default();
    hash.write(&bytes);
    Ok(hash.finish())
}

impl EvalContext {
    /// The base (`adapter` None, name `base`), an adapter, or the identity baseline (name
    /// `identity`) evaluated on the test set through the eval library; read back from
    /// `<out>/<name>.json` when its inputs are unchanged.
    pub fn evaluate(&self, name: &str, adapter: Option<&Path>) -> anyhow::Result<EvalReport> {
        let identity = name == "identity";
        let adapter_hash = match adapter {
            Some(path) => Some(format!("{:016x}", file_fnv1a(path)?)),
            None => None,
        };
        let key = json!({
            "test_set": self.test_spec,
            "clip": self.clip.as_ref().map(|p| p.display().to_string()),
            "model": (!identity).then(|| json!({
                "dir": self.model_dir.display().to_string(),
                "fingerprint": self.fingerprint,
                "adapter_fnv1a": adapter_hash,
                "sampler": self.sampler,
            })),
        });
        let cache = self.out.join(format!("{name}.json"));
        if let Ok(text) = std::fs::read_to_string(&cache) {
            if let Ok(cached) = serde_json::from_str::<CachedEval>(&text) {
                if cached.key == key {
                    tracing::info!(row = name, "evaluation unchanged: read back");
                    return Ok(cached.report);
                }
            }
        }
        tracing::info!(row = name, test_set = %self.test_dir.display(), "evaluating");
        let started = std::time::Instant::now();
        let dataset = Dataset::open(&self.test_dir, None)
            .with_context(|| format!("opening {}", self.test_dir.display()))?;
        let device = Device::Cpu;
        let clip = match &self.clip {
            Some(dir) => Some(
                ClipScorer::load(dir, &device)
                    .with_context(|| format!("loading CLIP model {}", dir.display()))?,
            ),
            None => None,
        };
        let report = if identity {
            evaluate(
                &dataset,
                &mut Baseline::Identity,
                clip.as_ref(),
                None,
                &mut |_| {},
            )?
        } else {
            let model = InstructPix2Pix::load(&self.model_dir, &device)
                .with_context(|| format!("loading model {}", self.model_dir.display()))?;
            let adapters = match adapter {
                Some(path) => vec![model
                    .load_adapter(path)
                    .with_context(|| format!("loading adapter {}", path.display()))?],
                None => Vec::new(),
            };
            let scheduler = match self.sampler.scheduler.as_deref() {
                Some(name) => Some(SchedulerKind::from_cli_name(name)?),
                None => None,
            };
            let settings = SamplerSettings {
                steps: self.sampler.steps,
                scheduler,
                eta: self.sampler.eta,
                guidance_scale: Some(self.sampler.guidance_scale),
                image_guidance_scale: Some(self.sampler.image_guidance_scale),
                seed: self.sampler.seed,
            };
            let mut images = ModelImages::new(
                model,
                adapters,
                &settings,
                self.out.join(name).join("generated"),
            )
            .map_err(|e| anyhow::anyhow!("evaluating `{name}`: {}", e.0))?;
            evaluate(&dataset, &mut images, clip.as_ref(), None, &mut |_| {})
                .with_context(|| format!("evaluating `{name}`"))?
        };
        tracing::info!(
            row = name,
            seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
            "evaluated"
        );
        let cached = CachedEval {
            key,
            report: report.clone(),
        };
        write_text(&cache, &(serde_json::to_string_pretty(&cached)? + "\n"))?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenths_follow_the_reward_summary() {
        let log = |epoch: usize, reward: f64| EpochLog {
            epoch,
            reward_mean: reward,
            reward_std: 0.0,
            attention_mean: 0.0,
            clip_mean: 0.0,
            mae_mean: 0.0,
            localization_mean: 0.0,
            outside_mean: 0.0,
            oracle_l1_mean: reward / 10.0,
            within_group_std: None,
            approx_kl: 0.0,
            kl_to_base: None,
            clip_fraction: 0.0,
            loss: 0.0,
            grad_norm: 0.0,
            step_grad_norms: Vec::new(),
            lr: 0.0,
            seconds: 1.0,
            sample_seconds: 0.0,
            train_seconds: 0.0,
            samples: 1,
            optimizer_steps: 1,
        };
        let history: Vec<EpochLog> = (1..=20).map(|e| log(e, e as f64)).collect();
        assert_eq!(
            first_last_tenth(&history, |l| l.reward_mean),
            (Some(1.5), Some(19.5))
        );
        let (first, last) = first_last_tenth(&history, |l| l.oracle_l1_mean);
        assert!((first.unwrap() - 0.15).abs() < 1e-12 && (last.unwrap() - 1.95).abs() < 1e-12);
        assert_eq!(
            first_last_tenth(&history[..3], |l| l.reward_mean),
            (Some(1.0), Some(3.0))
        );
        assert_eq!(first_last_tenth(&[], |l| l.reward_mean), (None, None));
    }
}
