//! MagicBrush-compatible evaluation: scores generated edits turn by turn and averages them in
//! MagicBrush's two settings.
//!
//! - all turns ("all_turn"): every turn edited independently from the ground-truth source of that
//!   turn; generated files `<id>/<id>_1.png` for turn 1 and `<id>/<id>_inde_<k>.png` for turn k > 1.
//! - final turn ("final_turn"): each session edited iteratively from its input (turn k from the
//!   model's own turn k-1), scored on its last turn only; `<id>/<id>_iter_<k>.png` (turn 1 is
//!   `<id>_1.png` in both settings). Preservation L1 is then measured against that turn's
//!   ground-truth source, outside that turn's mask.
//!
//! For the pixel metrics, generated images of another size are resized to the ground truth's with
//! PIL-exact bicubic (what MagicBrush's script does), sources and masks of another size likewise
//! (masks bilinearly); CLIP-T sees the generated image as it is.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use image::RgbImage;
use rl4pix_model::lora::ResolvedAdapter;
use rl4pix_model::pipeline::{EditParams, EditRequest, InstructPix2Pix};
use rl4pix_model::scheduler::SchedulerKind;
use serde::{Deserialize, Serialize};

use crate::data::{read_image_file, DataError, Dataset, Session, Turn};
use crate::metrics::{self, ClipScorer, MetricError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Setting {
    /// Each turn from the ground-truth source.
    Independent,
    /// Each turn from the previous generated turn.
    Iterative,
}

/// MagicBrush's name of a generated image: `<id>_1.png`, `<id>_inde_<k>.png`, `<id>_iter_<k>.png`.
pub fn generated_file_name(session_id: &str, turn_index: usize, setting: Setting) -> String {
    match (turn_index, setting) {
        (1, _) => format!("{session_id}_1.png"),
        (k, Setting::Independent) => format!("{session_id}_inde_{k}.png"),
        (k, Setting::Iterative) => format!("{session_id}_iter_{k}.png"),
    }
}

/// Where a generated image lives under a generated folder.
pub fn generated_path(
    root: &Path,
    session_id: &str,
    turn_index: usize,
    setting: Setting,
) -> PathBuf {
    root.join(session_id)
        .join(generated_file_name(session_id, turn_index, setting))
}

#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error(
        "generated image for session {session} turn {turn} ({setting}) is missing: {}",
        path.display()
    )]
    MissingGenerated {
        session: String,
        turn: usize,
        setting: &'static str,
        path: PathBuf,
    },
    #[error(transparent)]
    Data(#[from] DataError),
    #[error("session {session} turn {turn}: {cause}")]
    Metric {
        session: String,
        turn: usize,
        cause: MetricError,
    },
    #[error("editing session {session} turn {turn}: {message}")]
    Edit {
        session: String,
        turn: usize,
        message: String,
    },
}

pub type Result<T> = std::result::Result<T, EvalError>;

/// The metrics of one generated image.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct TurnScores {
    pub l1: f64,
    pub l2: f64,
    pub psnr: f64,
    pub ssim: f64,
    pub edit_l1: Option<f64>,
    pub preserve_l1: Option<f64>,
    pub clip_t: Option<f64>,
}

fn to_size(image: &RgbImage, size: (u32, u32)) -> std::borrow::Cow<'_, RgbImage> {
    if image.dimensions() == size {
        std::borrow::Cow::Borrowed(image)
    } else {
        std::borrow::Cow::Owned(metrics::resize_bicubic(image, size.0, size.1))
    }
}

