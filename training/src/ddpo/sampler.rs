//! Sampling with the current policy: DDIM with eta under three-way guidance, recording for every
//! step the latents, the next latents and the step's log-probability, plus the decoded images and
//! the instruction's averaged cross-attention map; and the log-probability of a recorded step
//! recomputed under the current weights (differentiable).

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::{DType, Tensor};
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rl4pix_model::attention::{CapturedAttention, ForwardCtx};
use rl4pix_model::lora::ResolvedAdapter;
use rl4pix_model::pipeline::{
    average_layers, gaussian, AttentionMaps, Conditioning, EditParams, EditRequest, InstructPix2Pix,
};
use rl4pix_model::scheduler::ddim::DdimScheduler;

use super::config::RewardConfig;
use super::reward::{reward, RewardTerms};
use super::{DdpoError, Result};
use crate::data::Mask;

/// One training prompt: a source image at the working size, its mask and its instruction.
#[derive(Debug, Clone)]
pub struct PromptItem {
    /// Per-prompt statistics key: image id + instruction.
    pub key: String,
    pub source: RgbImage,
    pub mask: Mask,
    pub instruction: String,
    /// The ground-truth edit at the working size: read only by the oracle ablation's reward and
    /// by validation, never by the paper's reward or ours.
    pub target: RgbImage,
}

impl PromptItem {
    /// The reward of `output`, sampled for this prompt with cross-attention `attention_map` on a
    /// `grid` of latent cells.
    pub fn reward(
        &self,
        config: &RewardConfig,
        attention_map: &[f32],
        grid: (usize, usize),
        output: &RgbImage,
    ) -> RewardTerms {
        reward(
            config,
            &self.mask,
            attention_map,
            grid,
            &self.source,
            output,
            Some(&self.target),
        )
    }
}

/// Whose cross-attention the attention term reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionSource {
    /// The adapted UNet's own, captured while sampling (the paper's).
    Policy,
    /// The frozen base UNet's, from its text+image branch on the sampled latents of every step:
    /// the adapter cannot move this map without moving the latents themselves.
    Base,
}

impl AttentionSource {
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "policy" => Some(Self::Policy),
            "base" => Some(Self::Base),
            _ => None,
        }
    }
}

/// Guidance of the sampling policy.
#[derive(Debug, Clone, Copy)]
pub struct Guidance {
    pub text: f64,
    pub image: f64,
}

impl Guidance {
    /// The policy's guidance: the model's recorded one when `sample.use_model_guidance`, else
    /// the configured scales.
    pub fn of_policy(
        sample: &super::config::SampleConfig,
        pipeline: &rl4pix_model::pipeline::InstructPix2Pix,
    ) -> Self {
        if sample.use_model_guidance {
            Self {
                text: pipeline.guidance_defaults.guidance_scale,
                image: pipeline.guidance_defaults.image_guidance_scale,
            }
        } else {
            Self {
                text: sample.guidance_scale,
                image: sample.image_guidance_scale,
            }
        }
    }
}

/// A batch of trajectories (B samples, T steps).
pub struct Trajectories {
    /// Index into the prompt list of each sample.
    pub prompts: Vec<usize>,
    /// x_t before each step: (B, T, C, h, w).
    pub latents: Tensor,
    /// x_{t-1} after each step: (B, T, C, h, w).
    pub next_latents: Tensor,
    /// log p(x_{t-1} | x_t) at sampling time: (B, T), f32.
    pub log_probs: Tensor,
    pub images: Vec<RgbImage>,
    /// The instruction's cross-attention map per sample, on the latent grid (row-major).
    pub attention: Vec<Vec<f32>>,
    pub grid: (usize, usize),
}

impl Trajectories {
    pub fn len(&self) -> usize {
        self.prompts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.prompts.is_empty()
    }

    /// Concatenates batches along the sample axis.
    pub fn concat(parts: Vec<Trajectories>) -> Result<Trajectories> {
        let grid = parts
            .first()
            .map(|p| p.grid)
            .ok_or_else(|| DdpoError::Invalid("no trajectories".into()))?;
        let cat = |f: &dyn Fn(&Trajectories) -> &Tensor| -> Result<Tensor> {
            let ts: Vec<&Tensor> = parts.iter().map(f).collect();
            Ok(Tensor::cat(&ts, 0)?)
        };
        let latents = cat(&|p| &p.latents)?;
        let next_latents = cat(&|p| &p.next_latents)?;
        let log_probs = cat(&|p| &p.log_probs)?;
        let mut out = Trajectories {
            prompts: Vec::new(),
            latents,
            next_latents,
            log_probs,
            images: Vec::new(),
            attention: Vec::new(),
            grid,
        };
        for p in parts {
            out.prompts.extend(p.prompts);
            out.images.extend(p.images);
            out.attention.extend(p.attention);
        }
        Ok(out)
    }
}

