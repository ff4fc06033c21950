//! `rl4pix-train eval`: MagicBrush's metrics on a MagicBrush-format data set, for a folder of
//! generated edits (`--generated`) or for the editing model run now in both of MagicBrush's settings.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use candle_core::Device;
use image::RgbImage;
use indicatif::{ProgressBar, ProgressStyle};
use rl4pix_model::pipeline::{EditParams, EditRequest, InstructPix2Pix};
use rl4pix_model::scheduler::SchedulerKind;

use crate::data::{Dataset, Session};
use crate::eval::{
    generated_path, turn_seed, EvalError, EvalReport, Evaluator, GeneratedFolder, GeneratedImages,
    Setting,
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
    /// ddim or euler-ancestral (default: the model's own scheduler).
    #[arg(long, value_parser = crate::commands::edit::parse_scheduler)]
    pub scheduler: Option<SchedulerKind>,
    /// DDIM's eta (0 = deterministic).
    #[arg(long, default_value_t = 0.0)]
    pub eta: f64,
    /// Text guidance scale (default: the model's own, `model_index.json` → `rl4pix.sampling`,
    /// else 7.5).
    #[arg(long)]
    pub guidance_scale: Option<f64>,
    /// Image guidance scale (default: the model's own, else 1.5).
    #[arg(long)]
    pub image_guidance_scale: Option<f64>,
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
        (None, None) => Box::new(ModelImages::load(&args, &device)?),
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
    let mut evaluator = Evaluator::new(clip.as_ref());
    for session in dataset.sessions().take(args.limit.unwrap_or(usize::MAX)) {
        let session = session?;
        evaluator.add_session(&session, images.as_mut())?;
        bar.inc(session.turns.len() as u64);
    }
    bar.finish_and_clear();
    if evaluator.missing_descriptions() > 0 {
        tracing::warn!(
            turns = evaluator.missing_descriptions(),
            "turns without a local description have no CLIP-T"
        );
    }
    let report = evaluator.report();
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

/// The editing model run on the data set's turns; writes what it makes in the generated layout.
struct ModelImages {
    model: InstructPix2Pix,
    adapters: Vec<Arc<rl4pix_model::lora::ResolvedAdapter>>,
    params: EditParams,
    base_seed: u64,
    out: PathBuf,
    /// Independent edits of the current session, by turn index.
    session_id: Option<String>,
    independent: HashMap<usize, RgbImage>,
    /// The last iterative edit of the current session, and its turn index.
    chain: Option<(usize, RgbImage)>,
}

/// The folder of the embedded default model, once the project ships one.
impl ModelImages {
    fn load(args: &EvalArgs, device: &Device) -> anyhow::Result<Self> {
        let dir = crate::commands::edit::resolve_model_dir(args.model.clone())?;
        let model = InstructPix2Pix::load(&dir, device)
            .with_context(|| format!("loading editing model {}", dir.display()))?;
        let adapters = match &args.adapter {
            Some(path) => vec![model
                .load_adapter(path)
                .with_context(|| format!("loading adapter {}", path.display()))?],
            None => Vec::new(),
        };
        let defaults = model.params_with_guidance(args.guidance_scale, args.image_guidance_scale);
        anyhow::ensure!(
            defaults.guidance_scale.is_finite() && defaults.image_guidance_scale.is_finite(),
            "guidance scales must be finite numbers"
        );
        anyhow::ensure!(
            (0.0..=1.0).contains(&args.eta),
            "--eta must be in [0, 1], got {}",
            args.eta
        );
        let mut params = EditParams {
            scheduler: args.scheduler,
            eta: args.eta,
            ..defaults
        };
        if let Some(steps) = args.steps {
            anyhow::ensure!(steps > 0, "--steps must be at least 1");
            params.steps = steps;
        }
        Ok(ModelImages {
            model,
            adapters,
            params,
            base_seed: args.seed,
            out: args.out.clone(),
            session_id: None,
            independent: HashMap::new(),
            chain: None,
        })
    }

    fn edit_error(session: &Session, turn: usize, e: impl std::fmt::Display) -> EvalError {
        EvalError::Edit {
            session: session.id.clone(),
            turn,
            message: e.to_string(),
        }
    }

    /// Edits `(image, turn index)` pairs of `session`, batched when they share a size.
    fn edit(
        &self,
        session: &Session,
        inputs: &[(&RgbImage, usize)],
        setting: Setting,
    ) -> crate::eval::Result<Vec<RgbImage>> {
        let requests: Vec<EditRequest> = inputs
            .iter()
            .map(|(image, k)| EditRequest {
                image,
                instruction: &session.turns[k - 1].instruction,
                params: EditParams {
                    seed: turn_seed(self.base_seed, &session.id, *k, setting),
                    ..self.params.clone()
                },
                init_latents: None,
            })
            .collect();
        let same_size = inputs
            .windows(2)
            .all(|w| w[0].0.dimensions() == w[1].0.dimensions());
        let outputs = if same_size {
            self.model
                .edit_batch(&requests, &self.adapters, &mut |_, _| true)
                .map_err(|e| Self::edit_error(session, inputs[0].1, e))?
        } else {
            let mut outputs = Vec::with_capacity(requests.len());
            for (request, (_, k)) in requests.into_iter().zip(inputs) {
                let mut one = self
                    .model
                    .edit_batch(&[request], &self.adapters, &mut |_, _| true)
                    .map_err(|e| Self::edit_error(session, *k, e))?;
                outputs.append(&mut one);
            }
            outputs
        };
        let images: Vec<RgbImage> = outputs.into_iter().map(|o| o.image).collect();
        for (image, (_, k)) in images.iter().zip(inputs) {
            let path = generated_path(&self.out, &session.id, *k, setting);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).map_err(|source| crate::data::DataError::Io {
                    path: parent.to_path_buf(),
                    cause: source,
                })?;
            }
            image
                .save(&path)
                .map_err(|e| crate::data::DataError::Image {
                    what: path.display().to_string(),
                    message: e.to_string(),
                })?;
        }
        Ok(images)
    }
}

