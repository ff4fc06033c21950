//! LoRA-capable linear projections: `W x + b + sum_i s_i B_i (A_i x)`.
//!
//! The base weights never change. Adapters are resolved once against the UNet's projection
//! table (`ResolvedAdapter`: one optional low-rank pair per projection slot) and passed to each
//! forward call, so attaching, detaching or pinning an adapter per request costs nothing and
//! never mutates shared state mid-forward. Training builds a `ResolvedAdapter` from `Var`s, so
//! gradients reach A and B through the same code path.

use std::sync::Arc;

use candle_core::{Result, Tensor};
use candle_nn::{Linear, VarBuilder};

/// One LoRA pair prepared for the forward pass: `A` (r, in) for the fused kernel, `A^T` (in, r)
/// for the composed path, and `s * B^T` (r, out) for both. The extra copy is rank x in floats;
/// keeping it saves a transpose per projection per step on the composed (GPU) path.
#[derive(Debug, Clone)]
pub struct LoraDelta {
    /// `A`, (rank, in): the fused kernel's layout.
    down: Tensor,
    /// `A^T`, (in, rank): the composed path's.
    down_t: Tensor,
    up_t_scaled: Tensor,
}

impl LoraDelta {
    /// `down` is A (r, in), `up` is B (out, r), `scale` is alpha / r.
    pub fn new(down: &Tensor, up: &Tensor, scale: f64) -> Result<Self> {
        Ok(Self {
            down: down.contiguous()?,
            down_t: down.t()?.contiguous()?,
            up_t_scaled: (up.t()? * scale)?.contiguous()?,
        })
    }

    fn apply(&self, xs: &Tensor) -> Result<Tensor> {
        xs.broadcast_matmul(&self.down_t)?
            .broadcast_matmul(&self.up_t_scaled)
    }
}

/// An adapter resolved against one UNet: `deltas[slot]` for each LoRA-capable projection.
#[derive(Debug, Clone)]
pub struct ResolvedAdapter {
    pub name: String,
    pub deltas: Vec<Option<LoraDelta>>,
}

/// The adapters active for one forward call, applied in order.
pub type ActiveAdapters<'a> = &'a [Arc<ResolvedAdapter>];

/// A linear projection with a slot number in its model's projection table.
#[derive(Debug, Clone)]
pub struct LoraLinear {
    base: Linear,
    slot: usize,
}

impl LoraLinear {
    pub fn new(
        vb: VarBuilder,
        in_dim: usize,
        out_dim: usize,
        bias: bool,
        table: &mut ProjectionTable,
    ) -> Result<Self> {
        let path = vb.prefix();
        let base = if bias {
            candle_nn::linear(in_dim, out_dim, vb)?
        } else {
            candle_nn::linear_no_bias(in_dim, out_dim, vb)?
        };
        let slot = table.register(path, in_dim, out_dim);
        Ok(Self { base, slot })
    }

    pub fn forward(&self, xs: &Tensor, adapters: ActiveAdapters) -> Result<Tensor> {
        let mut deltas = adapters
            .iter()
            .filter_map(|adapter| adapter.deltas.get(self.slot)?.as_ref());
        let fast = crate::ops::fast_path(xs);
        let frozen_base = crate::ops::lora::base_is_frozen(self.base.weight(), self.base.bias());
        // The base and the first adapter run as one op where they can (the common case: one
        // adapter on a frozen base); further adapters, if any, are added on.
        let fused_first = if fast && frozen_base {
            deltas.next()
        } else {
            None
        };
        let mut ys = if fast {
            let weight = match fused_first {
                // The LoRA kernel reads its base weight in f32.
                Some(_) => crate::ops::widen(self.base.weight(), xs.dtype())?,
                None => crate::ops::fused_weight(self.base.weight(), xs)?,
            };
            match fused_first {
                Some(delta) => crate::ops::lora::lora_projection(
                    xs,
                    &weight,
                    self.base.bias(),
                    &delta.down,
                    &delta.up_t_scaled,
                )?,
                None => crate::ops::linear::linear(xs, &weight, self.base.bias())?,
            }
        } else {
            crate::ops::modules::composed_linear(&self.base, xs)?
        };
        for delta in deltas {
            ys = (ys + delta.apply(xs)?)?;
        }
        Ok(ys)
    }
}

/// Every LoRA-capable projection of a model: its module path (as in the checkpoint) and shape,
/// indexed by slot.
#[derive(Debug, Clone, Default)]
pub struct ProjectionTable {
    pub entries: Vec<ProjectionInfo>,
}

#[derive(Debug, Clone)]
pub struct ProjectionInfo {
    pub path: String,
    pub in_features: usize,
    pub out_features: usize,
}

impl ProjectionTable {
    fn register(&mut self, path: String, in_features: usize, out_features: usize) -> usize {
        self.entries.push(ProjectionInfo {
            path,
            in_features,
            out_features,
        });
        self.entries.len() - 1
    }

    pub fn slot_of(&self, path: &str) -> Option<usize> {
        self.entries.iter().position(|e| e.path == path)
    }
}