/// Scores `generated` against `turn`: pixel metrics after resizing it to the ground truth's size,
/// CLIP-T on the image as generated (CLIP's processor resizes it anyway), as MagicBrush does.
pub fn score_turn(
    generated: &RgbImage,
    turn: &Turn,
    clip: Option<&ClipScorer>,
) -> Result<TurnScores> {
    let wrap = |source: MetricError| EvalError::Metric {
        session: turn.session_id.clone(),
        turn: turn.turn_index,
        cause: source,
    };
    let size = turn.target.dimensions();
    let original = generated;
    let generated = to_size(generated, size);
    let source = to_size(&turn.source, size);
    let mask = metrics::resize_mask(&turn.mask, size.0, size.1);
    let l2 = metrics::mse(&generated, &turn.target).map_err(wrap)?;
    let clip_t = match (clip, &turn.local_description) {
        (Some(clip), Some(text)) => Some(clip.score(original, text).map_err(wrap)?),
        _ => None,
    };
    Ok(TurnScores {
        l1: metrics::l1(&generated, &turn.target).map_err(wrap)?,
        l2,
        psnr: metrics::psnr(l2),
        ssim: metrics::ssim(&generated, &turn.target).map_err(wrap)?,
        edit_l1: metrics::edit_region_l1(&generated, &turn.target, &mask).map_err(wrap)?,
        preserve_l1: metrics::preservation_l1(&generated, &source, &mask).map_err(wrap)?,
        clip_t,
    })
}

#[derive(Debug, Default, Clone, Copy)]
struct Mean {
    sum: f64,
    count: usize,
}

impl Mean {
    fn add(&mut self, value: Option<f64>) {
        if let Some(v) = value {
            self.sum += v;
            self.count += 1;
        }
    }

    fn value(&self) -> Option<f64> {
        (self.count > 0).then(|| self.sum / self.count as f64)
    }
}

/// Running means of one setting.
#[derive(Debug, Default, Clone)]
pub struct Accumulator {
    count: usize,
    l1: Mean,
    l2: Mean,
    psnr: Mean,
    ssim: Mean,
    edit_l1: Mean,
    preserve_l1: Mean,
    clip_t: Mean,
    /// Turns scored without a local description while CLIP-T was asked for.
    pub missing_descriptions: usize,
}

impl Accumulator {
    pub fn add(&mut self, scores: &TurnScores) {
        self.count += 1;
        self.l1.add(Some(scores.l1));
        self.l2.add(Some(scores.l2));
        self.psnr.add(Some(scores.psnr));
        self.ssim.add(Some(scores.ssim));
        self.edit_l1.add(scores.edit_l1);
        self.preserve_l1.add(scores.preserve_l1);
        self.clip_t.add(scores.clip_t);
    }

    pub fn summary(&self) -> SettingSummary {
        SettingSummary {
            count: self.count,
            l1: self.l1.value(),
            l2: self.l2.value(),
            psnr: self.psnr.value(),
            ssim: self.ssim.value(),
            edit_l1: self.edit_l1.value(),
            preserve_l1: self.preserve_l1.value(),
            clip_t: self.clip_t.value(),
        }
    }
}

/// Averages of one setting; a metric nothing was measured for is `null` (and CLIP-T absent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SettingSummary {
    pub count: usize,
    pub l1: Option<f64>,
    pub l2: Option<f64>,
    pub psnr: Option<f64>,
    pub ssim: Option<f64>,
    pub edit_l1: Option<f64>,
    pub preserve_l1: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub clip_t: Option<f64>,
}

/// The evaluation's result, in the JSON shape the issue fixes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalReport {
    pub all_turn: SettingSummary,
    pub final_turn: SettingSummary,
}

impl EvalReport {
    /// A markdown table in the paper's column order, plus our two columns.
    pub fn to_markdown(&self) -> String {
        let cell = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.4}"));
        let psnr = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
        let mut out = String::from(
            "| setting | turns | L1 | L2 | CLIP-T | SSIM | PSNR | edit-region L1 | preservation L1 |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
        );
        for (name, s) in [
            ("all turns", &self.all_turn),
            ("final turn", &self.final_turn),
        ] {
            out.push_str(&format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                s.count,
                cell(s.l1),
                cell(s.l2),
                cell(s.clip_t),
                cell(s.ssim),
                psnr(s.psnr),
                cell(s.edit_l1),
                cell(s.preserve_l1),
            ));
        }
        out
    }
}

/// Where generated images come from: a folder written earlier, or a model run now.
pub trait GeneratedImages {
    /// The generated image of `session`'s turn `turn_index` (1-based) in `setting`. Iterative turns
    /// are asked for in order, so a model can chain them.
    fn generated(
        &mut self,
        session: &Session,
        turn_index: usize,
        setting: Setting,
    ) -> Result<RgbImage>;
}