/// The edit requests of some prompts (guidance per `guidance`; the seed is unused here).
pub fn requests<'a>(
    prompts: &'a [PromptItem],
    indices: &[usize],
    guidance: Guidance,
    scheduler: &DdimScheduler,
) -> Vec<EditRequest<'a>> {
    indices
        .iter()
        .map(|&i| EditRequest {
            image: &prompts[i].source,
            instruction: &prompts[i].instruction,
            params: EditParams {
                steps: scheduler.timesteps().len(),
                guidance_scale: guidance.text,
                image_guidance_scale: guidance.image,
                seed: 0,
                scheduler: None,
                eta: scheduler.eta(),
                capture_attention: true,
            },
            init_latents: None,
        })
        .collect()
}

/// Samples one batch: `indices` into `prompts`, `seeds` one per sample (initial and per-step
/// noise come from the sample's own generator, so a sample never depends on its batch).
///
/// The loop is the pipeline's own denoising loop spelled out, from the same pieces
/// (`condition`, `initial_noise`, `guided_noise_pred`, `average_layers`, `decode_latents`), because
/// `InstructPix2Pix::edit_batch` keeps each step's input, output and noise to itself: DDPO needs
/// x_t, x_{t-1} and log p(x_{t-1} | x_t) of every step, which only `DdimScheduler::step_batched`
/// returns. DDIM's `scale_model_input` is the identity and its initial sigma 1, which is why
/// neither appears here.
#[allow(clippy::too_many_arguments)]
pub fn sample_batch(
    pipeline: &InstructPix2Pix,
    scheduler: &DdimScheduler,
    prompts: &[PromptItem],
    indices: &[usize],
    seeds: &[u64],
    guidance: Guidance,
    adapter: &Arc<ResolvedAdapter>,
    attention_source: AttentionSource,
) -> Result<Trajectories> {
    let b = indices.len();
    let first = prompts
        .get(
            *indices
                .first()
                .ok_or_else(|| DdpoError::Invalid("empty batch".into()))?,
        )
        .ok_or_else(|| DdpoError::Invalid("prompt index out of range".into()))?;
    let (w, h) = first.source.dimensions();
    let factor = pipeline.vae_scale_factor();
    let (lh, lw) = (h as usize / factor, w as usize / factor);
    let reqs = requests(prompts, indices, guidance, scheduler);
    let cond = pipeline.condition(&reqs, (w, h))?;
    let mut rngs: Vec<ChaCha8Rng> = seeds
        .iter()
        .map(|&s| ChaCha8Rng::seed_from_u64(s))
        .collect();
    let mut latents = pipeline.initial_noise(&reqs, &mut rngs, (lh, lw))?;
    let channels = latents.dim(1)?;
    let adapters = [adapter.clone()];
    let captured = RefCell::new(Vec::<CapturedAttention>::new());
    let mut token_maps: Option<Tensor> = None;
    let steps = scheduler.timesteps().len();
    let (mut xs, mut next_xs, mut log_probs) = (Vec::new(), Vec::new(), Vec::new());
    for step in 0..steps {
        let t = scheduler.timesteps()[step] as f64;
        let ctx = ForwardCtx {
            adapters: &adapters,
            capture: (attention_source == AttentionSource::Policy).then_some(&captured),
        };
        let pred = pipeline.guided_noise_pred(&cond, &latents, &vec![t; b], ctx)?;
        if attention_source == AttentionSource::Base {
            base_attention(pipeline, &cond, &latents, t, &captured)?;
        }
        let noise = rngs
            .iter_mut()
            .map(|rng| {
                gaussian(
                    rng,
                    (1, channels, lh, lw),
                    pipeline.dtype(),
                    pipeline.device(),
                )
            })
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let noise = Tensor::cat(&noise, 0)?;
        let out = scheduler.step_batched(&pred, &vec![step; b], &latents, Some(&noise))?;
        let log_prob = out.log_prob.ok_or_else(|| {
            DdpoError::Invalid(format!(
                "DDIM step {step} (timestep {t}) is deterministic (std 0), so it has no log-probability; \
                 DDPO needs eta > 0 and set_alpha_to_one = false in the scheduler config"
            ))
        })?;
        xs.push(latents.clone());
        next_xs.push(out.prev_sample.clone());
        log_probs.push(log_prob.to_dtype(DType::F32)?);
        let layers = std::mem::take(&mut *captured.borrow_mut());
        let step_maps = average_layers(&layers, b, lh, lw)?;
        token_maps = Some(match token_maps {
            Some(acc) => (acc + step_maps)?,
            None => step_maps,
        });
        latents = out.prev_sample;
    }
    let images = pipeline.decode_latents(&latents)?;
    let token_maps = match token_maps {
        Some(m) => (m / steps as f64)?,
        None => return Err(DdpoError::Invalid("no sampling steps".into())),
    };
    let mut attention = Vec::with_capacity(b);
    for (i, prompt) in cond.prompts.iter().enumerate() {
        let maps = AttentionMaps {
            prompt: prompt.clone(),
            per_token: token_maps.get(i)?.to_dtype(DType::F32)?,
            height: lh,
            width: lw,
        };
        attention.push(maps.instruction_map()?);
    }
    Ok(Trajectories {
        prompts: indices.to_vec(),
        latents: Tensor::stack(&xs, 1)?,
        next_latents: Tensor::stack(&next_xs, 1)?,
        log_probs: Tensor::stack(&log_probs, 1)?,
        images,
        attention,
        grid: (lh, lw),
    })
}

