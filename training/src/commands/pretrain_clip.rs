//! `rl4pix-train pretrain-clip`: train the small CLIP used for CLIP-T on the synthetic world.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;

use super::CadenceArgs;
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
    /// Learning-rate warm-up steps.
    #[arg(long, default_value_t = 100)]
    pub warmup: usize,
    /// Vision patch side in pixels (must divide --size).
    #[arg(long, default_value_t = 4)]
    pub patch: usize,
    /// Width of both towers.
    #[arg(long, default_value_t = 64)]
    pub hidden: usize,
    /// Transformer layers of each tower.
    #[arg(long, default_value_t = 2)]
    pub layers: usize,
    /// Attention heads (must divide --hidden).
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    /// Width of the shared embedding space.
    #[arg(long, default_value_t = 64)]
    pub projection: usize,
    /// Near-miss descriptions per pair (one attribute off, false of the image) added as negatives.
    #[arg(long, default_value_t = 1)]
    pub hard_negatives: usize,
    #[command(flatten)]
    pub cadence: CadenceArgs,
}

pub fn run(args: PretrainClipArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.patch > 0 && (args.size as usize).is_multiple_of(args.patch),
        "--patch {} must divide --size {}",
        args.patch,
        args.size
    );
    anyhow::ensure!(
        args.heads > 0 && args.hidden.is_multiple_of(args.heads),
        "--heads {} must divide --hidden {}",
        args.heads,
        args.hidden
    );
    anyhow::ensure!(
        args.layers > 0 && args.projection > 0 && args.batch > 1 && args.steps > 0,
        "--layers, --projection and --steps must be at least 1 and --batch at least 2"
    );
    anyhow::ensure!(
        args.lr.is_finite() && args.lr > 0.0,
        "--lr must be a positive number"
    );
    let run = ClipRun {
        run_dir: args.out.clone(),
        config: ClipTrainConfig {
            size: args.size,
            seed: args.seed,
            steps: args.steps,
            batch: args.batch,
            lr: args.lr,
            warmup: args.warmup,
            patch: args.patch,
            hidden: args.hidden,
            layers: args.layers,
            heads: args.heads,
            projection: args.projection,
            hard_negatives: args.hard_negatives,
            ..ClipTrainConfig::default()
        },
        resume: args.resume,
        cadence: args.cadence.into(),
        device: Device::Cpu,
    };
    let summary = train(&run).context("pretrain-clip")?;
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).context("summary")?
    );
    Ok(())
}