/// A folder in MagicBrush's generated layout.
pub struct GeneratedFolder {
    pub root: PathBuf,
}

impl GeneratedImages for GeneratedFolder {
    fn generated(
        &mut self,
        session: &Session,
        turn_index: usize,
        setting: Setting,
    ) -> Result<RgbImage> {
        let path = generated_path(&self.root, &session.id, turn_index, setting);
        if !path.is_file() {
            return Err(EvalError::MissingGenerated {
                session: session.id.clone(),
                turn: turn_index,
                setting: match setting {
                    Setting::Independent => "all-turn setting",
                    Setting::Iterative => "iterative setting",
                },
                path,
            });
        }
        Ok(read_image_file(&path)?.to_rgb8())
    }
}

/// Scores sessions one by one into the two settings.
pub struct Evaluator<'a> {
    clip: Option<&'a ClipScorer>,
    all_turn: Accumulator,
    final_turn: Accumulator,
}

impl<'a> Evaluator<'a> {
    pub fn new(clip: Option<&'a ClipScorer>) -> Self {
        Evaluator {
            clip,
            all_turn: Accumulator::default(),
            final_turn: Accumulator::default(),
        }
    }

    /// Scores every turn of `session` (all-turn setting) and its last turn edited iteratively
    /// (final-turn setting). Iterative turns before the last are requested too, so a model that
    /// generates them writes the whole chain.
    pub fn add_session(
        &mut self,
        session: &Session,
        images: &mut dyn GeneratedImages,
    ) -> Result<()> {
        for turn in &session.turns {
            let generated = images.generated(session, turn.turn_index, Setting::Independent)?;
            let scores = score_turn(&generated, turn, self.clip)?;
            self.note_description(turn, true);
            self.all_turn.add(&scores);
        }
        let Some(last) = session.turns.last() else {
            return Ok(());
        };
        let mut final_image = None;
        for turn in &session.turns {
            if turn.turn_index > 1 {
                final_image =
                    Some(images.generated(session, turn.turn_index, Setting::Iterative)?);
            } else if session.turns.len() == 1 {
                final_image = Some(images.generated(session, 1, Setting::Iterative)?);
            }
        }
        if let Some(image) = final_image {
            let scores = score_turn(&image, last, self.clip)?;
            self.note_description(last, false);
            self.final_turn.add(&scores);
        }
        Ok(())
    }

    fn note_description(&mut self, turn: &Turn, all: bool) {
        if self.clip.is_some() && turn.local_description.is_none() {
            let acc = if all {
                &mut self.all_turn
            } else {
                &mut self.final_turn
            };
            acc.missing_descriptions += 1;
        }
    }

    pub fn missing_descriptions(&self) -> usize {
        self.all_turn.missing_descriptions
    }

    pub fn report(&self) -> EvalReport {
        EvalReport {
            all_turn: self.all_turn.summary(),
            final_turn: self.final_turn.summary(),
        }
    }
}

/// The editing model run on the data set's turns; writes what it makes in the generated layout.
pub struct ModelImages {
    model: InstructPix2Pix,
    adapters: Vec<Arc<ResolvedAdapter>>,
    params: EditParams,
    base_seed: u64,
    out: PathBuf,
    /// Independent edits of the current session, by turn index.
    session_id: Option<String>,
    independent: HashMap<usize, RgbImage>,
    /// The last iterative edit of the current session, and its turn index.
    chain: Option<(usize, RgbImage)>,
}

/// How the model samples during an evaluation; `None` = the model's own.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SamplerSettings {
    pub steps: Option<usize>,
    pub scheduler: Option<SchedulerKind>,
    /// DDIM's eta (0 = deterministic).
    pub eta: f64,
    pub guidance_scale: Option<f64>,
    pub image_guidance_scale: Option<f64>,
    /// Base of the per-turn seeds ([`turn_seed`]).
    pub seed: u64,
}

/// An invalid sampler setting, named.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SamplerError(pub String);

