//! `UNet2DConditionModel` as diffusers defines it, built entirely from `unet/config.json`.

use std::path::Path;
use std::sync::{Arc, RwLock};

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::attention::{ForwardCtx, Transformer2DConfig};
use crate::config::{read_json, unsupported};
use crate::embeddings::{TimestepEmbedding, Timesteps};
use crate::error::{ModelError, Result};
use crate::lora::{ProjectionTable, ResolvedAdapter};
use crate::ops::modules::{Conv2d, GroupNorm};
use crate::resnet::ResnetConfig;
use crate::unet_blocks::{BlockConfig, DownBlock, MidBlock, UpBlock, UpBlockChannels};
use crate::weights::WeightStorage;

/// A config value diffusers accepts either as one number or as one number per block.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    fn expand(&self, blocks: usize) -> Vec<usize> {
        match self {
            PerBlock::One(v) => vec![*v; blocks],
            PerBlock::Each(v) => v.clone(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_one() -> f64 {
    1.0
}
fn default_one_block() -> PerBlock {
    PerBlock::One(1)
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct UNetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "default_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock,
    #[serde(default = "default_one_padding")]
    pub downsample_padding: usize,
    #[serde(default = "default_one")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "default_silu")]
    pub act_fn: String,
    #[serde(default)]
    pub norm_num_groups: Option<usize>,
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock,
    #[serde(default = "default_one_block")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub attention_head_dim: Option<PerBlock>,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
    #[serde(default)]
    pub upcast_attention: Option<bool>,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub time_embedding_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub timestep_post_act: Option<String>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim_type: Option<String>,
    #[serde(default)]
    pub cross_attention_norm: Option<String>,
    #[serde(default)]
    pub attention_type: Option<String>,
    #[serde(default)]
    pub reverse_transformer_layers_per_block: Option<serde_json::Value>,
    #[serde(default)]
    pub mid_block_only_cross_attention: Option<bool>,
    #[serde(default = "default_conv_kernel")]
    pub conv_in_kernel: usize,
    #[serde(default = "default_conv_kernel")]
    pub conv_out_kernel: usize,
    #[serde(default = "default_one")]
    pub resnet_out_scale_factor: f64,
    #[serde(default)]
    pub resnet_skip_time_act: bool,
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub sample_size: Option<usize>,
}

fn default_one_padding() -> usize {
    1
}
fn default_silu() -> String {
    "silu".into()
}
fn default_norm_eps() -> f64 {
    1e-5
}
fn default_conv_kernel() -> usize {
    3
}

/// What the UNet builder needs per down block, after expanding the per-block values.
struct Resolved {
    heads: Vec<usize>,
    cross_dims: Vec<usize>,
    layers: Vec<usize>,
    transformer_layers: Vec<usize>,
    has_attention: Vec<bool>,
    up_has_attention: Vec<bool>,
    groups: usize,
}

impl UNetConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let cfg: Self = read_json(path)?;
        cfg.resolve(path)?;
        Ok(cfg)
    }

    /// Checks every value against what this implementation supports, naming the key otherwise.
    fn resolve(&self, file: &Path) -> Result<Resolved> {
        let n = self.block_out_channels.len();
        let bad = |key: &str, value: &dyn std::fmt::Debug| {
            Err(unsupported(file, key, format!("{value:?}")))
        };
        if n == 0 {
            return bad("block_out_channels", &self.block_out_channels);
        }
        if self.down_block_types.len() != n {
            return bad("down_block_types", &self.down_block_types);
        }
        if self.up_block_types.len() != n {
            return bad("up_block_types", &self.up_block_types);
        }
        let has_attention = self
            .down_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnDownBlock2D" => Ok(true),
                "DownBlock2D" => Ok(false),
                other => Err(unsupported(file, "down_block_types", other)),
            })
            .collect::<Result<Vec<_>>>()?;
        let up_has_attention = self
            .up_block_types
            .iter()
            .map(|t| match t.as_str() {
                "CrossAttnUpBlock2D" => Ok(true),
                "UpBlock2D" => Ok(false),
                other => Err(unsupported(file, "up_block_types", other)),
            })
            .collect::<Result<Vec<_>>>()?;
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => {}
            Some(other) => return bad("mid_block_type", &other),
        }
        let checks: [(&str, bool); 16] = [
            ("center_input_sample", self.center_input_sample),
            ("act_fn", self.act_fn != "silu"),
            ("dual_cross_attention", self.dual_cross_attention),
            ("class_embed_type", self.class_embed_type.is_some()),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            ("num_class_embeds", self.num_class_embeds.is_some()),
            (
                "resnet_time_scale_shift",
                !matches!(
                    self.resnet_time_scale_shift.as_deref(),
                    None | Some("default")
                ),
            ),
            (
                "time_embedding_type",
                !matches!(
                    self.time_embedding_type.as_deref(),
                    None | Some("positional")
                ),
            ),
            ("time_embedding_dim", self.time_embedding_dim.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("timestep_post_act", self.timestep_post_act.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("cross_attention_norm", self.cross_attention_norm.is_some()),
            (
                "attention_type",
                !matches!(self.attention_type.as_deref(), None | Some("default")),
            ),
            ("conv_in_kernel", self.conv_in_kernel != 3),
            ("conv_out_kernel", self.conv_out_kernel != 3),
        ];
        if let Some((key, _)) = checks.iter().find(|(_, bad)| *bad) {
            let value = serde_json::to_value(self)
                .ok()
                .and_then(|v| v.get(*key).cloned())
                .unwrap_or(serde_json::Value::Null);
            return Err(unsupported(file, key, value));
        }
        if self.resnet_skip_time_act {
            return bad("resnet_skip_time_act", &true);
        }
        match &self.only_cross_attention {
            serde_json::Value::Null | serde_json::Value::Bool(false) => {}
            serde_json::Value::Array(v)
                if v.iter().all(|b| b == &serde_json::Value::Bool(false)) => {}
            other => return bad("only_cross_attention", other),
        }
        if self.num_attention_heads.is_some() {
            // diffusers itself refuses this key for UNet2DConditionModel (its `attention_head_dim`
            // is the head count for historical reasons).
            return bad("num_attention_heads", &self.num_attention_heads);
        }
        let groups = match self.norm_num_groups {
            Some(g) if g > 0 => g,
            other => return bad("norm_num_groups", &other),
        };
        let heads = self
            .attention_head_dim
            .clone()
            .unwrap_or(PerBlock::One(8))
            .expand(n);
        let cross_dims = self.cross_attention_dim.expand(n);
        let layers = self.layers_per_block.expand(n);
        let transformer_layers = self.transformer_layers_per_block.expand(n);
        for (key, v) in [
            ("attention_head_dim", &heads),
            ("cross_attention_dim", &cross_dims),
            ("layers_per_block", &layers),
            ("transformer_layers_per_block", &transformer_layers),
        ] {
            if v.len() != n || v.contains(&0) {
                return bad(key, v);
            }
        }
        if self.reverse_transformer_layers_per_block.is_some() {
            return bad(
                "reverse_transformer_layers_per_block",
                &self.reverse_transformer_layers_per_block,
            );
        }
        for (i, &ch) in self.block_out_channels.iter().enumerate() {
            if ch % groups != 0 {
                return bad("norm_num_groups", &groups);
            }
            if has_attention[i] && ch % heads[i] != 0 {
                return bad("attention_head_dim", &heads);
            }
        }
        Ok(Resolved {
            heads,
            cross_dims,
            layers,
            transformer_layers,
            has_attention,
            up_has_attention,
            groups,
        })
    }
}

