//! `rl4pix-train pretrain-vae`: train the toy model's VAE on the synthetic world.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;

use crate::pretrain::vae::{train, VaeRun, VaeTrainConfig, DEFAULT_CADENCE};
use crate::pretrain::Cadence;

#[derive(clap::Args, Debug, Clone)]
pub struct PretrainVaeArgs {
    /// Run folder: checkpoints, JSONL log, loss curve, and the trained `vae/`.
    #[arg(long, default_value = "runs/pretrain/vae")]
    pub out: PathBuf,
    /// Continue from a checkpoint folder, or from the newest checkpoint of a run folder.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub size: u32,
    /// Seed of the training stream (scenes and noise).
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    #[arg(long, default_value_t = 900)]
    pub steps: usize,
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    #[arg(long, default_value_t = 50)]
    pub warmup: usize,
    /// Channels per level; levels - 1 halvings of the image side.
    #[arg(long, value_delimiter = ',', default_value = "16,32,64")]
    pub channels: Vec<usize>,
    #[arg(long, default_value_t = 8)]
    pub norm_groups: usize,
    /// Fine-tune only the decoder of this trained VAE folder (keeps its latent space, so a UNet
    /// trained on it stays valid).
    #[arg(long)]
    pub decoder_from: Option<PathBuf>,
    #[arg(long, default_value_t = DEFAULT_CADENCE.checkpoint_every)]
    pub checkpoint_every: usize,
    #[arg(long, default_value_t = DEFAULT_CADENCE.log_every)]
    pub log_every: usize,
    #[arg(long, default_value_t = DEFAULT_CADENCE.eval_every)]
    pub eval_every: usize,
    /// End this invocation after step N (checkpointed, not exported) without ending the run:
    /// the learning-rate schedule still spans --steps and `--resume` carries on.
    #[arg(long)]
    pub stop_after: Option<usize>,
}

impl PretrainVaeArgs {
    pub fn to_run(&self) -> VaeRun {
        VaeRun {
            run_dir: self.out.clone(),
            config: VaeTrainConfig {
                size: self.size,
                seed: self.seed,
                steps: self.steps,
                batch: self.batch,
                lr: self.lr,
                warmup: self.warmup,
                channels: self.channels.clone(),
                norm_groups: self.norm_groups,
                decoder_from: self.decoder_from.clone(),
                ..VaeTrainConfig::default()
            },
            resume: self.resume.clone(),
            cadence: Cadence {
                checkpoint_every: self.checkpoint_every,
                log_every: self.log_every,
                eval_every: self.eval_every,
            },
            stop_after: self.stop_after,
            device: Device::Cpu,
        }
    }
}

pub fn run(args: PretrainVaeArgs) -> anyhow::Result<()> {
    let summary = train(&args.to_run()).context("pretrain-vae")?;
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).context("summary")?
    );
    Ok(())
}
