//! `ResnetBlock2D` as diffusers defines it (shared by the UNet and the VAE).

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, group_norm, linear, Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};

#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub out_channels: usize,
    /// Width of the time embedding; `None` for the VAE, which has none.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    time_emb_proj: Option<Linear>,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(vb: VarBuilder, in_channels: usize, cfg: ResnetConfig) -> Result<Self> {
        let conv3 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let out = cfg.out_channels;
        let conv_shortcut = if in_channels != out {
            Some(conv2d(
                in_channels,
                out,
                1,
                Default::default(),
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(linear(t, out, vb.pp("time_emb_proj"))?),
            None => None,
        };
        Ok(Self {
            norm1: group_norm(cfg.groups, in_channels, cfg.eps, vb.pp("norm1"))?,
            conv1: conv2d(in_channels, out, 3, conv3, vb.pp("conv1"))?,
            norm2: group_norm(cfg.groups, out, cfg.eps, vb.pp("norm2"))?,
            conv2: conv2d(out, out, 3, conv3, vb.pp("conv2"))?,
            time_emb_proj,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb` is the already computed time embedding (B, temb_channels), before the SiLU this
    /// block applies.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let mut h = self.conv1.forward(&self.norm1.forward(xs)?.silu()?)?;
        if let (Some(proj), Some(temb)) = (&self.time_emb_proj, temb) {
            let t = proj.forward(&temb.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
            h = h.broadcast_add(&t)?;
        }
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
