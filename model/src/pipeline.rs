//! The InstructPix2Pix editing pipeline: image + instruction -> edited image, with three-way
//! classifier-free guidance, per-request seeds and guidance inside one batch, optional
//! cross-attention capture and LoRA adapters.

use std::cell::RefCell;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, D};
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::adapter::{LoraAdapter, LoraTargets};
use crate::attention::{CapturedAttention, ForwardCtx};
use crate::config::read_json;
use crate::error::{ModelError, Result};
use crate::image_io;
use crate::lora::{LoraDelta, ResolvedAdapter};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::text_encoder::ClipTextEncoder;
use crate::tokenizer::{ClipTokenizer, TokenizedPrompt};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKl;
use crate::weights::WeightStorage;

/// Settings of one edit. Defaults are InstructPix2Pix's.
#[derive(Debug, Clone, PartialEq)]
pub struct EditParams {
    pub steps: usize,
    pub guidance_scale: f64,
    pub image_guidance_scale: f64,
    /// Seeds the initial noise and any per-step noise (Euler ancestral, DDIM with eta > 0).
    pub seed: u64,
    /// `None`: the model's own scheduler (`scheduler/scheduler_config.json`).
    pub scheduler: Option<SchedulerKind>,
    /// DDIM only.
    pub eta: f64,
    /// Record the instruction's cross-attention maps.
    pub capture_attention: bool,
}

impl Default for EditParams {
    fn default() -> Self {
        Self {
            steps: 20,
            guidance_scale: 7.5,
            image_guidance_scale: 1.5,
            seed: 0,
            scheduler: None,
            eta: 0.0,
            capture_attention: false,
        }
    }
}

/// One edit of a batch.
#[derive(Clone)]
pub struct EditRequest<'a> {
    pub image: &'a RgbImage,
    pub instruction: &'a str,
    pub params: EditParams,
    /// Initial noise (1, C, H/f, W/f), as diffusers' `latents=` argument; replaces the seeded draw.
    pub init_latents: Option<Tensor>,
}

/// Cross-attention of the instruction, averaged over heads, attn2 layers (each resized to the
/// latent grid) and sampling steps, for the conditional (text + image) branch.
#[derive(Debug, Clone)]
pub struct AttentionMaps {
    pub prompt: TokenizedPrompt,
    /// (tokens, h, w) for every token position of the prompt (BOS, words, EOS, padding).
    pub per_token: Tensor,
    pub height: usize,
    pub width: usize,
}

impl AttentionMaps {
    /// Mean over the instruction's own tokens (no BOS/EOS/padding), row-major (h * w).
    pub fn instruction_map(&self) -> Result<Vec<f32>> {
        self.mean_over(self.prompt.content.clone())
    }

    /// Mean over the tokens of one word of the instruction (case-insensitive), if present.
    pub fn word_map(&self, word: &str) -> Result<Option<Vec<f32>>> {
        let span = self
            .prompt
            .words
            .iter()
            .find(|w| w.word.eq_ignore_ascii_case(word) && !w.tokens.is_empty());
        match span {
            Some(span) => Ok(Some(self.mean_over(span.tokens.clone())?)),
            None => Ok(None),
        }
    }

    /// Mean over the token positions `tokens` of the padded prompt, row-major (h * w).
    pub fn mean_over(&self, tokens: std::ops::Range<usize>) -> Result<Vec<f32>> {
        if tokens.is_empty() {
            // An empty instruction attends nowhere in particular: a flat map.
            return Ok(vec![0.0; self.height * self.width]);
        }
        Ok(self
            .per_token
            .narrow(0, tokens.start, tokens.len())?
            .mean(0)?
            .flatten_all()?
            .to_vec1::<f32>()?)
    }
}

pub struct EditOutput {
    pub image: RgbImage,
    pub attention: Option<AttentionMaps>,
    /// Final latents (1, C, h, w) before decoding.
    pub latents: Tensor,
}

