//! diffusers' `AutoencoderKL` (the Stable Diffusion VAE): encoder to the posterior mode, decoder
//! back to pixels. Weight paths mirror diffusers' module names so a `vae/` folder loads as is.

use std::path::Path;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::ops::modules::{Conv2d, GroupNorm, Linear};
use serde::Deserialize;

use crate::attention::softmax_last_dim;
use crate::config::{read_json, unsupported};
use crate::error::{ModelError, Result};
use crate::resample::{Downsample2D, Upsample2D};
use crate::resnet::{ResnetBlock2D, ResnetConfig};
use crate::weights::{component_var_builder, WeightStorage};

/// diffusers hard-codes this epsilon for every norm inside the VAE.
const VAE_NORM_EPS: f64 = 1e-6;
const ENCODER_BLOCK_TYPE: &str = "DownEncoderBlock2D";
const DECODER_BLOCK_TYPE: &str = "UpDecoderBlock2D";

/// `sample_size` is an int in SD checkpoints and an `[h, w]` pair in some newer ones; only tiling
/// uses it, so it is kept for completeness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum SampleSize {
    Square(usize),
    HeightWidth([usize; 2]),
}

/// `vae/config.json`. Missing keys take diffusers' defaults; keys we do not use (`force_upcast`,
/// `latents_mean`, ...) are ignored.
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_sample_size")]
    pub sample_size: SampleSize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_image_channels() -> usize {
    3
}
fn default_down_block_types() -> Vec<String> {
    vec![ENCODER_BLOCK_TYPE.to_string()]
}
fn default_up_block_types() -> Vec<String> {
    vec![DECODER_BLOCK_TYPE.to_string()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".to_string()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_sample_size() -> SampleSize {
    SampleSize::Square(32)
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl VaeConfig {
    /// Reads and validates `vae/config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Checks everything the model cannot build without; `file` only labels the errors.
    pub fn validate(&self, file: &Path) -> Result<()> {
        let config_error = |message: String| ModelError::Config {
            file: file.to_path_buf(),
            message,
        };
        let levels = self.block_out_channels.len();
        if levels == 0 {
            return Err(config_error("`block_out_channels` is empty".to_string()));
        }
        if let Some(kind) = self
            .down_block_types
            .iter()
            .find(|t| *t != ENCODER_BLOCK_TYPE)
        {
            return Err(unsupported(file, "down_block_types", kind));
        }
        if let Some(kind) = self
            .up_block_types
            .iter()
            .find(|t| *t != DECODER_BLOCK_TYPE)
        {
            return Err(unsupported(file, "up_block_types", kind));
        }
        for (key, count) in [
            ("down_block_types", self.down_block_types.len()),
            ("up_block_types", self.up_block_types.len()),
        ] {
            if count != levels {
                return Err(config_error(format!(
                    "`{key}` has {count} entries but `block_out_channels` has {levels}"
                )));
            }
        }
        // diffusers maps both names to SiLU.
        if self.act_fn != "silu" && self.act_fn != "swish" {
            return Err(unsupported(file, "act_fn", &self.act_fn));
        }
        for (key, value) in [
            ("in_channels", self.in_channels),
            ("out_channels", self.out_channels),
            ("latent_channels", self.latent_channels),
            ("norm_num_groups", self.norm_num_groups),
        ] {
            if value == 0 {
                return Err(config_error(format!("`{key}` must be positive")));
            }
        }
        if let Some(&channels) = self
            .block_out_channels
            .iter()
            .find(|&&c| c == 0 || c % self.norm_num_groups != 0)
        {
            return Err(config_error(format!(
                "`block_out_channels` entry {channels} is not a positive multiple of `norm_num_groups` ({})",
                self.norm_num_groups
            )));
        }
        if !(self.scaling_factor.is_finite() && self.scaling_factor > 0.0) {
            return Err(unsupported(file, "scaling_factor", self.scaling_factor));
        }
        Ok(())
    }

    /// Pixels per latent along each side: 2^(levels-1).
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    fn resnet(&self, out_channels: usize) -> ResnetConfig {
        ResnetConfig {
            out_channels,
            temb_channels: None,
            groups: self.norm_num_groups,
            eps: VAE_NORM_EPS,
            output_scale_factor: 1.0,
        }
    }
}

fn conv3x3(vb: VarBuilder, in_channels: usize, out_channels: usize) -> candle_core::Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    Conv2d::new(vb, in_channels, out_channels, 3, cfg)
}

/// Single-head self-attention over all H*W positions with a residual connection (diffusers'
/// `Attention` as the VAE mid block configures it).
#[derive(Debug, Clone)]
struct SpatialSelfAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    scale: f64,
}

