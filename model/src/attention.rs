//! Attention, the transformer block and `Transformer2DModel` as diffusers defines them, with
//! LoRA-capable projections and opt-in cross-attention capture.

use std::cell::RefCell;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::{conv2d, group_norm, layer_norm, Conv2d, GroupNorm, LayerNorm, Linear, VarBuilder};

use crate::lora::{ActiveAdapters, LoraLinear, ProjectionTable};

/// Cross-attention probabilities of one `attn2` module in one forward call.
#[derive(Debug, Clone)]
pub struct CapturedAttention {
    /// Module path as in the checkpoint, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn2`.
    pub module: String,
    /// softmax(QK^T / sqrt(d)) averaged over heads: (B, height * width, tokens).
    pub probs: Tensor,
    pub height: usize,
    pub width: usize,
}

/// Per-call options threaded through the UNet.
#[derive(Clone, Copy)]
pub struct ForwardCtx<'a> {
    pub adapters: ActiveAdapters<'a>,
    /// When set, every cross-attention appends its probabilities here.
    pub capture: Option<&'a RefCell<Vec<CapturedAttention>>>,
}

impl<'a> ForwardCtx<'a> {
    pub fn plain() -> ForwardCtx<'static> {
        ForwardCtx {
            adapters: &[],
            capture: None,
        }
    }
}

/// Softmax over the last dimension: candle's fused kernel, except inside an autograd graph
/// (training), where the composed, differentiable form is needed.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if xs.track_op() {
        candle_nn::ops::softmax(xs, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(xs)
    }
}

/// LayerNorm: candle's fused kernel has no backward, so inside an autograd graph (pretraining,
/// LoRA training) the composed, differentiable form is used instead.
pub fn layer_norm_forward(norm: &LayerNorm, xs: &Tensor) -> Result<Tensor> {
    match norm.bias() {
        Some(bias) if xs.track_op() || norm.weight().track_op() => {
            candle_nn::ops::layer_norm_slow(xs, norm.weight(), bias, norm.eps() as f32)
        }
        _ => norm.forward(xs),
    }
}

/// Multi-head attention (`attn1`: self, `attn2`: cross).
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: LoraLinear,
    to_k: LoraLinear,
    to_v: LoraLinear,
    to_out: LoraLinear,
    heads: usize,
    scale: f64,
    /// Module path, kept only for captured maps.
    path: String,
    is_cross: bool,
}

impl Attention {
    pub fn new(
        vb: VarBuilder,
        query_dim: usize,
        context_dim: Option<usize>,
        heads: usize,
        head_dim: usize,
        table: &mut ProjectionTable,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        let kv_dim = context_dim.unwrap_or(query_dim);
        Ok(Self {
            to_q: LoraLinear::new(vb.pp("to_q"), query_dim, inner, false, table)?,
            to_k: LoraLinear::new(vb.pp("to_k"), kv_dim, inner, false, table)?,
            to_v: LoraLinear::new(vb.pp("to_v"), kv_dim, inner, false, table)?,
            to_out: LoraLinear::new(vb.pp("to_out").pp("0"), inner, query_dim, true, table)?,
            heads,
            scale: 1.0 / (head_dim as f64).sqrt(),
            path: vb.prefix(),
            is_cross: context_dim.is_some(),
        })
    }

    /// (B, N, C) -> (B, heads, N, C / heads)
    fn split_heads(&self, xs: &Tensor) -> Result<Tensor> {
        let (b, n, c) = xs.dims3()?;
        xs.reshape((b, n, self.heads, c / self.heads))?
            .transpose(1, 2)?
            .contiguous()
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        spatial: (usize, usize),
        ctx: ForwardCtx,
    ) -> Result<Tensor> {
        let context = context.unwrap_or(xs);
        let q = self.split_heads(&self.to_q.forward(xs, ctx.adapters)?)?;
        let k = self.split_heads(&self.to_k.forward(context, ctx.adapters)?)?;
        let v = self.split_heads(&self.to_v.forward(context, ctx.adapters)?)?;
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let probs = softmax_last_dim(&scores)?;
        if let (true, Some(capture)) = (self.is_cross, ctx.capture) {
            capture.borrow_mut().push(CapturedAttention {
                module: self.path.clone(),
                probs: probs.mean(1)?,
                height: spatial.0,
                width: spatial.1,
            });
        }
        let out = probs.matmul(&v)?; // (B, heads, N, d)
        let (b, h, n, d) = out.dims4()?;
        let out = out.transpose(1, 2)?.reshape((b, n, h * d))?;
        self.to_out.forward(&out, ctx.adapters)
    }
}

