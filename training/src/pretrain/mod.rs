//! Pretraining of the embedded default ("toy") model on the synthetic world: the VAE
//! ([`vae`]), the InstructPix2Pix UNet with its text encoder ([`unet`]) and a small CLIP for
//! CLIP-T ([`clip`]); plus what they share: checkpoints with resume, AdamW with saved state, the
//! learning-rate schedule, EMA weights, the JSONL log and the loss-curve plot.

pub mod checkpoint;
pub mod clip;
pub mod data;
pub mod export;
pub mod grid;
pub mod init;
pub mod log;
pub mod schedule;
pub mod text;
pub mod unet;
pub mod vae;

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum PretrainError {
    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },

    // The cause is in the message, not also a `source()`: error chains print each link once.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{}: {message}", path.display())]
    Json { path: PathBuf, message: String },

    #[error("{0}")]
    Config(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    #[error(transparent)]
    Model(#[from] rl4pix_model::ModelError),

    #[error("plot {}: {message}", path.display())]
    Plot { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, PretrainError>;

impl From<crate::optim::OptimError> for PretrainError {
    fn from(e: crate::optim::OptimError) -> Self {
        use crate::optim::OptimError;
        match e {
            OptimError::NonFiniteGradient { norm, step } => PretrainError::Config(format!(
                "gradient norm is {norm} at step {step}: training diverged (lower the learning rate)"
            )),
            OptimError::State(message) => PretrainError::Config(message),
            OptimError::Candle(e) => PretrainError::Candle(e),
        }
    }
}

pub(crate) fn io_error(
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> PretrainError + '_ {
    move |source| PretrainError::Io {
        path: path.to_path_buf(),
        cause: source,
    }
}

pub(crate) fn read_json<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    serde_json::from_str(&text).map_err(|e| PretrainError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

pub(crate) fn write_json<T: serde::Serialize>(path: &std::path::Path, value: &T) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|e| PretrainError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    rl4pix_model::atomic_file::write(path, (text + "\n").as_bytes()).map_err(io_error(path))
}

/// What a training loop needs besides its step function.
pub struct LoopSpec<'a> {
    pub run_dir: &'a std::path::Path,
    pub label: &'a str,
    /// Also fixes the run's length (`schedule.total_steps`).
    pub schedule: schedule::LrSchedule,
    pub cadence: Cadence,
    pub max_grad_norm: Option<f64>,
    /// The run's configuration, stored in every checkpoint.
    pub config: serde_json::Value,
    /// End this invocation after this step (checkpointed) without ending the run: the schedule
    /// still spans `schedule.total_steps`, and `--resume` carries on from here.
    pub stop_after: Option<usize>,
}

/// How often a run logs, evaluates and checkpoints (the `--*-every` flags).
#[derive(Debug, Clone, Copy)]
pub struct Cadence {
    pub checkpoint_every: usize,
    pub log_every: usize,
    pub eval_every: usize,
}

impl<'a> LoopSpec<'a> {
    /// The recipe every pretraining run uses: warm-up then cosine to 5% of `lr`, gradient norm
    /// clipped to 1.
    pub fn cosine(
        run_dir: &'a std::path::Path,
        label: &'a str,
        (steps, lr, warmup): (usize, f64, usize),
        cadence: Cadence,
        stop_after: Option<usize>,
        config: serde_json::Value,
    ) -> Self {
        Self {
            run_dir,
            label,
            schedule: schedule::LrSchedule {
                peak: lr,
                warmup_steps: warmup,
                total_steps: steps,
                min_ratio: 0.05,
            },
            cadence,
            max_grad_norm: Some(1.0),
            config,
            stop_after,
        }
    }
}

/// Mutable training state carried through the loop and into checkpoints.
pub struct TrainState<'a> {
    pub varmap: &'a candle_nn::VarMap,
    pub optimizer: &'a mut crate::optim::AdamW,
    pub ema: Option<&'a mut crate::optim::Ema>,
    pub rng: &'a mut rand_chacha::ChaCha8Rng,
    pub start_step: usize,
}

impl<'a> TrainState<'a> {
    /// A fresh run's state: from step 0.
    pub fn new(
        varmap: &'a candle_nn::VarMap,
        optimizer: &'a mut crate::optim::AdamW,
        ema: Option<&'a mut crate::optim::Ema>,
        rng: &'a mut rand_chacha::ChaCha8Rng,
    ) -> Self {
        Self {
            varmap,
            optimizer,
            ema,
            rng,
            start_step: 0,
        }
    }

    /// Takes a run up again from the checkpoint at `resume` (nothing to do without one), which
    /// must be of the run configured as `config`: weights, optimizer moments, EMA weights and
    /// RNG position; the loop goes on from the checkpoint's step.
    pub fn resume_from(
        &mut self,
        label: &str,
        resume: Option<&std::path::Path>,
        config: &serde_json::Value,
        device: &candle_core::Device,
    ) -> Result<()> {
        let Some(resume) = resume else {
            return Ok(());
        };
        let ckpt = checkpoint::resolve_same_run(resume, config)?;
        ckpt.load_weights(self.varmap, device)?;
        self.optimizer.load_state(
            &ckpt.tensors("optimizer.safetensors", device)?,
            ckpt.state.step,
        )?;
        if let Some(ema) = self.ema.as_deref_mut() {
            ema.load(&ckpt.tensors("ema.safetensors", device)?)?;
        }
        self.rng.set_word_pos(ckpt.state.rng_word_pos);
        self.start_step = ckpt.state.step;
        tracing::info!(
            "{label}: resumed from {} at step {}",
            ckpt.dir.display(),
            self.start_step
        );
        Ok(())
    }
}

/// A run's configuration as JSON, as its checkpoints store it.
pub(crate) fn config_json(
    label: &str,
    config: &impl serde::Serialize,
) -> Result<serde_json::Value> {
    serde_json::to_value(config).map_err(|e| PretrainError::Config(format!("{label} config: {e}")))
}

/// Result of a loop: the mean loss of its last tenth.
pub struct LoopSummary {
    pub final_loss: f64,
    /// Steps run by this invocation.
    pub steps: usize,
    /// The step the run stands at now (below the schedule's length after `stop_after`).
    pub reached: usize,
    pub seconds: f64,
}

impl LoopSummary {
    pub fn steps_per_second(&self) -> f64 {
        self.steps as f64 / self.seconds.max(1e-9)
    }
}

/// One batch's mean loss and the gradients of it.
pub struct StepGrads {
    pub loss: f64,
    pub grads: candle_core::backprop::GradStore,
}

/// The gradients of a scalar loss.
pub fn backprop(loss: &candle_core::Tensor) -> Result<StepGrads> {
    Ok(StepGrads {
        loss: loss.to_scalar::<f32>()? as f64,
        grads: loss.backward()?,
    })
}

/// Runs steps `start_step..total_steps`: learning rate from the schedule, `step` computes the
/// loss of one batch (drawing from the RNG) and its gradients, clipped AdamW update, EMA; logs every
/// `log_every` steps, runs `eval` every `eval_every`, checkpoints every `checkpoint_every` and at
/// the end, and redraws the loss curve at each checkpoint.
pub fn train_loop(
    spec: &LoopSpec,
    state: TrainState,
    mut step: impl FnMut(&mut rand_chacha::ChaCha8Rng) -> Result<StepGrads>,
    mut eval: impl FnMut(usize) -> Result<serde_json::Value>,
) -> Result<LoopSummary> {
    use indicatif::{ProgressBar, ProgressStyle};

    let TrainState {
        varmap,
        optimizer,
        mut ema,
        rng,
        start_step,
    } = state;
    std::fs::create_dir_all(spec.run_dir).map_err(io_error(spec.run_dir))?;
    let log_path = spec.run_dir.join(format!("{}.log.jsonl", spec.label));
    let plot_path = spec.run_dir.join(format!("{}.loss.png", spec.label));
    let mut log = log::JsonlLog::resume_at(&log_path, start_step)?;
    let bar = ProgressBar::new(spec.schedule.total_steps as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{prefix} [{elapsed_precise}] {wide_bar} {pos}/{len} {per_sec} eta {eta} loss {msg}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_prefix(spec.label.to_string());
    bar.set_position(start_step as u64);
    let started = std::time::Instant::now();
    let mut window = Vec::new();
    let mut recent = std::collections::VecDeque::new();
    let save = |step: usize,
                optimizer: &crate::optim::AdamW,
                ema: Option<&crate::optim::Ema>,
                rng: &rand_chacha::ChaCha8Rng|
     -> Result<()> {
        let mut files = vec![
            (checkpoint::WEIGHTS_FILE, checkpoint::varmap_tensors(varmap)),
            ("optimizer.safetensors", optimizer.state()),
        ];
        if let Some(ema) = ema {
            files.push(("ema.safetensors", ema.tensors()));
        }
        let dir = checkpoint::save(
            spec.run_dir,
            step,
            rng.get_word_pos(),
            spec.config.clone(),
            &files,
        )?;
        tracing::info!("{}: checkpoint {}", spec.label, dir.display());
        if let Ok(records) = log::read_log(&log_path) {
            let points: Vec<(f64, f64)> = records.iter().map(|r| (r.step as f64, r.loss)).collect();
            let chart = crate::plots::ChartSpec {
                x_label: "step",
                y_label: "loss",
                log_y: true,
                window: 20,
            };
            let _ = crate::plots::line_chart(&plot_path, &chart, &points, &[]);
        }
        Ok(())
    };
    let end = spec.stop_after.map_or(spec.schedule.total_steps, |stop| {
        stop.min(spec.schedule.total_steps)
    });
    for at in start_step..end {
        let lr = spec.schedule.at(at);
        optimizer.set_lr(lr);
        let StepGrads {
            loss: loss_value,
            grads,
        } = step(rng)?;
        let grads = optimizer.gradients_in(&grads);
        let grad_norm = optimizer.step(&grads, spec.max_grad_norm)?;
        if let Some(ema) = ema.as_deref_mut() {
            ema.update(at)?;
        }
        window.push(loss_value);
        recent.push_back(loss_value);
        if recent.len() > 100 {
            recent.pop_front();
        }
        let done = at + 1;
        bar.set_position(done as u64);
        bar.set_message(format!(
            "{:.4}",
            recent.iter().sum::<f64>() / recent.len() as f64
        ));
        let eval_now = spec.cadence.eval_every > 0
            && (done % spec.cadence.eval_every == 0 || done == spec.schedule.total_steps);
        if done % spec.cadence.log_every.max(1) == 0 || eval_now {
            let mean = window.iter().sum::<f64>() / window.len().max(1) as f64;
            window.clear();
            let eval_value = if eval_now { Some(eval(done)?) } else { None };
            if let Some(value) = &eval_value {
                tracing::info!("{} step {done}: loss {mean:.5} eval {value}", spec.label);
            }
            log.write(&log::LogRecord {
                step: done,
                loss: mean,
                lr: Some(lr),
                grad_norm: Some(grad_norm),
                elapsed_s: Some(started.elapsed().as_secs_f64()),
                eval: eval_value,
            })?;
        }
        if done % spec.cadence.checkpoint_every.max(1) == 0 || done == end {
            save(done, optimizer, ema.as_deref(), rng)?;
        }
    }
    bar.finish();
    let tail = recent.len().div_ceil(10).max(1).min(recent.len().max(1));
    let final_loss = if recent.is_empty() {
        f64::NAN
    } else {
        recent.iter().rev().take(tail).sum::<f64>() / tail as f64
    };
    Ok(LoopSummary {
        final_loss,
        steps: end.saturating_sub(start_step),
        reached: end.max(start_step),
        seconds: started.elapsed().as_secs_f64(),
    })
}
