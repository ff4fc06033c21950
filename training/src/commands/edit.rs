//! `rl4pix-train edit`: one image, one instruction, one edited image.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, Context};
use candle_core::Device;
use rl4pix_model::image_io;
use rl4pix_model::pipeline::{EditParams, EditRequest, InstructPix2Pix};
use rl4pix_model::scheduler::SchedulerKind;

use super::SamplerArgs;

#[derive(clap::Args, Debug)]
pub struct EditArgs {
    /// Model folder in the diffusers layout (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Input image (PNG, JPEG or WebP).
    #[arg(long)]
    pub image: PathBuf,
    /// The edit instruction, e.g. "make the circle blue".
    #[arg(long)]
    pub instruction: String,
    /// Where to write the edited image (format from the extension).
    #[arg(long)]
    pub out: PathBuf,
    /// Denoising steps.
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Seed of the initial and per-step noise.
    #[arg(long, default_value_t = 0, conflicts_with = "init_latents")]
    pub seed: u64,
    /// A safetensors file with one tensor `latents` (1, 4, H/f, W/f): the initial noise, as
    /// diffusers' `latents=` argument.
    #[arg(long)]
    pub init_latents: Option<PathBuf>,
    /// LoRA adapter file(s) for the UNet, applied in order.
    #[arg(long)]
    pub adapter: Vec<PathBuf>,
    /// Also write a heat map of the instruction's cross-attention over the input.
    #[arg(long)]
    pub attention_out: Option<PathBuf>,
}

pub(crate) fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    SchedulerKind::from_cli_name(s).map_err(|e| e.to_string())
}

/// The model folder to use: the one given, or the embedded default.
pub fn resolve_model_dir(model: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    match model {
        Some(dir) => Ok(dir),
        None => rl4pix_model::default_model_dir()
            .context("no --model given and the embedded default model is not in this build"),
    }
}

pub fn run(args: EditArgs) -> anyhow::Result<()> {
    let device = Device::Cpu;
    let model_dir = resolve_model_dir(args.model)?;
    let image = image_io::load_image(&args.image)?;
    let init_latents = match &args.init_latents {
        Some(path) => {
            let mut tensors = candle_core::safetensors::load(path, &device)
                .with_context(|| format!("{}: cannot read safetensors", path.display()))?;
            Some(
                tensors
                    .remove("latents")
                    .ok_or_else(|| anyhow!("{}: no tensor named `latents`", path.display()))?,
            )
        }
        None => None,
    };
    let pipeline = InstructPix2Pix::load(&model_dir, &device)?;
    let adapters = args
        .adapter
        .iter()
        .map(|p| pipeline.load_adapter(p))
        .collect::<Result<Vec<Arc<_>>, _>>()?;
    let params = EditParams {
        steps: args.steps,
        seed: args.seed,
        scheduler: args.sampler.scheduler,
        eta: args.sampler.eta,
        capture_attention: args.attention_out.is_some(),
        ..args.sampler.guidance.params(&pipeline)
    };
    let request = EditRequest {
        image: &image,
        instruction: &args.instruction,
        params,
        init_latents,
    };
    let started = std::time::Instant::now();
    let output = pipeline
        .edit_batch(&[request], &adapters, &mut |_, _| true)?
        .pop()
        .ok_or_else(|| anyhow!("the pipeline returned no image"))?;
    output
        .image
        .save(&args.out)
        .with_context(|| format!("{}: cannot write image", args.out.display()))?;
    tracing::info!(
        out = %args.out.display(),
        seconds = started.elapsed().as_secs_f64(),
        "edited"
    );
    if let (Some(path), Some(maps)) = (&args.attention_out, &output.attention) {
        let map = maps.instruction_map()?;
        let overlay = image_io::heatmap_overlay(&image, &map, maps.height, maps.width, 0.55)?;
        overlay
            .save(path)
            .with_context(|| format!("{}: cannot write image", path.display()))?;
    }
    Ok(())
}
