//! `Downsample2D` / `Upsample2D` as diffusers defines them.

use candle_core::{Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

use crate::ops::modules::Conv2d;

#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    /// The VAE pads (0, 1, 0, 1) and convolves without padding; the UNet pads 1 on all sides.
    asymmetric_pad: bool,
}

impl Downsample2D {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        out_channels: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            stride: 2,
            padding,
            ..Default::default()
        };
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), channels, out_channels, 3, cfg)?,
            asymmetric_pad: padding == 0,
        })
    }
}

impl Module for Downsample2D {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.asymmetric_pad {
            let xs = xs.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&xs)
        } else {
            self.conv.forward(xs)
        }
    }
}

#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize, out_channels: usize) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            conv: Conv2d::new(vb.pp("conv"), channels, out_channels, 3, cfg)?,
        })
    }

    /// Nearest-neighbour upsampling by 2, or to `size` (H, W) when the input size was not a
    /// multiple of the total downsampling (diffusers passes the skip connection's size then).
    pub fn forward(&self, xs: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = xs.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let xs = xs.upsample_nearest2d(th, tw)?;
        self.conv.forward(&xs)
    }
}