impl GeneratedImages for ModelImages {
    fn generated(
        &mut self,
        session: &Session,
        turn_index: usize,
        setting: Setting,
    ) -> crate::eval::Result<RgbImage> {
        if self.session_id.as_deref() != Some(session.id.as_str()) {
            let inputs: Vec<(&RgbImage, usize)> = session
                .turns
                .iter()
                .map(|t| (&t.source, t.turn_index))
                .collect();
            let outputs = self.edit(session, &inputs, Setting::Independent)?;
            self.independent = inputs.iter().map(|(_, k)| *k).zip(outputs).collect();
            self.session_id = Some(session.id.clone());
            self.chain = None;
        }
        let independent = |k: usize| {
            self.independent
                .get(&k)
                .cloned()
                .ok_or_else(|| Self::edit_error(session, k, "no such turn"))
        };
        if setting == Setting::Independent || turn_index == 1 {
            return independent(turn_index);
        }
        let previous = match &self.chain {
            Some((k, image)) if *k == turn_index - 1 => image.clone(),
            _ if turn_index == 2 => independent(1)?,
            _ => {
                return Err(Self::edit_error(
                    session,
                    turn_index,
                    "iterative turns must be requested in order",
                ))
            }
        };
        let image = self
            .edit(session, &[(&previous, turn_index)], Setting::Iterative)?
            .remove(0);
        self.chain = Some((turn_index, image.clone()));
        Ok(image)
    }
}

/// What a trivial editor would score: the floor (ground truth) and the do-nothing line (identity)
/// that every model number is read against.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Baseline {
    /// Output = the turn's source image (no edit at all).
    Identity,
    /// Output = the turn's target image.
    GroundTruth,
}

impl GeneratedImages for Baseline {
    fn generated(
        &mut self,
        session: &Session,
        turn_index: usize,
        _setting: Setting,
    ) -> crate::eval::Result<RgbImage> {
        let turn = session
            .turns
            .iter()
            .find(|t| t.turn_index == turn_index)
            .ok_or_else(|| EvalError::Edit {
                session: session.id.clone(),
                turn: turn_index,
                message: "no such turn".into(),
            })?;
        Ok(match self {
            Baseline::Identity => turn.source.clone(),
            Baseline::GroundTruth => turn.target.clone(),
        })
    }
}