/// Everything a batch's denoising steps condition on, for the three guidance branches.
pub struct Conditioning {
    /// Text embeddings (3B, T, D): [instruction, empty, empty].
    pub context: Tensor,
    /// Image latents (3B, C, h, w): [image, image, zeros].
    pub image_cond: Tensor,
    /// The source images' latents (B, C, h, w).
    pub image_latents: Tensor,
    g_text: Tensor,
    g_image: Tensor,
    w_uncond: Tensor,
    /// The tokenized instructions, for attention maps.
    pub prompts: Vec<TokenizedPrompt>,
}

/// A loaded InstructPix2Pix model in the diffusers layout.
pub struct InstructPix2Pix {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextEncoder,
    pub vae: AutoencoderKl,
    pub unet: UNet2DConditionModel,
    pub scheduler_config: SchedulerConfig,
    pub default_scheduler: SchedulerKind,
    /// The guidance this model was tuned for (`model_index.json` → `rl4pix.sampling`), else
    /// InstructPix2Pix's 7.5 / 1.5.
    pub guidance_defaults: GuidanceDefaults,
    pub model_dir: PathBuf,
    device: Device,
    dtype: DType,
}

/// Guidance scales a model folder recommends for itself: what `edit`, `eval` and the server use
/// when a request does not say.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
pub struct GuidanceDefaults {
    pub guidance_scale: f64,
    pub image_guidance_scale: f64,
}

impl Default for GuidanceDefaults {
    fn default() -> Self {
        let params = EditParams::default();
        Self {
            guidance_scale: params.guidance_scale,
            image_guidance_scale: params.image_guidance_scale,
        }
    }
}

/// Where [`GuidanceDefaults`] live in `model_index.json`.
const SAMPLING_DEFAULTS_KEY: &str = "rl4pix.sampling";

impl GuidanceDefaults {
    fn from_index(index_path: &Path, section: Option<Rl4pixIndex>) -> Result<Self> {
        let defaults = section
            .and_then(|section| section.sampling)
            .unwrap_or_default();
        for (key, value) in [
            ("guidance_scale", defaults.guidance_scale),
            ("image_guidance_scale", defaults.image_guidance_scale),
        ] {
            if !(value.is_finite() && (0.0..=100.0).contains(&value)) {
                return Err(crate::config::unsupported(
                    index_path,
                    &format!("{SAMPLING_DEFAULTS_KEY}.{key}"),
                    format!("{value} (expected a number from 0 to 100)"),
                ));
            }
        }
        Ok(defaults)
    }
}

#[derive(serde::Deserialize)]
struct ModelIndex {
    #[serde(rename = "_class_name")]
    class_name: Option<String>,
    #[serde(default)]
    rl4pix: Option<Rl4pixIndex>,
}

#[derive(serde::Deserialize)]
struct Rl4pixIndex {
    #[serde(default)]
    sampling: Option<GuidanceDefaults>,
}

