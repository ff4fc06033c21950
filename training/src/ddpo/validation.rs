//! Model selection during a DDPO run: every `validation.every` epochs the current adapter edits a
//! small validation world (never the test set) with the model's own sampler, deterministic and with
//! the same per-turn seeds every time (so two checkpoints are compared on the same noise), and the
//! best adapter by `validation.metric` is kept. After `validation.patience` validations without a
//! better score the run stops early.

use std::sync::Arc;

use rl4pix_model::lora::ResolvedAdapter;
use rl4pix_model::pipeline::{EditRequest, InstructPix2Pix};
use serde::{Deserialize, Serialize};

use super::config::ValidationConfig;
use super::sampler::PromptItem;
use super::stat_tracker::mean_std;
use super::{DdpoError, Result};
use crate::metrics;

/// Edits per UNet call while validating.
const BATCH: usize = 16;

/// What a validation measured, one line of `validation.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationRecord {
    pub epoch: usize,
    pub turns: usize,
    pub l1: f64,
    pub l2: f64,
    pub psnr: f64,
    pub ssim: f64,
    pub edit_l1: f64,
    /// The configured metric's value.
    pub score: f64,
    pub improved: bool,
    pub best_epoch: usize,
    pub best_score: f64,
}

/// What a resumed run needs to continue the selection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationState {
    pub best_epoch: Option<usize>,
    /// As its bit pattern: resume must compare exactly.
    pub best_score_bits: Option<u64>,
    pub since_best: usize,
    pub stopped: bool,
}

pub struct Validation {
    config: ValidationConfig,
    prompts: Vec<PromptItem>,
    best: Option<(usize, f64)>,
    since_best: usize,
    stopped: bool,
}

/// Lower is better for the L1/L2 metrics, higher for PSNR and SSIM.
pub fn higher_is_better(metric: &str) -> bool {
    matches!(metric, "psnr" | "ssim")
}

impl Validation {
    pub fn new(config: ValidationConfig, mut prompts: Vec<PromptItem>) -> Result<Self> {
        prompts.truncate(config.max_turns.max(1));
        if prompts.is_empty() {
            return Err(DdpoError::Dataset(
                "the validation data set has no usable turns".into(),
            ));
        }
        Ok(Self {
            config,
            prompts,
            best: None,
            since_best: 0,
            stopped: false,
        })
    }

    /// Validate after `epoch`: every `every` epochs and after the last.
    pub fn due(&self, epoch: usize, num_epochs: usize) -> bool {
        epoch.is_multiple_of(self.config.every.max(1)) || epoch == num_epochs
    }

    pub fn best(&self) -> Option<(usize, f64)> {
        self.best
    }

    pub fn stopped(&self) -> bool {
        self.stopped
    }

    /// Edits the validation turns under `adapter` and records the score.
    pub fn evaluate(
        &mut self,
        pipeline: &InstructPix2Pix,
        adapter: &Arc<ResolvedAdapter>,
        epoch: usize,
    ) -> Result<ValidationRecord> {
        let mut params = pipeline.params_with_guidance(None, None);
        if self.config.steps > 0 {
            params.steps = self.config.steps;
        }
        params.eta = 0.0;
        params.capture_attention = false;
        let adapters = [adapter.clone()];
        let (mut l1, mut l2, mut psnr, mut ssim, mut edit) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for (chunk_index, chunk) in self.prompts.chunks(BATCH).enumerate() {
            let requests: Vec<EditRequest> = chunk
                .iter()
                .enumerate()
                .map(|(i, p)| EditRequest {
                    image: &p.source,
                    instruction: &p.instruction,
                    params: rl4pix_model::pipeline::EditParams {
                        seed: (chunk_index * BATCH + i) as u64,
                        ..params.clone()
                    },
                    init_latents: None,
                })
                .collect();
            let outputs = pipeline.edit_batch(&requests, &adapters, &mut |_, _| true)?;
            for (output, prompt) in outputs.iter().zip(chunk) {
                let metric_error = |e: metrics::MetricError| {
                    DdpoError::Invalid(format!("validation turn `{}`: {e}", prompt.key))
                };
                let (w, h) = prompt.target.dimensions();
                let mask = metrics::resize_mask(&prompt.mask, w, h);
                let mse = metrics::mse(&output.image, &prompt.target).map_err(metric_error)?;
                l1.push(metrics::l1(&output.image, &prompt.target).map_err(metric_error)?);
                l2.push(mse);
                psnr.push(metrics::psnr(mse));
                ssim.push(metrics::ssim(&output.image, &prompt.target).map_err(metric_error)?);
                if let Some(e) = metrics::edit_region_l1(&output.image, &prompt.target, &mask)
                    .map_err(metric_error)?
                {
                    edit.push(e);
                }
            }
        }
        let mean = |v: &[f64]| mean_std(v.iter().copied()).0;
        let (l1, l2, psnr, ssim, edit_l1) =
            (mean(&l1), mean(&l2), mean(&psnr), mean(&ssim), mean(&edit));
        let score = match self.config.metric.as_str() {
            "l2" => l2,
            "psnr" => psnr,
            "ssim" => ssim,
            "edit_l1" => edit_l1,
            _ => l1,
        };
        if !score.is_finite() {
            return Err(DdpoError::NonFinite {
                what: format!("the validation score ({score})"),
                epoch,
                last_checkpoint: None,
            });
        }
        let improved = match self.best {
            None => true,
            Some((_, best)) if higher_is_better(&self.config.metric) => score > best,
            Some((_, best)) => score < best,
        };
        if improved {
            self.best = Some((epoch, score));
            self.since_best = 0;
        } else {
            self.since_best += 1;
            if self.config.patience > 0 && self.since_best >= self.config.patience {
                self.stopped = true;
            }
        }
        let (best_epoch, best_score) = self.best.unwrap_or((epoch, score));
        Ok(ValidationRecord {
            epoch,
            turns: self.prompts.len(),
            l1,
            l2,
            psnr,
            ssim,
            edit_l1,
            score,
            improved,
            best_epoch,
            best_score,
        })
    }

    pub fn state(&self) -> ValidationState {
        ValidationState {
            best_epoch: self.best.map(|b| b.0),
            best_score_bits: self.best.map(|b| b.1.to_bits()),
            since_best: self.since_best,
            stopped: self.stopped,
        }
    }

    pub fn restore(&mut self, state: &ValidationState) {
        self.best = state
            .best_epoch
            .zip(state.best_score_bits)
            .map(|(e, bits)| (e, f64::from_bits(bits)));
        self.since_best = state.since_best;
        self.stopped = state.stopped;
    }
}
