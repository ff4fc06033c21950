//! Sinusoidal timestep embedding and the MLP that lifts it (diffusers' `Timesteps` +
//! `TimestepEmbedding`).

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::VarBuilder;

use crate::ops::modules::Linear;

/// Sinusoidal embedding of per-sample timesteps `(B,)` into `(B, dim)`.
#[derive(Debug, Clone, Copy)]
pub struct Timesteps {
    pub dim: usize,
    pub flip_sin_to_cos: bool,
    pub downscale_freq_shift: f64,
}

impl Timesteps {
    pub fn forward(&self, timesteps: &Tensor) -> Result<Tensor> {
        let half = self.dim / 2;
        let denom = half as f64 - self.downscale_freq_shift;
        let freqs: Vec<f32> = (0..half)
            .map(|i| (-(10000f64.ln()) * i as f64 / denom).exp() as f32)
            .collect();
        let freqs = Tensor::from_vec(freqs, (1, half), timesteps.device())?;
        let args = timesteps
            .to_dtype(DType::F32)?
            .unsqueeze(1)?
            .broadcast_mul(&freqs)?;
        let (sin, cos) = (args.sin()?, args.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], D::Minus1)?
        } else {
            Tensor::cat(&[sin, cos], D::Minus1)?
        };
        if self.dim % 2 == 1 {
            emb.pad_with_zeros(D::Minus1, 0, 1)
        } else {
            Ok(emb)
        }
    }
}

/// `linear_1 -> SiLU -> linear_2`.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_channels: usize, time_embed_dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::new(vb.pp("linear_1"), in_channels, time_embed_dim)?,
            linear_2: Linear::new(vb.pp("linear_2"), time_embed_dim, time_embed_dim)?,
        })
    }
}

impl Module for TimestepEmbedding {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(xs)?.silu()?)
    }
}
