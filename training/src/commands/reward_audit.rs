//! `rl4pix-train reward-audit`: which reward terms can teach the policy anything? Samples K edits
//! of each turn with the base model (the DDPO policy's sampler) and reports each term's spread
//! within and between turns, its rank correlation with -L1 to the target, and the best-of-K
//! sample it picks against the mean sample and the oracle (`ddpo::audit`).

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use rl4pix_model::pipeline::InstructPix2Pix;

use super::DdpoOverrides;
use crate::ddpo::audit::audit;
use crate::ddpo::prompts::load_prompts;

#[derive(clap::Args, Debug)]
pub struct RewardAuditArgs {
    /// Model folder in the diffusers layout (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// MagicBrush-format data set with masks and targets (e.g. a `synth` folder).
    #[arg(long)]
    pub dataset: PathBuf,
    /// Turns audited (the first N with a mask).
    #[arg(long, default_value_t = 48)]
    pub turns: usize,
    /// Samples per turn (K).
    #[arg(long, default_value_t = 8)]
    pub samples: usize,
    /// DDPO configuration whose sampler and reward weights are audited (as `ddpo` reads it).
    #[arg(long, default_value = "group")]
    pub preset: String,
    #[command(flatten)]
    pub overrides: DdpoOverrides,
    /// Base of the samples' seeds.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the markdown table here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// CPU threads for tensor work (sets RAYON_NUM_THREADS).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(args: RewardAuditArgs) -> anyhow::Result<()> {
    super::set_tensor_threads(args.threads)?;
    anyhow::ensure!(args.turns > 0, "--turns must be at least 1");
    anyhow::ensure!(args.samples >= 2, "--samples must be at least 2");
    let config = args.overrides.build(&args.preset)?;
    let model_dir = crate::commands::edit::resolve_model_dir(args.model)?;
    let pipeline = InstructPix2Pix::load(&model_dir, &Device::Cpu)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    let data = crate::ddpo::config::DataConfig {
        max_prompts: args.turns,
        ..config.data.clone()
    };
    let prompts = load_prompts(&args.dataset, &data, pipeline.vae_scale_factor() as u32)?;
    let report = audit(
        &pipeline,
        &config,
        &prompts,
        args.samples,
        args.seed,
        |done, all| {
            tracing::debug!(done, all, "audit samples");
        },
    )?;
    let markdown = report.to_markdown();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.markdown {
        std::fs::write(path, &markdown).with_context(|| format!("writing {}", path.display()))?;
    }
    print!("{markdown}");
    Ok(())
}