impl ModelImages {
    /// The model (with `adapters` on its UNet) editing each turn as `sampler` says; what it makes
    /// is written under `out` in the generated layout.
    pub fn new(
        model: InstructPix2Pix,
        adapters: Vec<Arc<ResolvedAdapter>>,
        sampler: &SamplerSettings,
        out: PathBuf,
    ) -> std::result::Result<Self, SamplerError> {
        let defaults =
            model.params_with_guidance(sampler.guidance_scale, sampler.image_guidance_scale);
        if !(defaults.guidance_scale.is_finite() && defaults.image_guidance_scale.is_finite()) {
            return Err(SamplerError(
                "guidance scales must be finite numbers".into(),
            ));
        }
        if !(0.0..=1.0).contains(&sampler.eta) {
            return Err(SamplerError(format!(
                "eta must be in [0, 1], got {}",
                sampler.eta
            )));
        }
        let mut params = EditParams {
            scheduler: sampler.scheduler,
            eta: sampler.eta,
            ..defaults
        };
        if let Some(steps) = sampler.steps {
            if steps == 0 {
                return Err(SamplerError("steps must be at least 1".into()));
            }
            params.steps = steps;
        }
        Ok(ModelImages {
            model,
            adapters,
            params,
            base_seed: sampler.seed,
            out,
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
    ) -> Result<Vec<RgbImage>> {
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
                std::fs::create_dir_all(parent).map_err(|source| DataError::Io {
                    path: parent.to_path_buf(),
                    cause: source,
                })?;
            }
            image.save(&path).map_err(|e| DataError::Image {
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
    ) -> Result<RgbImage> {
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
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
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
    ) -> Result<RgbImage> {
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

/// Scores the first `limit` sessions of `dataset` (all when `None`) with the images `images`
/// gives; `on_session(turns)` is called after each session (for progress bars).
pub fn evaluate(
    dataset: &Dataset,
    images: &mut dyn GeneratedImages,
    clip: Option<&ClipScorer>,
    limit: Option<usize>,
    on_session: &mut dyn FnMut(usize),
) -> Result<EvalReport> {
    let mut evaluator = Evaluator::new(clip);
    for session in dataset.sessions().take(limit.unwrap_or(usize::MAX)) {
        let session = session?;
        evaluator.add_session(&session, images)?;
        on_session(session.turns.len());
    }
    if evaluator.missing_descriptions() > 0 {
        tracing::warn!(
            turns = evaluator.missing_descriptions(),
            "turns without a local description have no CLIP-T"
        );
    }
    Ok(evaluator.report())
}

/// A stable per-turn seed, so a model's output for a turn does not depend on what ran before it.
pub fn turn_seed(base: u64, session_id: &str, turn_index: usize, setting: Setting) -> u64 {
    use std::hash::Hasher;
    // FNV-1a: fixed across platforms and Rust versions, unlike std's hasher.
    let mut hash = fnv::FnvHasher::default();
    let tag = match setting {
        Setting::Independent => b'i',
        Setting::Iterative => b't',
    };
    hash.write(session_id.as_bytes());
    hash.write(&(turn_index as u64).to_le_bytes());
    hash.write(&[tag]);
    base ^ hash.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_follow_magicbrush() {
        assert_eq!(
            generated_file_name("42", 1, Setting::Independent),
            "42_1.png"
        );
        assert_eq!(generated_file_name("42", 1, Setting::Iterative), "42_1.png");
        assert_eq!(
            generated_file_name("42", 3, Setting::Independent),
            "42_inde_3.png"
        );
        assert_eq!(
            generated_file_name("42", 2, Setting::Iterative),
            "42_iter_2.png"
        );
    }

    #[test]
    fn seeds_differ_per_turn_and_setting() {
        let a = turn_seed(0, "1", 1, Setting::Independent);
        assert_ne!(a, turn_seed(0, "1", 2, Setting::Independent));
        assert_ne!(a, turn_seed(0, "1", 1, Setting::Iterative));
        assert_ne!(a, turn_seed(0, "2", 1, Setting::Independent));
        assert_eq!(a, turn_seed(0, "1", 1, Setting::Independent));
    }
}