impl InstructPix2Pix {
    /// Loads a diffusers pipeline folder in f32.
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        Self::load_with_dtype(dir, device, DType::F32)
    }

    pub fn load_with_dtype(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with_storage(dir, device, dtype, WeightStorage::default())
    }

    /// Loads with the weights held as `storage` says: by default an f16 checkpoint stays f16 in
    /// memory and each layer widens its weight as it runs, with outputs equal to an f32 load.
    pub fn load_with_storage(
        dir: &Path,
        device: &Device,
        dtype: DType,
        storage: WeightStorage,
    ) -> Result<Self> {
        if !dir.is_dir() {
            return Err(ModelError::InvalidArgument(format!(
                "model folder {} does not exist (expected the diffusers layout: model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/)",
                dir.display()
            )));
        }
        let index_path = dir.join("model_index.json");
        let index: ModelIndex = read_json(&index_path)?;
        if let Some(class) = &index.class_name {
            if !class.contains("InstructPix2Pix") && !class.contains("StableDiffusion") {
                return Err(crate::config::unsupported(
                    &index_path,
                    "_class_name",
                    class,
                ));
            }
        }
        let guidance_defaults = GuidanceDefaults::from_index(&index_path, index.rl4pix)?;
        let scheduler_path = dir.join("scheduler").join("scheduler_config.json");
        let scheduler_config = SchedulerConfig::from_file(&scheduler_path)?;
        let default_scheduler = match &scheduler_config.class_name {
            Some(name) => SchedulerKind::from_class_name(name)
                .ok_or_else(|| crate::config::unsupported(&scheduler_path, "_class_name", name))?,
            None => SchedulerKind::EulerAncestral,
        };
        let tokenizer = ClipTokenizer::from_dir(&dir.join("tokenizer"))?;
        let text_encoder =
            ClipTextEncoder::load_with_storage(&dir.join("text_encoder"), dtype, storage, device)?;
        let vae = AutoencoderKl::load_with_storage(&dir.join("vae"), dtype, storage, device)?;
        let unet =
            UNet2DConditionModel::load_with_storage(&dir.join("unet"), dtype, storage, device)?;
        let latent_channels = vae.config.latent_channels;
        if unet.config.in_channels != 2 * latent_channels {
            return Err(crate::config::unsupported(
                &dir.join("unet").join("config.json"),
                "in_channels",
                format!(
                    "{} (InstructPix2Pix needs 2 x the VAE's {latent_channels} latent channels)",
                    unet.config.in_channels
                ),
            ));
        }
        Ok(Self {
            tokenizer,
            text_encoder,
            vae,
            unet,
            scheduler_config,
            default_scheduler,
            guidance_defaults,
            model_dir: dir.to_path_buf(),
            device: device.clone(),
            dtype,
        })
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The VAE's spatial factor between pixels and latents.
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.scale_factor()
    }

    /// [`EditParams::default`] with the guidance scales the caller names, this model's own
    /// ([`Self::guidance_defaults`]) otherwise.
    pub fn params_with_guidance(
        &self,
        guidance_scale: Option<f64>,
        image_guidance_scale: Option<f64>,
    ) -> EditParams {
        let own = self.guidance_defaults;
        EditParams {
            guidance_scale: guidance_scale.unwrap_or(own.guidance_scale),
            image_guidance_scale: image_guidance_scale.unwrap_or(own.image_guidance_scale),
            ..EditParams::default()
        }
    }

    pub fn scheduler(&self, params: &EditParams) -> Result<Scheduler> {
        let kind = params.scheduler.unwrap_or(self.default_scheduler);
        Scheduler::new(kind, &self.scheduler_config, params.steps, params.eta)
    }

    /// What adapters for this model must fit.
    pub fn lora_targets(&self) -> LoraTargets {
        let modules = self
            .unet
            .projections()
            .entries
            .iter()
            .map(|p| (p.path.clone(), (p.in_features, p.out_features)))
            .collect();
        LoraTargets {
            modules,
            fingerprint: Some(self.unet.fingerprint().to_string()),
        }
    }

    /// Reads and validates an adapter file against this model, ready to attach or pass per request.
    pub fn load_adapter(&self, path: &Path) -> Result<Arc<ResolvedAdapter>> {
        let adapter = LoraAdapter::load(path, &self.lora_targets(), &self.device)?;
        Ok(Arc::new(self.resolve_adapter(&adapter)?))
    }

    /// Maps an adapter's layers onto the UNet's projection slots.
    pub fn resolve_adapter(&self, adapter: &LoraAdapter) -> Result<ResolvedAdapter> {
        let table = self.unet.projections();
        let mut deltas = vec![None; table.entries.len()];
        for (path, layer) in &adapter.layers {
            let slot = table.slot_of(path).ok_or_else(|| ModelError::Adapter {
                name: adapter.name.clone(),
                reason: format!("module `{path}` does not exist in this UNet"),
            })?;
            let down = layer.down.to_dtype(self.dtype)?;
            let up = layer.up.to_dtype(self.dtype)?;
            deltas[slot] = Some(LoraDelta::new(&down, &up, layer.scale)?);
        }
        Ok(ResolvedAdapter {
            name: adapter.name.clone(),
            deltas,
        })
    }

    /// Text embeddings (B, T, D) of the given prompts.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<(Tensor, Vec<TokenizedPrompt>)> {
        let mut tokenized = Vec::with_capacity(prompts.len());
        let mut ids = Vec::new();
        for p in prompts {
            let t = self.tokenizer.encode_detailed(p)?;
            ids.extend_from_slice(&t.ids);
            tokenized.push(t);
        }
        let len = self.tokenizer.max_length();
        let ids = Tensor::from_vec(ids, (prompts.len(), len), &self.device)?;
        Ok((self.text_encoder.forward(&ids)?, tokenized))
    }

    /// Image latents (posterior mode, unscaled) of images already sized to the VAE grid.
    pub fn encode_images(&self, images: &[&RgbImage]) -> Result<Tensor> {
        let tensors = images
            .iter()
            .map(|img| image_io::image_to_tensor(img, &self.device))
            .collect::<Result<Vec<_>>>()?;
        let batch = Tensor::stack(&tensors, 0)?.to_dtype(self.dtype)?;
        Ok(self.vae.encode_mode(&batch)?)
    }

    /// Decodes final latents to images.
    pub fn decode_latents(&self, latents: &Tensor) -> Result<Vec<RgbImage>> {
        let decoded = self.vae.decode(&(latents / self.vae.scaling_factor())?)?;
        image_io::tensor_to_images(&decoded)
    }

    /// One edit with the attached adapters.
    pub fn edit(
        &self,
        image: &RgbImage,
        instruction: &str,
        params: &EditParams,
    ) -> Result<EditOutput> {
        let request = EditRequest {
            image,
            instruction,
            params: params.clone(),
            init_latents: None,
        };
        let adapters = self.unet.attached_adapters();
        let mut out = self.edit_batch(&[request], &adapters, &mut |_, _| true)?;
        out.pop()
            .ok_or_else(|| ModelError::InvalidArgument("empty batch".into()))
    }

    /// Conditioning of the three guidance branches [text+image, empty+image, empty+no image]
    /// for a batch whose images are resized to `(width, height)` on the VAE grid.
    pub fn condition(&self, requests: &[EditRequest], (w, h): (u32, u32)) -> Result<Conditioning> {
        let b = requests.len();
        let mut prompts: Vec<&str> = requests.iter().map(|r| r.instruction).collect();
        prompts.push("");
        let (embeds, mut tokenized) = self.encode_prompts(&prompts)?;
        tokenized.pop();
        let text = embeds.narrow(0, 0, b)?;
        let empty = embeds
            .narrow(0, b, 1)?
            .broadcast_as(text.shape())?
            .contiguous()?;
        let context = Tensor::cat(&[&text, &empty, &empty], 0)?;
        let resized: Vec<RgbImage> = requests
            .iter()
            .map(|r| image_io::resize_if_needed(r.image, w, h))
            .collect();
        let image_latents = self.encode_images(&resized.iter().collect::<Vec<_>>())?;
        let image_cond = Tensor::cat(
            &[&image_latents, &image_latents, &image_latents.zeros_like()?],
            0,
        )?;
        let per_sample = |f: &dyn Fn(&EditParams) -> f64| -> Result<Tensor> {
            let v: Vec<f32> = requests.iter().map(|r| f(&r.params) as f32).collect();
            Ok(Tensor::from_vec(v, (b, 1, 1, 1), &self.device)?.to_dtype(self.dtype)?)
        };
        // diffusers skips guidance unless g > 1 and g_image >= 1: then the prediction is the
        // text+image branch alone, which these weights reproduce.
        let guided = |p: &EditParams| p.guidance_scale > 1.0 && p.image_guidance_scale >= 1.0;
        Ok(Conditioning {
            context,
            image_cond,
            image_latents,
            g_text: per_sample(&|p| if guided(p) { p.guidance_scale } else { 1.0 })?,
            g_image: per_sample(&|p| {
                if guided(p) {
                    p.image_guidance_scale
                } else {
                    0.0
                }
            })?,
            w_uncond: per_sample(&|p| if guided(p) { 1.0 } else { 0.0 })?,
            prompts: tokenized,
        })
    }

    /// Initial noise (B, C, h, w) before the scheduler's sigma: supplied latents, or a draw from
    /// each request's own generator.
    pub fn initial_noise(
        &self,
        requests: &[EditRequest],
        rngs: &mut [ChaCha8Rng],
        (lh, lw): (usize, usize),
    ) -> Result<Tensor> {
        let c = self.vae.config.latent_channels;
        let mut initial = Vec::with_capacity(requests.len());
        for (r, rng) in requests.iter().zip(rngs.iter_mut()) {
            let noise = match &r.init_latents {
                Some(t) => {
                    if t.dims() != [1, c, lh, lw] {
                        return Err(ModelError::Shape {
                            name: "latents".into(),
                            expected: vec![1, c, lh, lw],
                            found: t.dims().to_vec(),
                        });
                    }
                    t.to_device(&self.device)?.to_dtype(self.dtype)?
                }
                None => gaussian(rng, (1, c, lh, lw), self.dtype, &self.device)?,
            };
            initial.push(noise);
        }
        Ok(Tensor::cat(&initial, 0)?)
    }

    /// The guided noise prediction (B, C, h, w) for scheduler-scaled latents (B, C, h, w) at
    /// per-sample timesteps: one UNet call over the three branches, combined as
    /// `e_u + g_t (e_t - e_i) + g_i (e_i - e_u)`. Differentiable (DDPO trains through it).
    pub fn guided_noise_pred(
        &self,
        cond: &Conditioning,
        scaled_latents: &Tensor,
        timesteps: &[f64],
        ctx: ForwardCtx,
    ) -> Result<Tensor> {
        let b = scaled_latents.dim(0)?;
        let model_in = Tensor::cat(&[scaled_latents, scaled_latents, scaled_latents], 0)?;
        let model_in = Tensor::cat(&[&model_in, &cond.image_cond], 1)?;
        let t: Vec<f32> = timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, b, &self.device)?;
        let t = Tensor::cat(&[&t, &t, &t], 0)?;
        let noise_pred = self.unet.forward_with(&model_in, &t, &cond.context, ctx)?;
        let e_text = noise_pred.narrow(0, 0, b)?;
        let e_image = noise_pred.narrow(0, b, b)?;
        let e_uncond = noise_pred.narrow(0, 2 * b, b)?;
        // w*e_u + g_t*(e_t - e_i) + g_i*(e_i - e_u) + (1-w)*e_i: InstructPix2Pix's formula when
        // guided (w=1) and e_t alone when not (w=0, g_t=1, g_i=0).
        let pred = (e_uncond.broadcast_mul(&cond.w_uncond)?
            + (&e_text - &e_image)?.broadcast_mul(&cond.g_text)?)?;
        Ok((pred
            + (&e_image - &e_uncond)?.broadcast_mul(&cond.g_image)?
            + e_image.broadcast_mul(&(1.0 - &cond.w_uncond)?)?)?)
    }

    /// Edits a batch in one UNet call per step. Every request must share the latent size, the
    /// step count, the scheduler and eta; seeds, guidance and instructions are per request and a
    /// request's result never depends on what else is in the batch. `on_step(step, total)` is
    /// called after each step; returning false cancels the batch.
    pub fn edit_batch(
        &self,
        requests: &[EditRequest],
        adapters: &[Arc<ResolvedAdapter>],
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<EditOutput>> {
        let first = requests
            .first()
            .ok_or_else(|| ModelError::InvalidArgument("empty batch".into()))?;
        let params = &first.params;
        validate_params(params)?;
        let b = requests.len();
        let factor = self.vae_scale_factor() as u32;
        let (w, h) = image_io::size_for_vae(first.image.width(), first.image.height(), factor);
        for r in requests {
            validate_params(&r.params)?;
            let same_grid =
                image_io::size_for_vae(r.image.width(), r.image.height(), factor) == (w, h);
            if !same_grid
                || r.params.steps != params.steps
                || r.params.scheduler != params.scheduler
                || r.params.eta != params.eta
            {
                return Err(ModelError::InvalidArgument(
                    "a batch must share image grid size, steps, scheduler and eta".into(),
                ));
            }
        }
        let scheduler = self.scheduler(params)?;
        let latent_channels = self.vae.config.latent_channels;
        let (lh, lw) = ((h / factor) as usize, (w / factor) as usize);

        let cond = self.condition(requests, (w, h))?;
        let mut rngs: Vec<ChaCha8Rng> = requests
            .iter()
            .map(|r| ChaCha8Rng::seed_from_u64(r.params.seed))
            .collect();
        let shape = (1, latent_channels, lh, lw);
        let mut latents =
            (self.initial_noise(requests, &mut rngs, (lh, lw))? * scheduler.init_noise_sigma())?;

        let capture =
            params.capture_attention || requests.iter().any(|r| r.params.capture_attention);
        let captured = RefCell::new(Vec::<CapturedAttention>::new());
        let mut token_maps: Option<Tensor> = None;
        let total = scheduler.num_steps();
        for step in 0..total {
            let model_in = scheduler.scale_model_input(&latents, step)?;
            let timesteps = vec![scheduler.timestep(step); b];
            let ctx = ForwardCtx {
                adapters,
                capture: capture.then_some(&captured),
            };
            let guided_pred = self.guided_noise_pred(&cond, &model_in, &timesteps, ctx)?;
            let noise = if scheduler.needs_noise() {
                let draws = rngs
                    .iter_mut()
                    .map(|rng| gaussian(rng, shape, self.dtype, &self.device))
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&draws, 0)?)
            } else {
                None
            };
            latents = scheduler
                .step(&guided_pred, step, &latents, noise.as_ref())?
                .prev_sample;
            if capture {
                let layers = std::mem::take(&mut *captured.borrow_mut());
                let step_maps = average_layers(&layers, b, lh, lw)?;
                token_maps = Some(match token_maps {
                    Some(acc) => (acc + step_maps)?,
                    None => step_maps,
                });
            }
            if !on_step(step + 1, total) {
                return Err(ModelError::Cancelled);
            }
        }

        let images = self.decode_latents(&latents)?;
        let token_maps = match token_maps {
            Some(maps) => Some((maps / total as f64)?),
            None => None,
        };
        let mut outputs = Vec::with_capacity(b);
        for (i, (img, prompt)) in images.into_iter().zip(cond.prompts).enumerate() {
            // The output has the input's size even when the VAE grid forced a resize.
            let (in_w, in_h) = requests[i].image.dimensions();
            let image = image_io::resize_if_needed(&img, in_w, in_h);
            let attention = match &token_maps {
                Some(maps) => Some(AttentionMaps {
                    prompt,
                    per_token: maps.get(i)?.to_dtype(DType::F32)?,
                    height: lh,
                    width: lw,
                }),
                None => None,
            };
            outputs.push(EditOutput {
                image,
                attention,
                latents: latents.narrow(0, i, 1)?,
            });
        }
        Ok(outputs)
    }
}

