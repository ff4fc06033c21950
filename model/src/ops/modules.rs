//! Layers that run the fused kernels on CPU f32 tensors and candle's composed ops elsewhere
//! (CUDA, f16/bf16). Weights are created with the same names, shapes and initialisers as
//! `candle_nn`'s constructors, so checkpoints and fresh `VarMap`s see no difference.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::{fast_path, fused_weight, widen};

/// `lin(xs)` with candle's composed ops, the weight widened to the input's dtype first (see
/// [`widen`]). For linear layers kept on candle's own matmul.
pub fn composed_linear(lin: &candle_nn::Linear, xs: &Tensor) -> Result<Tensor> {
    if lin.weight().dtype() == xs.dtype() {
        return lin.forward(xs);
    }
    candle_nn::Linear::new(widen(lin.weight(), xs.dtype())?, lin.bias().cloned()).forward(xs)
}

/// GroupNorm with an optional fused SiLU.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
    composed: candle_nn::GroupNorm,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        let composed =
            candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?;
        Ok(Self {
            weight,
            bias,
            groups,
            eps,
            composed,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if fast_path(xs) {
            super::norm::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, false)
        } else {
            self.composed.forward(xs)
        }
    }

    /// `silu(group_norm(xs))`.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        if fast_path(xs) {
            super::norm::group_norm(xs, &self.weight, &self.bias, self.groups, self.eps, true)
        } else {
            self.composed.forward(xs)?.silu()
        }
    }
}

/// LayerNorm with weight and bias.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    inner: candle_nn::LayerNorm,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            inner: candle_nn::layer_norm(dim, eps, vb)?,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self.inner.bias() {
            Some(bias) if fast_path(xs) => {
                super::norm::layer_norm(xs, self.inner.weight(), bias, self.inner.eps())
            }
            // candle's fused kernel has no f64 version.
            Some(bias) if xs.dtype() == candle_core::DType::F64 => candle_nn::ops::layer_norm_slow(
                xs,
                self.inner.weight(),
                bias,
                self.inner.eps() as f32,
            ),
            // candle's fused kernel has no backward, so inside an autograd graph (pretraining,
            // LoRA training) the composed, differentiable form is used instead.
            Some(bias) if xs.track_op() || self.inner.weight().track_op() => {
                candle_nn::ops::layer_norm_slow(
                    xs,
                    self.inner.weight(),
                    bias,
                    self.inner.eps() as f32,
                )
            }
            _ => self.inner.forward(xs),
        }
    }
}

/// A 2-D convolution whose CPU f32 path is [`super::conv::conv2d`].
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        config: Conv2dConfig,
    ) -> Result<Self> {
        Ok(Self {
            inner: candle_nn::conv2d(in_channels, out_channels, kernel, config, vb)?,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }

    fn fused_ok(&self, xs: &Tensor) -> bool {
        let c = self.inner.config();
        fast_path(xs) && c.groups == 1 && c.dilation == 1
    }

    /// The composed candle convolution with the weight in `xs`'s dtype.
    fn composed(&self, xs: &Tensor) -> Result<Tensor> {
        if self.inner.weight().dtype() == xs.dtype() {
            return self.inner.forward(xs);
        }
        let weight = widen(self.inner.weight(), xs.dtype())?;
        candle_nn::Conv2d::new(weight, self.inner.bias().cloned(), *self.inner.config()).forward(xs)
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.fused_ok(xs) {
            let c = self.inner.config();
            super::conv::conv2d(
                xs,
                &fused_weight(self.inner.weight(), xs)?,
                self.inner.bias(),
                c.stride,
                c.padding,
            )
        } else {
            self.composed(xs)
        }
    }

    /// `conv(xs) + extra[b, c]` for a per-sample bias `extra` (B, C_out), added by the
    /// convolution itself on the fast path.
    pub fn forward_with_sample_bias(&self, xs: &Tensor, extra: &Tensor) -> Result<Tensor> {
        if self.fused_ok(xs) {
            let c = self.inner.config();
            let bias = match self.inner.bias() {
                Some(b) => extra.broadcast_add(&b.unsqueeze(0)?)?,
                None => extra.clone(),
            };
            let weight = fused_weight(self.inner.weight(), xs)?;
            super::conv::conv2d(xs, &weight, Some(&bias), c.stride, c.padding)
        } else {
            self.composed(xs)?
                .broadcast_add(&extra.unsqueeze(2)?.unsqueeze(3)?)
        }
    }
}

/// A linear layer whose CPU f32 path is [`super::linear::linear`].
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    pub fn new(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Self> {
        Ok(Self {
            inner: candle_nn::linear(in_dim, out_dim, vb)?,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if fast_path(xs) {
            let weight = fused_weight(self.inner.weight(), xs)?;
            super::linear::linear(xs, &weight, self.inner.bias())
        } else {
            composed_linear(&self.inner, xs)
        }
    }
}