/// Runs the frozen base UNet's text+image branch alone (a third of a guided call) on `latents`
/// at timestep `t`, appending its cross-attention to `captured`; the conditional branch is the one
/// `average_layers` keeps.
fn base_attention(
    pipeline: &InstructPix2Pix,
    cond: &Conditioning,
    latents: &Tensor,
    t: f64,
    captured: &RefCell<Vec<CapturedAttention>>,
) -> Result<()> {
    let b = latents.dim(0)?;
    let model_in = Tensor::cat(&[latents, &cond.image_cond.narrow(0, 0, b)?], 1)?;
    let context = cond.context.narrow(0, 0, b)?;
    let timesteps = Tensor::from_vec(vec![t as f32; b], b, pipeline.device())?;
    let ctx = ForwardCtx {
        adapters: &[],
        capture: Some(captured),
    };
    pipeline
        .unet
        .forward_with(&model_in, &timesteps, &context, ctx)?;
    Ok(())
}

/// The mean of each recorded step's Gaussian under `pred` (B, C, h, w): where the step goes with
/// no noise.
pub fn step_mean(
    scheduler: &DdimScheduler,
    pred: &Tensor,
    step_indices: &[usize],
    latents: &Tensor,
) -> Result<Tensor> {
    let zeros = latents.zeros_like()?;
    Ok(scheduler
        .step_batched(pred, step_indices, latents, Some(&zeros))?
        .prev_sample)
}

/// The guided prediction of the frozen base UNet (no adapter, no graph) at recorded steps.
pub fn base_prediction(
    pipeline: &InstructPix2Pix,
    scheduler: &DdimScheduler,
    cond: &Conditioning,
    latents: &Tensor,
    step_indices: &[usize],
) -> Result<Tensor> {
    Ok(prediction_at_steps(pipeline, scheduler, cond, latents, step_indices, &[])?.detach())
}

/// The guided UNet prediction at the recorded steps `step_indices` under `adapters`.
fn prediction_at_steps(
    pipeline: &InstructPix2Pix,
    scheduler: &DdimScheduler,
    cond: &Conditioning,
    latents: &Tensor,
    step_indices: &[usize],
    adapters: &[Arc<ResolvedAdapter>],
) -> Result<Tensor> {
    let timesteps: Vec<f64> = step_indices
        .iter()
        .map(|&s| scheduler.timesteps()[s] as f64)
        .collect();
    let ctx = ForwardCtx {
        adapters,
        capture: None,
    };
    Ok(pipeline.guided_noise_pred(cond, latents, &timesteps, ctx)?)
}

/// KL(policy step || base step) per sample (B,), as a mean over latent elements like the
/// log-probabilities: both Gaussians share the step's std, so it is
/// log p_base(mu_base) - log p_policy(mu_base) = |mu_policy - mu_base|^2 / (2 sigma^2).
/// Differentiable w.r.t. `policy_pred`.
pub fn kl_to_base(
    scheduler: &DdimScheduler,
    policy_pred: &Tensor,
    base_pred: &Tensor,
    step_indices: &[usize],
    latents: &Tensor,
) -> Result<Tensor> {
    let base_mean = step_mean(scheduler, base_pred, step_indices, latents)?;
    let at_base = scheduler.log_prob(base_pred, step_indices, latents, &base_mean)?;
    let at_policy = scheduler.log_prob(policy_pred, step_indices, latents, &base_mean)?;
    Ok((at_base - at_policy)?.to_dtype(DType::F32)?)
}

/// The guided prediction under an adapter (differentiable w.r.t. its variables).
pub fn policy_prediction(
    pipeline: &InstructPix2Pix,
    scheduler: &DdimScheduler,
    cond: &Conditioning,
    latents: &Tensor,
    step_indices: &[usize],
    adapter: &Arc<ResolvedAdapter>,
) -> Result<Tensor> {
    let adapters = [adapter.clone()];
    prediction_at_steps(pipeline, scheduler, cond, latents, step_indices, &adapters)
}

/// log p(next | latents) (B,) for samples at per-sample step indices under the current adapter;
/// differentiable w.r.t. the adapter's variables.
pub fn recompute_log_prob(
    pipeline: &InstructPix2Pix,
    scheduler: &DdimScheduler,
    cond: &Conditioning,
    latents: &Tensor,
    next_latents: &Tensor,
    step_indices: &[usize],
    adapter: &Arc<ResolvedAdapter>,
) -> Result<Tensor> {
    let timesteps: Vec<f64> = step_indices
        .iter()
        .map(|&s| scheduler.timesteps()[s] as f64)
        .collect();
    let adapters = [adapter.clone()];
    let ctx = ForwardCtx {
        adapters: &adapters,
        capture: None,
    };
    let pred = pipeline.guided_noise_pred(cond, latents, &timesteps, ctx)?;
    Ok(scheduler
        .log_prob(&pred, step_indices, latents, next_latents)?
        .to_dtype(DType::F32)?)
}
