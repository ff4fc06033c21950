//! `pretrain-clip`: a small CLIP (vision and text transformers with projections, transformers'
//! `CLIPModel` layout) trained contrastively on the synthetic world, so CLIP-T can be measured on
//! it. Pairs are an edit's target image with its local description; near-miss descriptions and
//! the edit's source image are the hard negatives.
//! The exported folder is what [`crate::metrics::ClipScorer::load`] reads.

use std::path::{Path, PathBuf};

use candle_core::{Device, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder, VarMap};
use image::RgbImage;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rl4pix_model::text_encoder::ClipTextConfig;
use rl4pix_model::tokenizer::ClipTokenizer;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::text::{
    encode_batch, layer_norm, text_config, world_vocabulary, write_tokenizer, Layer,
    TrainTextEncoder,
};
use super::Cadence;
use super::{checkpoint, io_error, write_json, LoopSpec, PretrainError, Result, TrainState};
use crate::optim::{named_vars, AdamW, AdamWParams};
use crate::synth::{describes, near_miss_description, Scene, SynthWorld};

const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ClipTrainConfig {
    pub size: u32,
    pub seed: u64,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub patch: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub projection: usize,
    pub max_length: usize,
    /// Near-miss descriptions added as extra negatives per pair (runs made before they existed
    /// had none).
    #[serde(default)]
    pub hard_negatives: usize,
}

impl Default for ClipTrainConfig {
    fn default() -> Self {
        Self {
            size: 32,
            seed: 5,
            steps: 1500,
            batch: 64,
            lr: 1e-3,
            warmup: 100,
            patch: 4,
            hidden: 64,
            layers: 2,
            heads: 4,
            projection: 64,
            // The world's local descriptions are at most 8 words (+ BOS and EOS).
            max_length: 16,
            hard_negatives: 1,
        }
    }
}

/// Trainable `CLIPVisionTransformer` with `CLIPModel`'s weight names.
struct TrainVision {
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_norm: LayerNorm,
    layers: Vec<Layer>,
    post_norm: LayerNorm,
    patch: usize,
    heads: usize,
}