/// Averages the captured attn2 maps of one step over layers, keeping the conditional branch:
/// (B, tokens, h, w).
pub fn average_layers(
    layers: &[CapturedAttention],
    b: usize,
    lh: usize,
    lw: usize,
) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    for layer in layers {
        let probs = layer.probs.narrow(0, 0, b)?; // (B, hw, T)
        let tokens = probs.dim(D::Minus1)?;
        let maps = probs
            .transpose(1, 2)?
            .reshape((b, tokens, layer.height, layer.width))?;
        let maps = image_io::resize_bilinear(&maps, lh, lw)?;
        sum = Some(match sum {
            Some(s) => (s + maps)?,
            None => maps,
        });
    }
    let sum =
        sum.ok_or_else(|| ModelError::InvalidArgument("this UNet has no cross-attention".into()))?;
    Ok((sum / layers.len() as f64)?)
}

fn validate_params(p: &EditParams) -> Result<()> {
    let bad = |m: String| Err(ModelError::InvalidArgument(m));
    if p.steps == 0 || p.steps > 1000 {
        return bad(format!("steps must be in 1..=1000, got {}", p.steps));
    }
    for (name, v) in [
        ("guidance_scale", p.guidance_scale),
        ("image_guidance_scale", p.image_guidance_scale),
        ("eta", p.eta),
    ] {
        if !v.is_finite() || v < 0.0 {
            return bad(format!("{name} must be a finite number >= 0, got {v}"));
        }
    }
    Ok(())
}

/// Standard normal noise from a CPU RNG, so results are identical on every device and batch.
pub fn gaussian(
    rng: &mut ChaCha8Rng,
    shape: (usize, usize, usize, usize),
    dtype: DType,
    device: &Device,
) -> Result<Tensor> {
    let n = shape.0 * shape.1 * shape.2 * shape.3;
    let data: Vec<f32> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    Ok(Tensor::from_vec(data, shape, &Device::Cpu)?
        .to_dtype(dtype)?
        .to_device(device)?)
}