/// GEGLU feed-forward: `net.0.proj` (dim -> 2 * inner), `hidden * gelu(gate)`, `net.2` (inner -> dim).
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize, mult: usize) -> Result<Self> {
        let inner = dim * mult;
        Ok(Self {
            proj_in: candle_nn::linear(dim, inner * 2, vb.pp("net").pp("0").pp("proj"))?,
            proj_out: candle_nn::linear(inner, dim, vb.pp("net").pp("2"))?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let projected = self.proj_in.forward(xs)?;
        let chunks = projected.chunk(2, D::Minus1)?;
        let gated = (&chunks[0] * chunks[1].gelu_erf()?)?;
        self.proj_out.forward(&gated)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed and residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        dim: usize,
        heads: usize,
        head_dim: usize,
        cross_attention_dim: usize,
        table: &mut ProjectionTable,
    ) -> Result<Self> {
        Ok(Self {
            norm1: layer_norm(dim, 1e-5, vb.pp("norm1"))?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim, table)?,
            norm2: layer_norm(dim, 1e-5, vb.pp("norm2"))?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                Some(cross_attention_dim),
                heads,
                head_dim,
                table,
            )?,
            norm3: layer_norm(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(vb.pp("ff"), dim, 4)?,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        context: &Tensor,
        spatial: (usize, usize),
        ctx: ForwardCtx,
    ) -> Result<Tensor> {
        let xs =
            (self
                .attn1
                .forward(&layer_norm_forward(&self.norm1, xs)?, None, spatial, ctx)?
                + xs)?;
        let xs = (self.attn2.forward(
            &layer_norm_forward(&self.norm2, &xs)?,
            Some(context),
            spatial,
            ctx,
        )? + xs)?;
        self.ff.forward(&layer_norm_forward(&self.norm3, &xs)?)? + xs
    }
}

#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

/// Spatial transformer over a feature map: GroupNorm, project in, transformer blocks, project
/// out, residual. `use_linear_projection` picks linear (SD-2) or 1x1 conv (SD-1) projections.
#[derive(Debug, Clone)]
pub struct Transformer2DModel {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

pub struct Transformer2DConfig {
    pub heads: usize,
    pub head_dim: usize,
    pub layers: usize,
    pub norm_groups: usize,
    pub cross_attention_dim: usize,
    pub use_linear_projection: bool,
}

impl Transformer2DModel {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        cfg: &Transformer2DConfig,
        table: &mut ProjectionTable,
    ) -> Result<Self> {
        let inner = cfg.heads * cfg.head_dim;
        let projection = |vb: VarBuilder, i: usize, o: usize| -> Result<Projection> {
            if cfg.use_linear_projection {
                Ok(Projection::Linear(candle_nn::linear(i, o, vb)?))
            } else {
                Ok(Projection::Conv(conv2d(i, o, 1, Default::default(), vb)?))
            }
        };
        let blocks = (0..cfg.layers)
            .map(|i| {
                BasicTransformerBlock::new(
                    vb.pp("transformer_blocks").pp(i),
                    inner,
                    cfg.heads,
                    cfg.head_dim,
                    cfg.cross_attention_dim,
                    table,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            norm: group_norm(cfg.norm_groups, in_channels, 1e-6, vb.pp("norm"))?,
            proj_in: projection(vb.pp("proj_in"), in_channels, inner)?,
            blocks,
            proj_out: projection(vb.pp("proj_out"), inner, in_channels)?,
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor, ctx: ForwardCtx) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        let to_tokens = |t: Tensor, ch: usize| -> Result<Tensor> {
            t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
        };
        let mut tokens = match &self.proj_in {
            Projection::Conv(conv) => {
                let t = conv.forward(&normed)?;
                let ch = t.dim(1)?;
                to_tokens(t, ch)?
            }
            Projection::Linear(lin) => lin.forward(&to_tokens(normed, c)?)?,
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, (h, w), ctx)?;
        }
        let inner = tokens.dim(2)?;
        let out = match &self.proj_out {
            Projection::Conv(conv) => {
                let map = tokens.reshape((b, h, w, inner))?.permute((0, 3, 1, 2))?;
                conv.forward(&map.contiguous()?)?
            }
            Projection::Linear(lin) => lin
                .forward(&tokens)?
                .reshape((b, h, w, c))?
                .permute((0, 3, 1, 2))?,
        };
        out + xs
    }
}
