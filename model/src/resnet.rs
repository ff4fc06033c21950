//! `ResnetBlock2D` as diffusers defines it (shared by the UNet and the VAE).

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::ops::modules::{Conv2d, GroupNorm, Linear};

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
            Some(Conv2d::new(
                vb.pp("conv_shortcut"),
                in_channels,
                out,
                1,
                Default::default(),
            )?)
        } else {
            None
        };
        let time_emb_proj = match cfg.temb_channels {
            Some(t) => Some(Linear::new(vb.pp("time_emb_proj"), t, out)?),
            None => None,
        };
        Ok(Self {
            norm1: GroupNorm::new(vb.pp("norm1"), cfg.groups, in_channels, cfg.eps)?,
            conv1: Conv2d::new(vb.pp("conv1"), in_channels, out, 3, conv3)?,
            norm2: GroupNorm::new(vb.pp("norm2"), cfg.groups, out, cfg.eps)?,
            conv2: Conv2d::new(vb.pp("conv2"), out, out, 3, conv3)?,
            time_emb_proj,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `temb` is the already computed time embedding (B, temb_channels), before the SiLU this
    /// block applies.
    pub fn forward(&self, xs: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        // Each intermediate is dropped as soon as the next exists (a shadowed binding would live
        // to the end of the function): at a VAE's full resolution they are hundreds of MB each.
        let h = {
            let normed = self.norm1.forward_silu(xs)?;
            // The time embedding enters as a per-sample bias of conv1.
            match (&self.time_emb_proj, temb) {
                (Some(proj), Some(temb)) => {
                    let t = proj.forward(&temb.silu()?)?;
                    self.conv1.forward_with_sample_bias(&normed, &t)?
                }
                _ => self.conv1.forward(&normed)?,
            }
        };
        let activated = self.norm2.forward_silu(&h)?;
        drop(h);
        let h = self.conv2.forward(&activated)?;
        drop(activated);
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = crate::ops::residual::residual(&shortcut, &h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}
