//! `rl4pix-train eval`: MagicBrush's metrics on a MagicBrush-format data set, for a folder of
//! generated edits (`--generated`) or for the editing model run now in both of MagicBrush's settings.

use std::path::{Path, PathBuf};

use anyhow::Context;
use candle_core::Device;
use indicatif::{ProgressBar, ProgressStyle};
use rl4pix_model::pipeline::InstructPix2Pix;

use super::SamplerArgs;
use crate::data::Dataset;
pub use crate::eval::Baseline;
use crate::eval::{
    evaluate, EvalReport, GeneratedFolder, GeneratedImages, ModelImages, SamplerSettings,
};
use crate::metrics::ClipScorer;

#[derive(clap::Args, Debug)]
pub struct EvalArgs {
    /// MagicBrush data: a folder with `edit_sessions.json`, a `.parquet` file, or a folder searched
    /// for parquet shards.
    #[arg(long)]
    pub dataset: PathBuf,
    /// With a folder of shards: which split's shards to read (train, dev, test).
    #[arg(long)]
    pub split: Option<String>,
    /// Score this folder of generated edits (`<id>/<id>_1.png`, `<id>_inde_<k>.png`, `<id>_iter_<k>.png`).
    #[arg(long, conflicts_with_all = ["model", "adapter", "steps", "baseline"])]
    pub generated: Option<PathBuf>,
    /// Score a baseline instead of a model: `identity` (output = the turn's source) or
    /// `ground-truth` (output = the turn's target).
    #[arg(long, value_enum, conflicts_with_all = ["model", "adapter", "steps"])]
    pub baseline: Option<Baseline>,
    /// Editing model folder (diffusers layout); the embedded default model when absent.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// LoRA adapter (.safetensors) applied to the model's UNet.
    #[arg(long)]
    pub adapter: Option<PathBuf>,
    /// CLIP model folder (transformers `CLIPModel`) for CLIP-T; omitted: no CLIP-T.
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the report as a markdown table here.
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    /// Evaluate only the first N sessions.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Denoising steps when running the model (default: the pipeline's).
    #[arg(long)]
    pub steps: Option<usize>,
    #[command(flatten)]
    pub sampler: SamplerArgs,
    /// Base seed when running the model; each turn's seed derives from it and the turn.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where the model's edits are written, in the generated layout.
    #[arg(long, default_value = "runs/eval/generated")]
    pub out: PathBuf,
}

pub fn run(args: EvalArgs) -> anyhow::Result<()> {
    let dataset = Dataset::open(&args.dataset, args.split.as_deref())
        .with_context(|| format!("opening data set {}", args.dataset.display()))?;
    let device = Device::cuda_if_available(0)?;
    let clip = match &args.clip {
        Some(dir) => Some(
            ClipScorer::load(dir, &device)
                .with_context(|| format!("loading CLIP model {}", dir.display()))?,
        ),
        None => None,
    };
    let mut images: Box<dyn GeneratedImages> = match (&args.generated, args.baseline) {
        (_, Some(baseline)) => Box::new(baseline),
        (Some(root), None) => {
            anyhow::ensure!(
                root.is_dir(),
                "{}: generated folder not found",
                root.display()
            );
            Box::new(GeneratedFolder { root: root.clone() })
        }
        (None, None) => Box::new(load_model_images(&args, &device)?),
    };

    let total = dataset.turn_count_of_first(args.limit);
    let bar = match total {
        Some(n) => ProgressBar::new(n as u64),
        None => ProgressBar::no_length(),
    }
    .with_style(
        ProgressStyle::with_template("{msg} {wide_bar} {pos}/{len} turns ({per_sec}, eta {eta})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("eval");
    let report = evaluate(
        &dataset,
        images.as_mut(),
        clip.as_ref(),
        args.limit,
        &mut |turns| bar.inc(turns as u64),
    )?;
    bar.finish_and_clear();
    write_report(&report, args.json.as_deref(), args.markdown.as_deref())?;
    print!("{}", report.to_markdown());
    Ok(())
}

fn write_report(
    report: &EvalReport,
    json: Option<&Path>,
    markdown: Option<&Path>,
) -> anyhow::Result<()> {
    let write = |path: &Path, text: String| -> anyhow::Result<()> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
    };
    if let Some(path) = json {
        write(path, serde_json::to_string_pretty(report)? + "\n")?;
    }
    if let Some(path) = markdown {
        write(path, report.to_markdown())?;
    }
    Ok(())
}

/// The model (and adapter) the arguments name, sampling as they say.
fn load_model_images(args: &EvalArgs, device: &Device) -> anyhow::Result<ModelImages> {
    let dir = crate::commands::edit::resolve_model_dir(args.model.clone())?;
    let model = InstructPix2Pix::load(&dir, device)
        .with_context(|| format!("loading editing model {}", dir.display()))?;
    let adapters = match &args.adapter {
        Some(path) => vec![model
            .load_adapter(path)
            .with_context(|| format!("loading adapter {}", path.display()))?],
        None => Vec::new(),
    };
    let sampler = SamplerSettings {
        steps: args.steps,
        scheduler: args.sampler.scheduler,
        eta: args.sampler.eta,
        guidance_scale: args.sampler.guidance.guidance_scale,
        image_guidance_scale: args.sampler.guidance.image_guidance_scale,
        seed: args.seed,
    };
    ModelImages::new(model, adapters, &sampler, args.out.clone()).map_err(|e| {
        // Name the flag as the user typed it.
        let flagged = e.0.starts_with("eta") || e.0.starts_with("steps");
        anyhow::anyhow!("{}{}", if flagged { "--" } else { "" }, e.0)
    })
}
