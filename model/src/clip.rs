//! The full CLIP model (transformers' `CLIPModel`: vision transformer, text transformer and the two
//! projections) for the CLIP-T metric. Loads transformers' layout: `config.json` (with `text_config`,
//! `vision_config`, `projection_dim`) and `model.safetensors` with keys `vision_model.*`,
//! `text_model.*`, `visual_projection.weight`, `text_projection.weight`.
//!
//! The text tower is the one the editing pipeline uses (`crate::text_encoder`); this file adds the
//! vision tower and the projections. Image preprocessing (resize, crop, normalise) is the caller's.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use crate::config::{read_json, unsupported};
use crate::error::{ModelError, Result};
use crate::text_encoder::{ClipTextConfig, ClipTextTransformer};

fn default_hidden_size() -> usize {
    768
}
fn default_intermediate_size() -> usize {
    3072
}
fn default_layers() -> usize {
    12
}
fn default_heads() -> usize {
    12
}
fn default_channels() -> usize {
    3
}
fn default_image_size() -> usize {
    224
}
fn default_patch_size() -> usize {
    32
}
fn default_act() -> String {
    "quick_gelu".to_string()
}
fn default_eps() -> f64 {
    1e-5
}
fn default_projection_dim() -> usize {
    512
}

/// transformers' `CLIPVisionConfig` (its defaults are ViT-B/32's).
#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    #[serde(default = "default_hidden_size")]
    pub hidden_size: usize,
    #[serde(default = "default_intermediate_size")]
    pub intermediate_size: usize,
    #[serde(default = "default_layers")]
    pub num_hidden_layers: usize,
    #[serde(default = "default_heads")]
    pub num_attention_heads: usize,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    #[serde(default = "default_patch_size")]
    pub patch_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

/// transformers' `CLIPConfig`.
#[derive(Debug, Clone)]
pub struct ClipConfig {
    pub text_config: ClipTextConfig,
    pub vision_config: ClipVisionConfig,
    pub projection_dim: usize,
}