impl TrainVision {
    fn new(vb: VarBuilder, c: &ClipTrainConfig) -> candle_core::Result<Self> {
        let d = c.hidden;
        let p = c.patch;
        let emb = vb.pp("embeddings");
        let positions = (c.size as usize / p).pow(2) + 1;
        let init = candle_nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Ok(Self {
            patch_weight: emb.get_with_hints(
                (d, 3, p, p),
                "patch_embedding.weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?,
            class_embedding: emb.get_with_hints(d, "class_embedding", init)?,
            position_embedding: emb.get_with_hints(
                (positions, d),
                "position_embedding.weight",
                init,
            )?,
            pre_norm: candle_nn::layer_norm(d, 1e-5, vb.pp("pre_layrnorm"))?,
            layers: (0..c.layers)
                .map(|i| Layer::new(vb.pp("encoder").pp("layers").pp(i), d, 4 * d, 1e-5))
                .collect::<candle_core::Result<Vec<_>>>()?,
            post_norm: candle_nn::layer_norm(d, 1e-5, vb.pp("post_layernorm"))?,
            patch: p,
            heads: c.heads,
        })
    }

    fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (b, c, h, _) = pixels.dims4()?;
        let p = self.patch;
        let grid = h / p;
        let d = self.class_embedding.dim(0)?;
        let patches = pixels
            .reshape((b, c, grid, p, grid, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * grid * grid, c * p * p))?;
        let weight = self.patch_weight.reshape((d, c * p * p))?;
        let embeds = patches.matmul(&weight.t()?)?.reshape((b, grid * grid, d))?;
        let class = self
            .class_embedding
            .reshape((1, 1, d))?
            .broadcast_as((b, 1, d))?;
        let mut x = Tensor::cat(&[&class, &embeds], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        x = layer_norm(&self.pre_norm, &x)?;
        for layer in &self.layers {
            x = layer.forward(&x, self.heads, None)?;
        }
        layer_norm(&self.post_norm, &x.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

struct TrainClip {
    vision: TrainVision,
    text: TrainTextEncoder,
    visual_projection: Linear,
    text_projection: Linear,
    logit_scale: Tensor,
}

impl TrainClip {
    fn new(
        vb: VarBuilder,
        c: &ClipTrainConfig,
        text: &ClipTextConfig,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            vision: TrainVision::new(vb.pp("vision_model"), c)?,
            text: TrainTextEncoder::new(vb.pp("text_model"), text)?,
            visual_projection: candle_nn::linear_no_bias(
                c.hidden,
                c.projection,
                vb.pp("visual_projection"),
            )?,
            text_projection: candle_nn::linear_no_bias(
                text.hidden_size,
                c.projection,
                vb.pp("text_projection"),
            )?,
            logit_scale: vb.get_with_hints(
                (),
                "logit_scale",
                candle_nn::Init::Const((1.0f64 / 0.07).ln()),
            )?,
        })
    }

    fn embeddings(&self, pixels: &Tensor, ids: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let image = self
            .visual_projection
            .forward(&self.vision.forward(pixels)?)?;
        let hidden = self.text.forward(ids)?;
        let text = self
            .text_projection
            .forward(&self.text.pooled(ids, &hidden)?)?;
        let normalise = |x: Tensor| -> candle_core::Result<Tensor> {
            let norm = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?;
            x.broadcast_div(&norm)
        };
        Ok((normalise(image)?, normalise(text)?))
    }
}

/// CLIP's pixel values of same-sized images: [0,1], normalised by CLIP's mean and std.
fn pixel_values(images: &[&RgbImage], device: &Device) -> candle_core::Result<Tensor> {
    let (w, h) = images[0].dimensions();
    let mut data = Vec::with_capacity(images.len() * 3 * (w * h) as usize);
    for image in images {
        for c in 0..3 {
            data.extend(
                image
                    .pixels()
                    .map(|p| (p.0[c] as f32 / 255.0 - CLIP_MEAN[c]) / CLIP_STD[c]),
            );
        }
    }
    Tensor::from_vec(data, (images.len(), 3, h as usize, w as usize), device)
}

/// A training batch: edit targets with their local descriptions (what CLIP-T scores) and the
/// scenes they show (to tell which other texts are also true of them); near-miss texts, false of
/// the image they were made from; and the edits' sources where the description is false of them
/// (the same scene without the change: the hardest negative image there is).
struct ClipBatch {
    images: Vec<RgbImage>,
    texts: Vec<String>,
    scenes: Vec<Scene>,
    near_misses: Vec<String>,
    negative_images: Vec<RgbImage>,
    negative_scenes: Vec<Scene>,
}

fn pairs(
    world: &SynthWorld,
    rng: &mut ChaCha8Rng,
    count: usize,
    hard_negatives: usize,
) -> ClipBatch {
    let mut batch = ClipBatch {
        images: Vec::with_capacity(count),
        texts: Vec::with_capacity(count),
        scenes: Vec::with_capacity(count),
        near_misses: Vec::with_capacity(count * hard_negatives),
        negative_images: Vec::new(),
        negative_scenes: Vec::new(),
    };
    // Every turn of this world has a local description; the bound only guards against a world
    // that stops giving them (a smaller batch then, never a hang).
    for _ in 0..count * 20 {
        if batch.images.len() == count {
            break;
        }
        let sample = world.random_turn(rng);
        let Some(text) = sample.turn.local_description.clone() else {
            continue;
        };
        for _ in 0..hard_negatives {
            batch
                .near_misses
                .push(near_miss_description(&sample.after, rng));
        }
        if hard_negatives > 0 && !describes(&sample.before, &text) {
            batch.negative_images.push(sample.turn.source);
            batch.negative_scenes.push(sample.before);
        }
        batch.texts.push(text);
        batch.images.push(sample.turn.target);
        batch.scenes.push(sample.after);
    }
    batch
}

/// Whether `text` is true of `scene`, whose own paired text is `own`.
fn holds(scene: &Scene, own: &str, text: &str) -> bool {
    text == own || describes(scene, text)
}

/// Contrastive targets of one direction: rows are the queries, columns the candidates;
/// `positive[i][j]` marks the right answers, `excluded[i][j]` candidates that are also true and so
/// neither right nor wrong (left out of the softmax).
fn contrastive_loss(
    logits: &Tensor,
    positive: Vec<f32>,
    excluded: Vec<bool>,
) -> candle_core::Result<Tensor> {
    let (rows, cols) = logits.dims2()?;
    let device = logits.device();
    let positive = Tensor::from_vec(positive, (rows, cols), device)?;
    let excluded: Vec<f32> = excluded
        .into_iter()
        .map(|out| if out { -1e4 } else { 0.0 })
        .collect();
    let excluded = Tensor::from_vec(excluded, (rows, cols), device)?;
    let target = positive.broadcast_div(&positive.sum_keepdim(1)?)?;
    (candle_nn::ops::log_softmax(&(logits + excluded)?, 1)? * target)?
        .sum(1)?
        .mean_all()?
        .neg()
}

pub struct ClipRun {
    pub run_dir: PathBuf,
    pub config: ClipTrainConfig,
    pub resume: Option<PathBuf>,
    /// How often it checkpoints, logs and evaluates.
    pub cadence: Cadence,
    pub device: Device,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipSummary {
    pub final_loss: f64,
    /// How often a target's own local description ranks first among 8 (its own and 7 of other
    /// targets, all different), on held-out edits.
    pub top1_of_8: f64,
    /// The same when the 7 others are also false of the target ("empty background in the top
    /// left" is true of most scenes, so the first protocol counts ties the model cannot break).
    pub top1_of_8_distinguishable: f64,
    pub steps_per_second: f64,
    pub model_dir: PathBuf,
}

/// Top-1 of 8 on `groups` groups of 8 held-out edits whose descriptions all differ; with
/// `distinguishable`, also no description is true of another edit's target.
fn top1_of_8(
    model: &TrainClip,
    tokenizer: &ClipTokenizer,
    world: &SynthWorld,
    groups: usize,
    distinguishable: bool,
    device: &Device,
) -> Result<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(world.seed ^ 0xc11f_7e57);
    let mut correct = 0usize;
    for _ in 0..groups {
        let mut images = Vec::with_capacity(8);
        let mut scenes = Vec::with_capacity(8);
        let mut texts: Vec<String> = Vec::with_capacity(8);
        while images.len() < 8 {
            let sample = world.random_turn(&mut rng);
            let text = sample.turn.local_description.unwrap_or_default();
            if text.is_empty() || texts.contains(&text) {
                continue;
            }
            if distinguishable
                && (scenes
                    .iter()
                    .any(|scene| crate::synth::describes(scene, &text))
                    || texts
                        .iter()
                        .any(|other| crate::synth::describes(&sample.after, other)))
            {
                continue;
            }
            texts.push(text);
            scenes.push(sample.after);
            images.push(sample.turn.target);
        }
        let pixels = pixel_values(&images.iter().collect::<Vec<_>>(), device)?;
        let ids = encode_batch(
            tokenizer,
            &texts.iter().map(String::as_str).collect::<Vec<_>>(),
            device,
        )?;
        let (image, text) = model.embeddings(&pixels, &ids)?;
        let sims: Vec<Vec<f32>> = image.matmul(&text.t()?)?.to_vec2()?;
        for (i, row) in sims.iter().enumerate() {
            let best = row
                .iter()
                .enumerate()
                .fold(
                    (0, f32::NEG_INFINITY),
                    |acc, (j, &v)| if v > acc.1 { (j, v) } else { acc },
                )
                .0;
            correct += usize::from(best == i);
        }
    }
    Ok(correct as f64 / (8 * groups) as f64)
}

pub fn train(run: &ClipRun) -> Result<ClipSummary> {
    let config = &run.config;
    let device = &run.device;
    let world = SynthWorld::new(config.size, config.seed);
    std::fs::create_dir_all(&run.run_dir).map_err(io_error(&run.run_dir))?;
    let tokenizer_dir = run.run_dir.join("tokenizer");
    let (vocab, _) = world_vocabulary(&world, 20_000);
    write_tokenizer(&tokenizer_dir, &vocab, config.max_length)?;
    let tokenizer = ClipTokenizer::from_dir(&tokenizer_dir)?;
    let mut text_json = text_config(
        vocab.len() + 3,
        config.hidden,
        config.layers,
        config.heads,
        config.max_length,
    );
    text_json["projection_dim"] = json!(config.projection);
    let text_cfg: ClipTextConfig = serde_json::from_value(text_json.clone())
        .map_err(|e| PretrainError::Config(format!("clip text config: {e}")))?;

    let varmap = VarMap::new();
    let vb = super::init::seeded_var_builder(&varmap, config.seed, device);
    let model = TrainClip::new(vb, config, &text_cfg)?;
    let params = AdamWParams {
        weight_decay: 0.1,
        ..AdamWParams::with_lr(config.lr)
    };
    let mut optimizer = AdamW::new(named_vars(&varmap), params)?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let config_json = super::config_json("clip", config)?;
    let mut state = TrainState::new(&varmap, &mut optimizer, None, &mut rng);
    state.resume_from("clip", run.resume.as_deref(), &config_json, device)?;
    let spec = LoopSpec::cosine(
        &run.run_dir,
        "clip",
        (config.steps, config.lr, config.warmup),
        run.cadence,
        None,
        config_json,
    );
    let summary = super::train_loop(
        &spec,
        state,
        |rng| {
            let batch = pairs(&world, rng, config.batch, config.hard_negatives);
            let images: Vec<&RgbImage> =
                batch.images.iter().chain(&batch.negative_images).collect();
            let pixels = pixel_values(&images, device)?;
            let all_texts: Vec<&str> = batch
                .texts
                .iter()
                .chain(&batch.near_misses)
                .map(String::as_str)
                .collect();
            let ids = encode_batch(&tokenizer, &all_texts, device)?;
            let (image, text) = model.embeddings(&pixels, &ids)?;
            let scale = model.logit_scale.clamp(0.0, 4.6)?.exp()?;
            let b = batch.texts.len();
            let logits = image.matmul(&text.t()?)?.broadcast_mul(&scale)?;
            // Image to text, for the paired images: their own text (and copies of it) is right;
            // another text that also holds ("empty background in the top left" holds in most
            // scenes) is left out rather than pushed away; the rest, near misses included, wrong.
            let mut positive = Vec::new();
            let mut excluded = Vec::new();
            for (scene, own) in batch.scenes.iter().zip(&batch.texts) {
                for text in &all_texts {
                    let same = *text == own.as_str();
                    positive.push(f32::from(u8::from(same)));
                    excluded.push(!same && holds(scene, own, text));
                }
            }
            let loss_i = contrastive_loss(&logits.narrow(0, 0, b)?, positive, excluded)?;
            // Text to image, for the paired texts, over every image (the sources included).
            let mut positive = Vec::new();
            let mut excluded = Vec::new();
            for own in &batch.texts {
                for (scene, other) in batch.scenes.iter().zip(&batch.texts) {
                    let same = other == own;
                    positive.push(f32::from(u8::from(same)));
                    excluded.push(!same && holds(scene, other, own));
                }
                for scene in &batch.negative_scenes {
                    positive.push(0.0);
                    excluded.push(describes(scene, own));
                }
            }
            let loss_t = contrastive_loss(
                &logits.narrow(1, 0, b)?.t()?.contiguous()?,
                positive,
                excluded,
            )?;
            super::backprop(&((loss_i + loss_t)? * 0.5)?)
        },
        |_| {
            Ok(json!({
                "top1_of_8": top1_of_8(&model, &tokenizer, &world, 16, false, device)?,
                "top1_of_8_distinguishable": top1_of_8(&model, &tokenizer, &world, 16, true, device)?,
            }))
        },
    )?;
    let top1 = top1_of_8(&model, &tokenizer, &world, 64, false, device)?;
    let top1_distinguishable = top1_of_8(&model, &tokenizer, &world, 64, true, device)?;
    let model_dir = run.run_dir.join("clip");
    export(&varmap, config, &text_json, &tokenizer_dir, &model_dir)?;
    let out = ClipSummary {
        final_loss: summary.final_loss,
        top1_of_8: top1,
        top1_of_8_distinguishable: top1_distinguishable,
        steps_per_second: summary.steps_per_second(),
        model_dir,
    };
    write_json(&run.run_dir.join("clip.summary.json"), &out)?;
    Ok(out)
}

/// Writes a transformers `CLIPModel` folder: config.json, model.safetensors, tokenizer files and
/// preprocessor_config.json (no resize or crop: the world's images are already the input size).
fn export(
    varmap: &VarMap,
    c: &ClipTrainConfig,
    text_json: &serde_json::Value,
    tokenizer_dir: &Path,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    write_json(
        &dir.join("config.json"),
        &json!({
            "architectures": ["CLIPModel"],
            "model_type": "clip",
            "projection_dim": c.projection,
            "logit_scale_init_value": 2.6592,
            "text_config": text_json,
            "vision_config": {
                "model_type": "clip_vision_model",
                "hidden_size": c.hidden,
                "intermediate_size": 4 * c.hidden,
                "num_hidden_layers": c.layers,
                "num_attention_heads": c.heads,
                "num_channels": 3,
                "image_size": c.size,
                "patch_size": c.patch,
                "hidden_act": "quick_gelu",
                "layer_norm_eps": 1e-5,
                "projection_dim": c.projection
            }
        }),
    )?;
    write_json(
        &dir.join("preprocessor_config.json"),
        &json!({
            "image_processor_type": "CLIPImageProcessor",
            "do_resize": false,
            "do_center_crop": false,
            "do_rescale": true,
            "rescale_factor": 1.0 / 255.0,
            "do_normalize": true,
            "image_mean": CLIP_MEAN,
            "image_std": CLIP_STD,
            "crop_size": {"height": c.size, "width": c.size},
            "size": {"shortest_edge": c.size}
        }),
    )?;
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        let from = tokenizer_dir.join(name);
        std::fs::copy(&from, dir.join(name)).map_err(io_error(&from))?;
    }
    let tensors = checkpoint::varmap_tensors(varmap);
    let path = dir.join("model.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| PretrainError::Checkpoint {
        path,
        message: e.to_string(),
    })
}
