//! `rl4pix-train pretrain`: train the toy InstructPix2Pix (UNet + text encoder) on the synthetic
//! world, training the VAE first unless `--vae` names a trained one, and export the result; and
//! `rl4pix-train pretrain-export`: export a run's checkpoint to the diffusers layout.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use rl4pix_model::scheduler::SchedulerKind;

use super::{CadenceArgs, GuidanceArgs};
use crate::pretrain::export::{export_model, ExportOptions};
use crate::pretrain::unet::{train, UnetRun, UnetTrainConfig};

#[derive(clap::Args, Debug)]
pub struct PretrainArgs {
    /// Run folder: checkpoints, JSONL log, loss curve, configs, tokenizer.
    #[arg(long, default_value = "runs/pretrain/unet")]
    pub out: PathBuf,
    /// A trained VAE folder (config.json + weights); when absent, `pretrain-vae` with its
    /// defaults runs first into `<out>/../vae` (resumed if it was already started).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// Continue from a checkpoint folder, or from the newest checkpoint of a run folder.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// Export the trained model here when done (diffusers layout, f16), e.g. model/assets/toy.
    #[arg(long)]
    pub export: Option<PathBuf>,
    #[arg(long, default_value_t = 32)]
    pub size: u32,
    /// Seed of the training stream (edits, noise, timesteps, dropout).
    #[arg(long, default_value_t = 2)]
    pub seed: u64,
    #[arg(long, default_value_t = 6000)]
    pub steps: usize,
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
    #[arg(long, default_value_t = 5e-4)]
    pub lr: f64,
    #[arg(long, default_value_t = 200)]
    pub warmup: usize,
    /// UNet channels per level (each level halves the latent side).
    #[arg(long, value_delimiter = ',', default_value = "32,64,64")]
    pub channels: Vec<usize>,
    /// Cross-attention per level, e.g. "1,1,0".
    #[arg(long, value_delimiter = ',', default_value = "1,1,0")]
    pub attention: Vec<u8>,
    #[arg(long, default_value_t = 1)]
    pub layers_per_block: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 16)]
    pub norm_groups: usize,
    #[arg(long, default_value_t = 64)]
    pub text_hidden: usize,
    #[arg(long, default_value_t = 2)]
    pub text_layers: usize,
    #[arg(long, default_value_t = 4)]
    pub text_heads: usize,
    #[arg(long, default_value_t = 32)]
    pub max_length: usize,
    #[arg(long, default_value_t = 0.999)]
    pub ema_decay: f64,
    /// What the UNet predicts: epsilon or v_prediction (see `docs/architecture.md`, "Pretraining").
    #[arg(long, default_value = "v_prediction", value_parser = ["epsilon", "v_prediction"])]
    pub prediction_type: String,
    /// Start from the weights of another run's checkpoint (a checkpoint folder, or a run folder:
    /// its newest) of the same architecture, with a fresh optimizer, EMA and schedule. A resumed
    /// run keeps the one it began with.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    #[command(flatten)]
    pub cadence: CadenceArgs,
    /// End this invocation after step N (checkpointed) without ending the run: the learning-rate
    /// schedule still spans --steps and `--resume` carries on (no export until the run ends).
    #[arg(long)]
    pub stop_after: Option<usize>,
    /// Split each batch across N threads, each running its shard's forward and backward whole
    /// (set CANDLE_NUM_THREADS=1 and RAYON_NUM_THREADS=1 beside it so the ops inside a shard do
    /// not also fan out). On two cores this beats two threads inside each op; batches,
    /// gradients and checkpoints are the same for any N, so a resume may change it.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub data_parallel: u64,
}

impl PretrainArgs {
    pub fn to_run(&self, vae_dir: PathBuf) -> UnetRun {
        UnetRun {
            run_dir: self.out.clone(),
            vae_dir,
            config: UnetTrainConfig {
                size: self.size,
                seed: self.seed,
                steps: self.steps,
                batch: self.batch,
                lr: self.lr,
                warmup: self.warmup,
                channels: self.channels.clone(),
                attention: self.attention.iter().map(|&a| a != 0).collect(),
                layers_per_block: self.layers_per_block,
                heads: self.heads,
                norm_groups: self.norm_groups,
                text_hidden: self.text_hidden,
                text_layers: self.text_layers,
                text_heads: self.text_heads,
                max_length: self.max_length,
                ema_decay: self.ema_decay,
                prediction_type: self.prediction_type.clone(),
                init_from: self.init_from.clone(),
                ..UnetTrainConfig::default()
            },
            resume: self.resume.clone(),
            cadence: self.cadence.into(),
            stop_after: self.stop_after,
            data_parallel: self.data_parallel as usize,
            device: Device::Cpu,
        }
    }
}