impl ClipConfig {
    /// Reads `config.json` of a `CLIPModel`; errors name the file and key.
    pub fn from_file(path: &Path) -> Result<Self> {
        let raw: serde_json::Value = read_json(path)?;
        let section = |key: &str| -> Result<serde_json::Value> {
            raw.get(key).cloned().ok_or_else(|| ModelError::Config {
                file: path.to_path_buf(),
                message: format!("missing `{key}` (is this a CLIPModel config?)"),
            })
        };
        let config_error = |key: &str, e: serde_json::Error| ModelError::Config {
            file: path.to_path_buf(),
            message: format!("`{key}`: {e}"),
        };
        section("text_config")?;
        let text_config = ClipTextConfig::from_file(path)?;
        let vision_config: ClipVisionConfig = serde_json::from_value(section("vision_config")?)
            .map_err(|e| config_error("vision_config", e))?;
        let projection_dim = match raw.get("projection_dim") {
            None => default_projection_dim(),
            Some(v) => v
                .as_u64()
                .map(|v| v as usize)
                .ok_or_else(|| unsupported(path, "projection_dim", v))?,
        };
        let v = &vision_config;
        if v.num_attention_heads == 0 || !v.hidden_size.is_multiple_of(v.num_attention_heads) {
            return Err(unsupported(
                path,
                "vision_config.num_attention_heads",
                format!("{} (hidden_size {})", v.num_attention_heads, v.hidden_size),
            ));
        }
        if v.patch_size == 0 || !v.image_size.is_multiple_of(v.patch_size) {
            return Err(unsupported(
                path,
                "vision_config.patch_size",
                format!("{} (image_size {})", v.patch_size, v.image_size),
            ));
        }
        Activation::parse(&v.hidden_act)
            .ok_or_else(|| unsupported(path, "vision_config.hidden_act", &v.hidden_act))?;
        Ok(ClipConfig {
            text_config,
            vision_config,
            projection_dim,
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    QuickGelu,
    GeluErf,
    GeluTanh,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        match name {
            "quick_gelu" => Some(Activation::QuickGelu),
            "gelu" => Some(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
            _ => None,
        }
    }

    fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
            Activation::GeluErf => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
        }
    }
}

struct VisionAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl VisionAttention {
    fn new(vb: VarBuilder, c: &ClipVisionConfig) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        Ok(VisionAttention {
            q_proj: candle_nn::linear(d, d, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(d, d, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(d, d, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(d, d, vb.pp("out_proj"))?,
            heads: c.num_attention_heads,
            head_dim: d / c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (b, t, d) = x.dims3()?;
        let split = |y: Tensor| {
            y.reshape((b, t, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q_proj.forward(x)?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scale = (self.head_dim as f64).powf(-0.5);
        let weights = (q.matmul(&k.t()?)? * scale)?;
        let weights = candle_nn::ops::softmax_last_dim(&weights)?;
        let out = weights.matmul(&v)?.transpose(1, 2)?.reshape((b, t, d))?;
        self.out_proj.forward(&out)
    }
}

struct VisionLayer {
    layer_norm1: LayerNorm,
    self_attn: VisionAttention,
    layer_norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    activation: Activation,
}

impl VisionLayer {
    fn new(
        vb: VarBuilder,
        c: &ClipVisionConfig,
        activation: Activation,
    ) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        Ok(VisionLayer {
            layer_norm1: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            self_attn: VisionAttention::new(vb.pp("self_attn"), c)?,
            layer_norm2: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: candle_nn::linear(d, c.intermediate_size, vb.pp("mlp").pp("fc1"))?,
            fc2: candle_nn::linear(c.intermediate_size, d, vb.pp("mlp").pp("fc2"))?,
            activation,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let h = (x + self.self_attn.forward(&self.layer_norm1.forward(x)?)?)?;
        let mlp = self.fc1.forward(&self.layer_norm2.forward(&h)?)?;
        let mlp = self.fc2.forward(&self.activation.apply(&mlp)?)?;
        h + mlp
    }
}

/// transformers' `CLIPVisionTransformer`: patch embedding (a strided conv without bias, done as a
/// matmul over patches), class token, positions, pre-norm, encoder, post-norm of the class token.
pub struct ClipVisionTransformer {
    patch_weight: Tensor,
    class_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<VisionLayer>,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
}

impl ClipVisionTransformer {
    /// `vb` rooted at `vision_model`.
    pub fn new(vb: VarBuilder, c: &ClipVisionConfig) -> candle_core::Result<Self> {
        let d = c.hidden_size;
        let p = c.patch_size;
        let activation = Activation::parse(&c.hidden_act).ok_or_else(|| {
            candle_core::Error::Msg(format!("unsupported vision hidden_act `{}`", c.hidden_act))
        })?;
        let embeddings = vb.pp("embeddings");
        let patch_weight = embeddings
            .get((d, c.num_channels, p, p), "patch_embedding.weight")?
            .reshape((d, c.num_channels * p * p))?;
        let positions = (c.image_size / p).pow(2) + 1;
        let layers = (0..c.num_hidden_layers)
            .map(|i| VisionLayer::new(vb.pp("encoder").pp("layers").pp(i), c, activation))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(ClipVisionTransformer {
            patch_weight,
            class_embedding: embeddings.get(d, "class_embedding")?,
            position_embedding: embeddings.get((positions, d), "position_embedding.weight")?,
            pre_layrnorm: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers,
            post_layernorm: candle_nn::layer_norm(d, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            config: c.clone(),
        })
    }

    /// Pooled output (post-normed class token), (B, hidden), of pixel values (B, C, S, S).
    pub fn forward(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        let c = &self.config;
        let (b, channels, h, w) = pixel_values.dims4()?;
        if channels != c.num_channels || h != c.image_size || w != c.image_size {
            candle_core::bail!(
                "CLIP vision: expected pixel values (B, {}, {}, {}), got ({b}, {channels}, {h}, {w})",
                c.num_channels,
                c.image_size,
                c.image_size
            );
        }
        let p = c.patch_size;
        let grid = c.image_size / p;
        // (B, C, gh, p, gw, p) -> (B, gh, gw, C, p, p): each row one patch, in the conv's weight order.
        let patches = pixel_values
            .reshape((b, channels, grid, p, grid, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .reshape((b * grid * grid, channels * p * p))?;
        let patch_embeds =
            patches
                .matmul(&self.patch_weight.t()?)?
                .reshape((b, grid * grid, c.hidden_size))?;
        let class = self
            .class_embedding
            .reshape((1, 1, c.hidden_size))?
            .broadcast_as((b, 1, c.hidden_size))?;
        let x = Tensor::cat(&[&class, &patch_embeds], 1)?
            .broadcast_add(&self.position_embedding.unsqueeze(0)?)?;
        let mut x = self.pre_layrnorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x)?;
        }
        self.post_layernorm.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

/// transformers' `CLIPModel`: both towers and their projections into the shared embedding space.
pub struct ClipModel {
    text_model: ClipTextTransformer,
    vision_model: ClipVisionTransformer,
    visual_projection: Linear,
    text_projection: Linear,
    config: ClipConfig,
}

impl ClipModel {
    pub fn new(vb: VarBuilder, config: &ClipConfig) -> Result<Self> {
        let vision_width = config.vision_config.hidden_size;
        let text_model = ClipTextTransformer::new(vb.pp("text_model"), &config.text_config)?;
        let text_width = config.text_config.hidden_size;
        Ok(ClipModel {
            text_model,
            vision_model: ClipVisionTransformer::new(vb.pp("vision_model"), &config.vision_config)?,
            visual_projection: candle_nn::linear_no_bias(
                vision_width,
                config.projection_dim,
                vb.pp("visual_projection"),
            )?,
            text_projection: candle_nn::linear_no_bias(
                text_width,
                config.projection_dim,
                vb.pp("text_projection"),
            )?,
            config: config.clone(),
        })
    }

    /// Loads `dir/config.json` and `dir/model.safetensors` (f32).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config = ClipConfig::from_file(&dir.join("config.json"))?;
        let weights = crate::weights::find_weight_file(dir)?;
        // The metric's own layers read their weights directly: keep them all in f32.
        let vb = crate::weights::var_builder_with_storage(
            &weights,
            DType::F32,
            crate::weights::WeightStorage::Compute,
            device,
        )?;
        Self::new(vb, &config).map_err(|e| match e {
            ModelError::Candle(e) => ModelError::Weights {
                path: weights,
                message: e.to_string(),
            },
            other => other,
        })
    }

    pub fn config(&self) -> &ClipConfig {
        &self.config
    }

    /// Projected image embeddings (B, projection_dim), not normalised.
    pub fn image_embeds(&self, pixel_values: &Tensor) -> candle_core::Result<Tensor> {
        self.visual_projection
            .forward(&self.vision_model.forward(pixel_values)?)
    }

    /// Projected text embeddings (B, projection_dim) of token ids (B, T), not normalised.
    pub fn text_embeds(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_, pooled) = self.text_model.forward_with_pooled(input_ids)?;
        Ok(self.text_projection.forward(&pooled)?)
    }
}

/// Cosine similarity between rows of `a` and `b` (both (B, D)), as a (B,) tensor.
pub fn cosine_similarity(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    let norm = |x: &Tensor| x.sqr()?.sum_keepdim(D::Minus1)?.sqrt();
    let a = a.broadcast_div(&norm(a)?)?;
    let b = b.broadcast_div(&norm(b)?)?;
    (a * b)?.sum(D::Minus1)
}
