//! Attention, the transformer block and `Transformer2DModel` as diffusers defines them, with
//! LoRA-capable projections and opt-in cross-attention capture.

use std::cell::RefCell;

use candle_core::{Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::lora::{ActiveAdapters, LoraLinear, ProjectionTable};
use crate::ops;
use crate::ops::modules::{Conv2d, GroupNorm, Linear};
use crate::ops::residual::residual;

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
        let q = self.to_q.forward(xs, ctx.adapters)?;
        let k = self.to_k.forward(context, ctx.adapters)?;
        let v = self.to_v.forward(context, ctx.adapters)?;
        let capture = ctx.capture.filter(|_| self.is_cross);
        let tracking = q.track_op() || k.track_op() || v.track_op();
        let out = match capture {
            _ if !ops::fast_path(&q) => self.composed(&q, &k, &v, capture, spatial)?,
            None => ops::attention::attention(&q, &k, &v, self.heads, self.scale)?,
            // Captured maps are plain tensors: a graph through them needs the composed form.
            Some(_) if tracking => self.composed(&q, &k, &v, capture, spatial)?,
            Some(capture) => {
                let (out, probs) =
                    ops::attention::attention_with_probs(&q, &k, &v, self.heads, self.scale)?;
                self.record(capture, probs, spatial);
                out
            }
        };
        self.to_out.forward(&out, ctx.adapters)
    }

    fn record(
        &self,
        capture: &RefCell<Vec<CapturedAttention>>,
        probs: Tensor,
        spatial: (usize, usize),
    ) {
        capture.borrow_mut().push(CapturedAttention {
            module: self.path.clone(),
            probs,
            height: spatial.0,
            width: spatial.1,
        });
    }

    /// Attention from candle's ops (other devices and dtypes, or capture inside a graph).
    fn composed(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        capture: Option<&RefCell<Vec<CapturedAttention>>>,
        spatial: (usize, usize),
    ) -> Result<Tensor> {
        let (q, k, v) = (
            self.split_heads(q)?,
            self.split_heads(k)?,
            self.split_heads(v)?,
        );
        let scores = (q.matmul(&k.t()?)? * self.scale)?;
        let probs = softmax_last_dim(&scores)?;
        if let Some(capture) = capture {
            self.record(capture, probs.mean(1)?, spatial);
        }
        let out = probs.matmul(&v)?; // (B, heads, N, d)
        let (b, h, n, d) = out.dims4()?;
        out.transpose(1, 2)?.reshape((b, n, h * d))
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
            proj_in: Linear::new(vb.pp("net").pp("0").pp("proj"), dim, inner * 2)?,
            proj_out: Linear::new(vb.pp("net").pp("2"), inner, dim)?,
        })
    }
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let projected = self.proj_in.forward(xs)?;
        let gated = if ops::fast_path(&projected) {
            ops::geglu::geglu(&projected)?
        } else {
            let chunks = projected.chunk(2, D::Minus1)?;
            (&chunks[0] * chunks[1].gelu_erf()?)?
        };
        self.proj_out.forward(&gated)
    }
}

/// Self-attention, cross-attention and feed-forward, each pre-normed and residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: ops::modules::LayerNorm,
    attn1: Attention,
    norm2: ops::modules::LayerNorm,
    attn2: Attention,
    norm3: ops::modules::LayerNorm,
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
            norm1: ops::modules::LayerNorm::new(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::new(vb.pp("attn1"), dim, None, heads, head_dim, table)?,
            norm2: ops::modules::LayerNorm::new(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::new(
                vb.pp("attn2"),
                dim,
                Some(cross_attention_dim),
                heads,
                head_dim,
                table,
            )?,
            norm3: ops::modules::LayerNorm::new(vb.pp("norm3"), dim, 1e-5)?,
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
        let attended = self
            .attn1
            .forward(&self.norm1.forward(xs)?, None, spatial, ctx)?;
        let xs = residual(&attended, xs)?;
        let attended =
            self.attn2
                .forward(&self.norm2.forward(&xs)?, Some(context), spatial, ctx)?;
        let xs = residual(&attended, &xs)?;
        residual(&self.ff.forward(&self.norm3.forward(&xs)?)?, &xs)
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
                Ok(Projection::Linear(Linear::new(vb, i, o)?))
            } else {
                Ok(Projection::Conv(Conv2d::new(
                    vb,
                    i,
                    o,
                    1,
                    Default::default(),
                )?))
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
            norm: GroupNorm::new(vb.pp("norm"), cfg.norm_groups, in_channels, 1e-6)?,
            proj_in: projection(vb.pp("proj_in"), in_channels, inner)?,
            blocks,
            proj_out: projection(vb.pp("proj_out"), inner, in_channels)?,
        })
    }

    /// The projection's weight as an (out, in) matrix (a 1x1 kernel is one), as the fused
    /// projection of `xs` takes it (see [`ops::fused_weight`]).
    fn projection_matrix(p: &Projection, xs: &Tensor) -> Result<(Tensor, Option<Tensor>)> {
        Ok(match p {
            Projection::Linear(lin) => (ops::fused_weight(lin.weight(), xs)?, lin.bias().cloned()),
            Projection::Conv(conv) => {
                let (o, i, _, _) = conv.weight().dims4()?;
                let weight = ops::fused_weight(conv.weight(), xs)?;
                (weight.reshape((o, i))?, conv.bias().cloned())
            }
        })
    }

    pub fn forward(&self, xs: &Tensor, context: &Tensor, ctx: ForwardCtx) -> Result<Tensor> {
        let (b, c, h, w) = xs.dims4()?;
        let normed = self.norm.forward(xs)?;
        // On the fast path the projections read the map as tokens and write tokens back as a
        // map through strides; no permuted copy is made.
        let fast = ops::fast_path(xs);
        let mut tokens = if fast {
            let (weight, bias) = Self::projection_matrix(&self.proj_in, &normed)?;
            ops::linear::project(
                &normed.reshape((b, c, h * w))?,
                &weight,
                bias.as_ref(),
                ops::linear::Channels::First,
                ops::linear::Channels::Last,
            )?
        } else {
            let to_tokens = |t: Tensor, ch: usize| -> Result<Tensor> {
                t.permute((0, 2, 3, 1))?.reshape((b, h * w, ch))
            };
            match &self.proj_in {
                Projection::Conv(conv) => {
                    let t = conv.forward(&normed)?;
                    let ch = t.dim(1)?;
                    to_tokens(t, ch)?
                }
                Projection::Linear(lin) => lin.forward(&to_tokens(normed, c)?)?,
            }
        };
        for block in &self.blocks {
            tokens = block.forward(&tokens, context, (h, w), ctx)?;
        }
        let inner = tokens.dim(2)?;
        let out = if fast {
            let (weight, bias) = Self::projection_matrix(&self.proj_out, &tokens)?;
            ops::linear::project(
                &tokens,
                &weight,
                bias.as_ref(),
                ops::linear::Channels::Last,
                ops::linear::Channels::First,
            )?
            .reshape((b, c, h, w))?
        } else {
            match &self.proj_out {
                Projection::Conv(conv) => {
                    let map = tokens.reshape((b, h, w, inner))?.permute((0, 3, 1, 2))?;
                    conv.forward(&map.contiguous()?)?
                }
                Projection::Linear(lin) => lin
                    .forward(&tokens)?
                    .reshape((b, h, w, c))?
                    .permute((0, 3, 1, 2))?,
            }
        };
        residual(&out, xs)
    }
}
