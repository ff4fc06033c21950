//! `rl4pix-train pretrain-clip`: train the small CLIP used for CLIP-T on the synthetic world.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;

use crate::pretrain::clip::{train, ClipRun, ClipTrainConfig};

#[derive(clap::Args, Debug)]
pub struct PretrainClipArgs {
    /// Run folder: checkpoints, JSONL log, loss curve, and the trained `clip/` (a transformers
    /// CLIPModel folder, for `eval --clip`).
    #[arg(long, default_value = "runs/pretrain/clip")]
    pub out: PathBuf,
    /// Continue from a checkpoint folder, or from the newest checkpoint of a run folder.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub size: u32,
    /// Seed of the training stream.
    #[arg(long, default_value_t = 5)]
    pub seed: u64,
    #[arg(long, default_value_t = 1500)]
    pub steps: usize,
    #[arg(long, default_value_t = 64)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 250)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = 10)]
    pub log_every: usize,
    #[arg(long, default_value_t = 250)]
    pub eval_every: usize,
}

pub fn run(args: PretrainClipArgs) -> anyhow::Result<()> {
    let run = ClipRun {
        run_dir: args.out.clone(),
        config: ClipTrainConfig {
            size: args.size,
            seed: args.seed,
            steps: args.steps,
            batch: args.batch,
            lr: args.lr,
            ..ClipTrainConfig::default()
        },
        resume: args.resume,
        checkpoint_every: args.checkpoint_every,
        log_every: args.log_every,
        eval_every: args.eval_every,
        device: Device::Cpu,
    };
    let summary = train(&run).context("pretrain-clip")?;
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).context("summary")?
    );
    Ok(())
}