impl SpatialSelfAttention {
    fn new(vb: VarBuilder, channels: usize, groups: usize) -> candle_core::Result<Self> {
        // Checkpoints converted before diffusers 0.14 keep the old attention-block names.
        let [q, k, v, out] = if vb.contains_tensor("query.weight") {
            ["query", "key", "value", "proj_attn"]
        } else {
            ["to_q", "to_k", "to_v", "to_out.0"]
        };
        Ok(Self {
            group_norm: GroupNorm::new(vb.pp("group_norm"), groups, channels, VAE_NORM_EPS)?,
            to_q: Linear::new(vb.pp(q), channels, channels)?,
            to_k: Linear::new(vb.pp(k), channels, channels)?,
            to_v: Linear::new(vb.pp(v), channels, channels)?,
            to_out: Linear::new(vb.pp(out), channels, channels)?,
            scale: 1.0 / (channels as f64).sqrt(),
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        let tokens = self
            .group_norm
            .forward(xs)?
            .reshape((batch, channels, height * width))?
            .transpose(1, 2)?
            .contiguous()?;
        // Scaling q (HW x C) is cheaper than scaling the (HW x HW) scores.
        let q = (self.to_q.forward(&tokens)? * self.scale)?;
        let k = self.to_k.forward(&tokens)?;
        let v = self.to_v.forward(&tokens)?;
        // diffusers upcasts the softmax of this block; half-precision scores over thousands of
        // positions would lose too much.
        let dtype = xs.dtype();
        let compute_dtype = match dtype {
            DType::F16 | DType::BF16 => DType::F32,
            other => other,
        };
        let scores = q
            .to_dtype(compute_dtype)?
            .matmul(&k.to_dtype(compute_dtype)?.t()?)?;
        let probs = softmax_last_dim(&scores)?.to_dtype(dtype)?;
        let attended = self.to_out.forward(&probs.matmul(&v)?)?;
        let attended = attended
            .transpose(1, 2)?
            .reshape((batch, channels, height, width))?;
        xs + attended
    }
}

/// resnet, optional attention, resnet (`UNetMidBlock2D` without a time embedding).
#[derive(Debug, Clone)]
struct MidBlock {
    first_resnet: ResnetBlock2D,
    attention: Option<SpatialSelfAttention>,
    second_resnet: ResnetBlock2D,
}

impl MidBlock {
    fn new(vb: VarBuilder, channels: usize, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let resnets = vb.pp("resnets");
        let attention = if cfg.mid_block_add_attention {
            Some(SpatialSelfAttention::new(
                vb.pp("attentions").pp("0"),
                channels,
                cfg.norm_num_groups,
            )?)
        } else {
            None
        };
        Ok(Self {
            first_resnet: ResnetBlock2D::new(resnets.pp("0"), channels, cfg.resnet(channels))?,
            attention,
            second_resnet: ResnetBlock2D::new(resnets.pp("1"), channels, cfg.resnet(channels))?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.first_resnet.forward(xs, None)?;
        if let Some(attention) = &self.attention {
            xs = attention.forward(&xs)?;
        }
        self.second_resnet.forward(&xs, None)
    }
}

/// Builds `count` resnets under `vb.resnets.{j}`, the first taking `in_channels`.
fn resnet_stack(
    vb: &VarBuilder,
    count: usize,
    in_channels: usize,
    out_channels: usize,
    cfg: &VaeConfig,
) -> candle_core::Result<Vec<ResnetBlock2D>> {
    let vb = vb.pp("resnets");
    (0..count)
        .map(|j| {
            let input = if j == 0 { in_channels } else { out_channels };
            ResnetBlock2D::new(vb.pp(j.to_string()), input, cfg.resnet(out_channels))
        })
        .collect()
}

#[derive(Debug, Clone)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

impl DownEncoderBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        match &self.downsampler {
            Some(down) => down.forward(&xs),
            None => Ok(xs),
        }
    }
}

#[derive(Debug, Clone)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

impl UpDecoderBlock {
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = xs.clone();
        for resnet in &self.resnets {
            xs = resnet.forward(&xs, None)?;
        }
        match &self.upsampler {
            Some(up) => up.forward(&xs, None),
            None => Ok(xs),
        }
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let channels = &cfg.block_out_channels;
        let levels = channels.len();
        let top = channels[levels - 1];
        let blocks_vb = vb.pp("down_blocks");
        let mut down_blocks = Vec::with_capacity(levels);
        let mut in_channels = channels[0];
        for (i, &out_channels) in channels.iter().enumerate() {
            let block_vb = blocks_vb.pp(i.to_string());
            let resnets = resnet_stack(
                &block_vb,
                cfg.layers_per_block,
                in_channels,
                out_channels,
                cfg,
            )?;
            let downsampler = if i + 1 < levels {
                let vb = block_vb.pp("downsamplers").pp("0");
                Some(Downsample2D::new(vb, out_channels, out_channels, 0)?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock {
                resnets,
                downsampler,
            });
            in_channels = out_channels;
        }
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), cfg.in_channels, channels[0])?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), top, cfg)?,
            conv_norm_out: GroupNorm::new(
                vb.pp("conv_norm_out"),
                cfg.norm_num_groups,
                top,
                VAE_NORM_EPS,
            )?,
            conv_out: conv3x3(vb.pp("conv_out"), top, 2 * cfg.latent_channels)?,
        })
    }

    /// Posterior moments (mean and log-variance stacked on channels), before `quant_conv`.
    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let mut xs = self.conv_in.forward(xs)?;
        for block in &self.down_blocks {
            xs = block.forward(&xs)?;
        }
        let xs = self.mid_block.forward(&xs)?;
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&xs)?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &VaeConfig) -> candle_core::Result<Self> {
        let channels = &cfg.block_out_channels;
        let levels = channels.len();
        let top = channels[levels - 1];
        let blocks_vb = vb.pp("up_blocks");
        let mut up_blocks = Vec::with_capacity(levels);
        let mut in_channels = top;
        for (i, &out_channels) in channels.iter().rev().enumerate() {
            let block_vb = blocks_vb.pp(i.to_string());
            let resnets = resnet_stack(
                &block_vb,
                cfg.layers_per_block + 1,
                in_channels,
                out_channels,
                cfg,
            )?;
            let upsampler = if i + 1 < levels {
                Some(Upsample2D::new(
                    block_vb.pp("upsamplers").pp("0"),
                    out_channels,
                    out_channels,
                )?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock { resnets, upsampler });
            in_channels = out_channels;
        }
        Ok(Self {
            conv_in: conv3x3(vb.pp("conv_in"), cfg.latent_channels, top)?,
            mid_block: MidBlock::new(vb.pp("mid_block"), top, cfg)?,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                vb.pp("conv_norm_out"),
                cfg.norm_num_groups,
                channels[0],
                VAE_NORM_EPS,
            )?,
            conv_out: conv3x3(vb.pp("conv_out"), channels[0], cfg.out_channels)?,
        })
    }

    fn forward(&self, xs: &Tensor) -> candle_core::Result<Tensor> {
        let xs = self.conv_in.forward(xs)?;
        let mut xs = self.mid_block.forward(&xs)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs)?;
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward_silu(&xs)?)
    }
}