pub fn run(args: PretrainArgs) -> anyhow::Result<()> {
    let vae_dir = match &args.vae {
        Some(dir) => dir.clone(),
        None => {
            let vae_run_dir = args
                .out
                .parent()
                .map(|p| p.join("vae"))
                .unwrap_or_else(|| PathBuf::from("vae"));
            let trained = vae_run_dir.join("vae");
            if !trained.join("config.json").is_file() {
                let run = crate::pretrain::vae::VaeRun::default_in(&vae_run_dir, args.size)?;
                crate::pretrain::vae::train(&run).context("pretrain-vae")?;
            }
            trained
        }
    };
    let summary = train(&args.to_run(vae_dir)).context("pretrain")?;
    println!(
        "{}",
        serde_json::to_string_pretty(&summary).context("summary")?
    );
    if summary.step < summary.total_steps {
        println!(
            "stopped at step {} of {}: continue with --resume {}",
            summary.step,
            summary.total_steps,
            args.out.display()
        );
        return Ok(());
    }
    if let Some(out) = &args.export {
        let options = ExportOptions {
            use_ema: args.ema_decay > 0.0,
            ..ExportOptions::default()
        };
        export_model(&args.out, None, out, &options)
            .with_context(|| format!("export to {}", out.display()))?;
        println!("exported to {}", out.display());
    }
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct PretrainExportArgs {
    /// The `pretrain` run folder.
    #[arg(long, default_value = "runs/pretrain/unet")]
    pub run: PathBuf,
    /// A checkpoint folder of that run; default: its newest.
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Destination folder (diffusers layout).
    #[arg(long, default_value = "model/assets/toy")]
    pub out: PathBuf,
    /// Export the raw weights instead of the EMA weights.
    #[arg(long)]
    pub no_ema: bool,
    /// Keep f32 weights (default f16).
    #[arg(long)]
    pub f32: bool,
    /// Take the VAE from this folder instead of the run's copy (e.g. after
    /// `pretrain-vae --decoder-from`).
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// The exported model's own scheduler (`scheduler/scheduler_config.json`; the training
    /// run's noise schedule and prediction type either way): ddim or euler-ancestral.
    #[arg(long, value_parser = crate::commands::edit::parse_scheduler)]
    pub scheduler: Option<SchedulerKind>,
    /// Guidance the model recommends for itself (`model_index.json` → `rl4pix.sampling`), used
    /// by `edit`, `eval` and the server when a request names none; both or neither.
    #[arg(long, requires = "image_guidance_scale")]
    pub guidance_scale: Option<f64>,
    #[arg(long, requires = "guidance_scale")]
    pub image_guidance_scale: Option<f64>,
}

pub fn run_export(args: PretrainExportArgs) -> anyhow::Result<()> {
    let options = ExportOptions {
        use_ema: !args.no_ema,
        dtype: if args.f32 { DType::F32 } else { DType::F16 },
        vae_source: args.vae.clone(),
        scheduler: args.scheduler,
        sampling: match (args.guidance_scale, args.image_guidance_scale) {
            (Some(guidance_scale), Some(image_guidance_scale)) => {
                Some(rl4pix_model::pipeline::GuidanceDefaults {
                    guidance_scale,
                    image_guidance_scale,
                })
            }
            _ => None,
        },
    };
    export_model(&args.run, args.checkpoint.as_deref(), &args.out, &options)
        .with_context(|| format!("export to {}", args.out.display()))?;
    println!("exported to {}", args.out.display());
    Ok(())
}

#[derive(clap::Args, Debug)]
pub struct ToyGridArgs {
    /// Editing model folder; the embedded default model when absent.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Folder for the images and `grid.md` (the markdown table).
    #[arg(long, default_value = "model/assets/toy/grid")]
    pub out: PathBuf,
    /// How `grid.md` links the images (relative to the file that shows the table).
    #[arg(long, default_value = "grid/")]
    pub link_prefix: String,
    /// Seed of the synthetic test world the edits come from (not one used in training).
    #[arg(long, default_value_t = 9001)]
    pub world_seed: u64,
    #[arg(long, default_value_t = 2)]
    pub per_kind: usize,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[command(flatten)]
    pub guidance: GuidanceArgs,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Upscaling of the 32x32 images in the picture.
    #[arg(long, default_value_t = 4)]
    pub scale: u32,
}

pub fn run_grid(args: ToyGridArgs) -> anyhow::Result<()> {
    let dir = crate::commands::edit::resolve_model_dir(args.model.clone())?;
    let model = rl4pix_model::pipeline::InstructPix2Pix::load(&dir, &Device::Cpu)
        .with_context(|| format!("loading editing model {}", dir.display()))?;
    let size = model_image_size(&dir).unwrap_or(32);
    let table = crate::pretrain::grid::write_grid(&crate::pretrain::grid::GridSpec {
        model: &model,
        world: crate::synth::SynthWorld::new(size, args.world_seed),
        per_kind: args.per_kind,
        params: rl4pix_model::pipeline::EditParams {
            steps: args.steps,
            seed: args.seed,
            ..args.guidance.params(&model)
        },
        scale: args.scale,
        out_dir: &args.out,
        link_prefix: &args.link_prefix,
    })
    .context("toy-grid")?;
    let path = args.out.join("grid.md");
    std::fs::write(&path, &table).with_context(|| format!("writing {}", path.display()))?;
    print!("{table}");
    Ok(())
}

/// The image side the model was trained at (`vae/config.json`'s `sample_size`).
fn model_image_size(dir: &std::path::Path) -> Option<u32> {
    let text = std::fs::read_to_string(dir.join("vae").join("config.json")).ok()?;
    let json: serde_json::Value = serde_json::from_str(&text).ok()?;
    json.get("sample_size")?.as_u64().map(|v| v as u32)
}
