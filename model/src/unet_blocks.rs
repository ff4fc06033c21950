//! The UNet's down, mid and up blocks (diffusers' `CrossAttnDownBlock2D`, `DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`, `UpBlock2D`).

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::attention::{ForwardCtx, Transformer2DConfig, Transformer2DModel};
use crate::lora::ProjectionTable;
use crate::resample::{Downsample2D, Upsample2D};
use crate::resnet::{ResnetBlock2D, ResnetConfig};

/// What every block shares: resnet settings and, for blocks with attention, the transformer's.
pub struct BlockConfig {
    pub resnet: ResnetConfig,
    /// `None` for blocks without cross-attention.
    pub transformer: Option<Transformer2DConfig>,
}

impl BlockConfig {
    /// A block's `resnets.{i}`.
    fn resnet(&self, vb: &VarBuilder, i: usize, in_channels: usize) -> Result<ResnetBlock2D> {
        ResnetBlock2D::new(vb.pp("resnets").pp(i), in_channels, self.resnet)
    }

    /// Appends a block's `attentions.{i}` to `attentions` when the block has cross-attention.
    fn push_attention(
        &self,
        vb: &VarBuilder,
        i: usize,
        channels: usize,
        table: &mut ProjectionTable,
        attentions: &mut Vec<Transformer2DModel>,
    ) -> Result<()> {
        if let Some(tcfg) = &self.transformer {
            attentions.push(Transformer2DModel::new(
                vb.pp("attentions").pp(i),
                channels,
                tcfg,
                table,
            )?);
        }
        Ok(())
    }
}

/// A resnet, then the attention after it when the block has one.
fn resnet_then_attention(
    resnet: &ResnetBlock2D,
    attention: Option<&Transformer2DModel>,
    xs: &Tensor,
    temb: &Tensor,
    context: &Tensor,
    ctx: ForwardCtx,
) -> Result<Tensor> {
    let xs = resnet.forward(xs, Some(temb))?;
    match attention {
        Some(attn) => attn.forward(&xs, context, ctx),
        None => Ok(xs),
    }
}

#[derive(Debug, Clone)]
pub struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        add_downsample: bool,
        downsample_padding: usize,
        cfg: &BlockConfig,
        table: &mut ProjectionTable,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let in_ch = if i == 0 { in_channels } else { out_channels };
            resnets.push(cfg.resnet(&vb, i, in_ch)?);
            cfg.push_attention(&vb, i, out_channels, table, &mut attentions)?;
        }
        let downsampler = if add_downsample {
            Some(Downsample2D::new(
                vb.pp("downsamplers").pp(0),
                out_channels,
                out_channels,
                downsample_padding,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    /// Returns the block's output and the skip states it hands to the up path.
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ctx: ForwardCtx,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let attn = self.attentions.get(i);
            xs = resnet_then_attention(resnet, attn, &xs, temb, context, ctx)?;
            skips.push(xs.clone());
        }
        if let Some(down) = &self.downsampler {
            xs = down.forward(&xs)?;
            skips.push(xs.clone());
        }
        Ok(xs)
    }
}

#[derive(Debug, Clone)]
pub struct MidBlock {
    first: ResnetBlock2D,
    attentions: Vec<Transformer2DModel>,
    resnets: Vec<ResnetBlock2D>,
}

impl MidBlock {
    pub fn new(
        vb: VarBuilder,
        channels: usize,
        layers: usize,
        cfg: &BlockConfig,
        table: &mut ProjectionTable,
    ) -> Result<Self> {
        let first = cfg.resnet(&vb, 0, channels)?;
        let mut attentions = Vec::with_capacity(layers);
        let mut resnets = Vec::with_capacity(layers);
        for i in 0..layers {
            cfg.push_attention(&vb, i, channels, table, &mut attentions)?;
            resnets.push(cfg.resnet(&vb, i + 1, channels)?);
        }
        Ok(Self {
            first,
            attentions,
            resnets,
        })
    }

    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ctx: ForwardCtx,
    ) -> Result<Tensor> {
        let mut xs = self.first.forward(xs, Some(temb))?;
        for (i, resnet) in self.resnets.iter().enumerate() {
            if let Some(attn) = self.attentions.get(i) {
                xs = attn.forward(&xs, context, ctx)?;
            }
            xs = resnet.forward(&xs, Some(temb))?;
        }
        Ok(xs)
    }
}

#[derive(Debug, Clone)]
pub struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<Transformer2DModel>,
    upsampler: Option<Upsample2D>,
}

pub struct UpBlockChannels {
    pub in_channels: usize,
    pub prev_output_channels: usize,
    pub out_channels: usize,
}

impl UpBlock {
    pub fn new(
        vb: VarBuilder,
        ch: UpBlockChannels,
        layers: usize,
        add_upsample: bool,
        cfg: &BlockConfig,
        table: &mut ProjectionTable,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(layers);
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip_ch = if i == layers - 1 {
                ch.in_channels
            } else {
                ch.out_channels
            };
            let in_ch = if i == 0 {
                ch.prev_output_channels
            } else {
                ch.out_channels
            };
            resnets.push(cfg.resnet(&vb, i, in_ch + skip_ch)?);
            cfg.push_attention(&vb, i, ch.out_channels, table, &mut attentions)?;
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::new(
                vb.pp("upsamplers").pp(0),
                ch.out_channels,
                ch.out_channels,
            )?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    /// Consumes this block's skip states from the end of `skips`. The upsampler targets the
    /// size of the next skip state, which is how diffusers handles sizes that are not a
    /// multiple of the total downsampling (and equals plain 2x otherwise).
    pub fn forward(
        &self,
        xs: &Tensor,
        temb: &Tensor,
        context: &Tensor,
        ctx: ForwardCtx,
        skips: &mut Vec<Tensor>,
    ) -> Result<Tensor> {
        let mut xs = xs.clone();
        for (i, resnet) in self.resnets.iter().enumerate() {
            let skip = skips
                .pop()
                .ok_or_else(|| candle_core::Error::Msg("UNet skip stack exhausted".into()))?;
            xs = Tensor::cat(&[&xs, &skip], 1)?;
            let attn = self.attentions.get(i);
            xs = resnet_then_attention(resnet, attn, &xs, temb, context, ctx)?;
        }
        if let Some(up) = &self.upsampler {
            let size = match skips.last() {
                Some(next) => {
                    let (_, _, h, w) = next.dims4()?;
                    Some((h, w))
                }
                None => None,
            };
            xs = up.forward(&xs, size)?;
        }
        Ok(xs)
    }
}