/// diffusers' `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKl {
    pub config: VaeConfig,
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
}

impl AutoencoderKl {
    pub fn new(vb: VarBuilder, cfg: VaeConfig) -> candle_core::Result<Self> {
        cfg.validate(Path::new("vae config"))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let moments = 2 * cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(Conv2d::new(
                vb.pp("quant_conv"),
                moments,
                moments,
                1,
                Default::default(),
            )?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            let latent = cfg.latent_channels;
            Some(Conv2d::new(
                vb.pp("post_quant_conv"),
                latent,
                latent,
                1,
                Default::default(),
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), &cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), &cfg)?,
            quant_conv,
            post_quant_conv,
            config: cfg,
        })
    }

    /// Loads `dir/config.json` and the weight file beside it; weight errors name the file and
    /// the tensor.
    pub fn load(dir: &Path, dtype: DType, device: &Device) -> Result<Self> {
        Self::load_with_storage(dir, dtype, WeightStorage::default(), device)
    }

    /// [`Self::load`] with the weights held as `storage` says.
    pub fn load_with_storage(
        dir: &Path,
        dtype: DType,
        storage: WeightStorage,
        device: &Device,
    ) -> Result<Self> {
        let config = VaeConfig::from_file(&dir.join("config.json"))?;
        let (weight_file, vb) = component_var_builder(dir, dtype, storage, device)?;
        Self::new(vb, config).map_err(|e| ModelError::Weights {
            path: weight_file,
            message: e.to_string(),
        })
    }

    /// Posterior mode (the mean half of the moments), unscaled:
    /// (B, in_channels, H, W) in [-1, 1] -> (B, latent_channels, H/f, W/f).
    pub fn encode_mode(&self, images: &Tensor) -> candle_core::Result<Tensor> {
        let (_, channels, _, _) = images.dims4()?;
        if channels != self.config.in_channels {
            candle_core::bail!(
                "vae encode: expected {} image channels, got shape {:?}",
                self.config.in_channels,
                images.dims()
            );
        }
        let mut moments = self.encoder.forward(images)?;
        if let Some(conv) = &self.quant_conv {
            moments = conv.forward(&moments)?;
        }
        moments.narrow(1, 0, self.config.latent_channels)
    }

    /// (B, latent_channels, h, w) latents already divided by `scaling_factor` ->
    /// (B, out_channels, h*f, w*f), roughly in [-1, 1].
    pub fn decode(&self, latents: &Tensor) -> candle_core::Result<Tensor> {
        let (_, channels, _, _) = latents.dims4()?;
        if channels != self.config.latent_channels {
            candle_core::bail!(
                "vae decode: expected {} latent channels, got shape {:?}",
                self.config.latent_channels,
                latents.dims()
            );
        }
        match &self.post_quant_conv {
            Some(conv) => self.decoder.forward(&conv.forward(latents)?),
            None => self.decoder.forward(latents),
        }
    }

    /// Pixels per latent along each side: 2^(levels-1).
    pub fn scale_factor(&self) -> usize {
        self.config.scale_factor()
    }

    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }
}