/// The denoising UNet of InstructPix2Pix (8 input channels: noisy latents + image latents).
pub struct UNet2DConditionModel {
    pub config: UNetConfig,
    conv_in: Conv2d,
    time_proj: Timesteps,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    projections: ProjectionTable,
    fingerprint: String,
    attached: RwLock<Vec<Arc<ResolvedAdapter>>>,
}

impl UNet2DConditionModel {
    /// Loads `unet/config.json` and the weights next to it.
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
        let config_path = dir.join("config.json");
        let config: UNetConfig = read_json(&config_path)?;
        let (weights, vb) = crate::weights::component_var_builder(dir, dtype, storage, device)?;
        Self::new(vb, config, &config_path).map_err(|e| match e {
            ModelError::Candle(err) => ModelError::Weights {
                path: weights.clone(),
                message: err.to_string(),
            },
            other => other,
        })
    }

    /// Builds the UNet from a config and weights. `config_path` only names the file in errors.
    pub fn new(vb: VarBuilder, config: UNetConfig, config_path: &Path) -> Result<Self> {
        let r = config.resolve(config_path)?;
        let ch = &config.block_out_channels;
        let n = ch.len();
        let mut table = ProjectionTable::default();
        let conv3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv_in = Conv2d::new(vb.pp("conv_in"), config.in_channels, ch[0], 3, conv3)?;
        let time_embed_dim = ch[0] * 4;
        let time_proj = Timesteps {
            dim: ch[0],
            flip_sin_to_cos: config.flip_sin_to_cos,
            downscale_freq_shift: config.freq_shift,
        };
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), ch[0], time_embed_dim)?;
        let resnet = |out_channels: usize, scale: f64| ResnetConfig {
            out_channels,
            temb_channels: Some(time_embed_dim),
            groups: r.groups,
            eps: config.norm_eps,
            output_scale_factor: scale,
        };
        let transformer = |i: usize, attn: bool| -> Option<Transformer2DConfig> {
            attn.then(|| Transformer2DConfig {
                heads: r.heads[i],
                head_dim: ch[i] / r.heads[i],
                layers: r.transformer_layers[i],
                norm_groups: r.groups,
                cross_attention_dim: r.cross_dims[i],
                use_linear_projection: config.use_linear_projection,
            })
        };

        let mut down_blocks = Vec::with_capacity(n);
        let mut in_ch = ch[0];
        for (i, &out_ch) in ch.iter().enumerate() {
            let cfg = BlockConfig {
                resnet: resnet(out_ch, config.resnet_out_scale_factor),
                transformer: transformer(i, r.has_attention[i]),
            };
            down_blocks.push(DownBlock::new(
                vb.pp("down_blocks").pp(i),
                in_ch,
                out_ch,
                r.layers[i],
                i + 1 < n,
                config.downsample_padding,
                &cfg,
                &mut table,
            )?);
            in_ch = out_ch;
        }

        let mid_cfg = BlockConfig {
            resnet: resnet(ch[n - 1], config.mid_block_scale_factor),
            transformer: transformer(n - 1, true),
        };
        let mid_block = MidBlock::new(vb.pp("mid_block"), ch[n - 1], 1, &mid_cfg, &mut table)?;

        let mut up_blocks = Vec::with_capacity(n);
        let mut prev_out = ch[n - 1];
        for i in 0..n {
            let level = n - 1 - i; // the down level this up block mirrors
            let out = ch[level];
            let input = ch[level.saturating_sub(1)];
            let cfg = BlockConfig {
                resnet: resnet(out, config.resnet_out_scale_factor),
                transformer: transformer(level, r.up_has_attention[i]),
            };
            up_blocks.push(UpBlock::new(
                vb.pp("up_blocks").pp(i),
                UpBlockChannels {
                    in_channels: input,
                    prev_output_channels: prev_out,
                    out_channels: out,
                },
                r.layers[level] + 1,
                i + 1 < n,
                &cfg,
                &mut table,
            )?);
            prev_out = out;
        }

        let conv_norm_out =
            GroupNorm::new(vb.pp("conv_norm_out"), r.groups, ch[0], config.norm_eps)?;
        let conv_out = Conv2d::new(vb.pp("conv_out"), ch[0], config.out_channels, 3, conv3)?;
        let fingerprint = fingerprint(&config, &vb, &table)?;
        Ok(Self {
            config,
            conv_in,
            time_proj,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            projections: table,
            fingerprint,
            attached: RwLock::new(Vec::new()),
        })
    }

    /// Noise prediction with the attached adapters and no capture.
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let adapters = self.attached_adapters();
        let ctx = ForwardCtx {
            adapters: &adapters,
            capture: None,
        };
        self.forward_with(sample, timesteps, encoder_hidden_states, ctx)
    }

    /// Noise prediction with explicit adapters and optional cross-attention capture.
    /// `timesteps` is (B,) so each sample may be at its own step.
    pub fn forward_with(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        encoder_hidden_states: &Tensor,
        ctx: ForwardCtx,
    ) -> candle_core::Result<Tensor> {
        let batch = sample.dim(0)?;
        let timesteps = match timesteps.rank() {
            0 => timesteps.reshape(1)?.broadcast_as(batch)?,
            _ => timesteps.clone(),
        };
        let temb = self
            .time_proj
            .forward(&timesteps)?
            .to_dtype(sample.dtype())?;
        let temb = self.time_embedding.forward(&temb)?;

        let mut xs = self.conv_in.forward(sample)?;
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            xs = block.forward(&xs, &temb, encoder_hidden_states, ctx, &mut skips)?;
        }
        xs = self
            .mid_block
            .forward(&xs, &temb, encoder_hidden_states, ctx)?;
        for block in &self.up_blocks {
            xs = block.forward(&xs, &temb, encoder_hidden_states, ctx, &mut skips)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }

    /// Every LoRA-capable projection (module path, in, out), in construction order.
    pub fn projections(&self) -> &ProjectionTable {
        &self.projections
    }

    /// A digest of the architecture and of a few weight tensors; adapters record it so that
    /// one trained on another base is refused.
    pub fn fingerprint(&self) -> &str {
        &self.fingerprint
    }

    /// Snapshot of the adapters attached now (what `forward` applies).
    pub fn attached_adapters(&self) -> Vec<Arc<ResolvedAdapter>> {
        self.attached
            .read()
            .map(|v| v.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    /// Attaches an adapter (after any already attached); replaces one with the same name.
    pub fn attach(&self, adapter: Arc<ResolvedAdapter>) {
        let mut attached = self.attached.write().unwrap_or_else(|p| p.into_inner());
        attached.retain(|a| a.name != adapter.name);
        attached.push(adapter);
    }

    /// Detaches the adapter of that name; returns whether one was attached.
    pub fn detach(&self, name: &str) -> bool {
        let mut attached = self.attached.write().unwrap_or_else(|p| p.into_inner());
        let before = attached.len();
        attached.retain(|a| a.name != name);
        attached.len() != before
    }
}

fn fingerprint(config: &UNetConfig, vb: &VarBuilder, table: &ProjectionTable) -> Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(b"rl4pix-unet-fingerprint-v1\n");
    hasher.update(serde_json::to_vec(config).unwrap_or_default());
    for p in &table.entries {
        hasher.update(format!("{} {} {}\n", p.path, p.in_features, p.out_features).as_bytes());
    }
    let ch0 = config.block_out_channels[0];
    for (name, shape) in [
        ("conv_in.weight", vec![ch0, config.in_channels, 3, 3]),
        ("conv_out.weight", vec![config.out_channels, ch0, 3, 3]),
        ("time_embedding.linear_1.weight", vec![ch0 * 4, ch0]),
    ] {
        // Hash at f16 precision so the same checkpoint loaded as f32 or f16 agrees.
        let t = vb.get(shape, name)?.to_dtype(DType::F16)?.flatten_all()?;
        for v in t.to_vec1::<half::f16>()? {
            hasher.update(v.to_bits().to_le_bytes());
        }
    }
    let digest = hasher.finalize();
    Ok(digest.iter().take(16).map(|b| format!("{b:02x}")).collect())
}
