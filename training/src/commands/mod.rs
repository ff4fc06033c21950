//! One module per `rl4pix-train` subcommand: its clap arguments and its `run`.

pub mod ddpo;
pub mod edit;
pub mod eval;
pub mod pretrain;
pub mod pretrain_clip;
pub mod pretrain_vae;
pub mod reproduce;
pub mod reward_audit;
pub mod synth;

use std::path::PathBuf;

use rl4pix_model::pipeline::{EditParams, InstructPix2Pix};
use rl4pix_model::scheduler::SchedulerKind;

use crate::ddpo::DdpoConfig;
use crate::pretrain::Cadence;

/// The DDPO configuration keys a command takes over its `--preset`.
#[derive(clap::Args, Debug)]
pub struct DdpoOverrides {
    /// TOML file of DDPO config keys (e.g. `[train]\nlearning_rate = 2e-4`), applied over the
    /// preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// DDPO `key=value` override, repeatable, applied last (e.g. `--set sample.num_steps=10`).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
}

impl DdpoOverrides {
    /// The preset with the config file and then the `--set` overrides applied.
    pub fn build(&self, preset: &str) -> anyhow::Result<DdpoConfig> {
        Ok(DdpoConfig::build(
            preset,
            self.config.as_deref(),
            &self.sets,
        )?)
    }
}

/// Classifier-free guidance flags; what is not given comes from the model.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct GuidanceArgs {
    /// Text guidance scale (default: the model's own, `model_index.json` → `rl4pix.sampling`,
    /// else 7.5).
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Image guidance scale (default: the model's own, else 1.5).
    #[arg(long)]
    pub image_guidance_scale: Option<f64>,
}

impl GuidanceArgs {
    /// `model`'s default edit parameters with these guidance scales.
    pub fn params(&self, model: &InstructPix2Pix) -> EditParams {
        model.params_with_guidance(self.guidance_scale, self.image_guidance_scale)
    }
}

/// How a model samples: scheduler, DDIM's eta and guidance.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct SamplerArgs {
    /// ddim or euler-ancestral (default: the model's own scheduler).
    #[arg(long, value_parser = edit::parse_scheduler)]
    pub scheduler: Option<SchedulerKind>,
    /// DDIM's eta (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    #[command(flatten)]
    pub guidance: GuidanceArgs,
}

/// How often a pretraining run checkpoints, logs and evaluates.
#[derive(clap::Args, Debug, Clone, Copy)]
pub struct CadenceArgs {
    #[arg(long, default_value_t = 250)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    #[arg(long, default_value_t = 250)]
    pub eval_every: usize,
}

impl From<CadenceArgs> for Cadence {
    fn from(args: CadenceArgs) -> Self {
        Cadence {
            checkpoint_every: args.checkpoint_every,
            log_every: args.log_every,
            eval_every: args.eval_every,
        }
    }
}

/// Applies `--threads`: candle's and gemm's thread pools read RAYON_NUM_THREADS once, when they
/// start, so this must run before any tensor exists.
pub fn set_tensor_threads(threads: Option<usize>) -> anyhow::Result<()> {
    if let Some(threads) = threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    Ok(())
}
