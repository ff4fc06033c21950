//! The candle custom-op plumbing shared by the kernels that take an input, a weight and an
//! optional bias (convolution, projection): one kernel type serves both the two-input op
//! (no bias) and the three-input one, so their forwards and backwards cannot drift apart.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// One input of a custom op's CPU forward: its storage and layout.
pub(crate) type Input<'a> = (&'a CpuStorage, &'a Layout);

/// Gradients of the input, the weight and the bias; `None` for what does not track gradients.
pub(crate) type Grads3 = (Option<Tensor>, Option<Tensor>, Option<Tensor>);

/// A layer weight as a fused forward receives it: f32, or f16 kept half in memory (see
/// [`super::fused_weight`]).
#[derive(Clone, Copy)]
pub(crate) enum WeightData<'a> {
    F32(&'a [f32]),
    F16(&'a [half::f16]),
}

impl<'a> WeightData<'a> {
    pub(crate) fn of(storage: &'a CpuStorage, layout: &Layout) -> Result<Self> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused op: expected a contiguous weight");
        };
        Ok(match storage {
            CpuStorage::F16(data) => Self::F16(&data[start..end]),
            other => Self::F32(&other.as_slice::<f32>()?[start..end]),
        })
    }

    /// The weight in f32 for the f32 products: borrowed, or an f16 one widened for this call
    /// only; empty when it went to the tile unit `packed` and the f32 products never read it.
    pub(crate) fn for_f32_products(self, packed: bool) -> std::borrow::Cow<'a, [f32]> {
        if packed {
            return std::borrow::Cow::Borrowed(&[]);
        }
        match self {
            Self::F32(w) => std::borrow::Cow::Borrowed(w),
            Self::F16(h) => std::borrow::Cow::Owned(super::widen_half(h)),
        }
    }
}

/// A fused kernel of `x`, a weight and an optional bias.
pub(crate) trait WeightedKernel: Send + Sync + 'static {
    /// The op's name without a bias and with one.
    const NAMES: (&'static str, &'static str);

    fn forward(&self, x: Input, weight: Input, bias: Option<Input>) -> Result<(CpuStorage, Shape)>;

    fn grads(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<Grads3>;
}

struct NoBias<K>(K);
struct WithBias<K>(K);

impl<K: WeightedKernel> CustomOp2 for NoBias<K> {
    fn name(&self) -> &'static str {
        K::NAMES.0
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.forward((xs, xl), (ws, wl), None)
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (dx, dw, _) = self.0.grads(x, weight, None, grad)?;
        Ok((dx, dw))
    }
}

impl<K: WeightedKernel> CustomOp3 for WithBias<K> {
    fn name(&self) -> &'static str {
        K::NAMES.1
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0.forward((xs, xl), (ws, wl), Some((bs, bl)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<Grads3> {
        self.0.grads(x, weight, Some(bias), grad)
    }
}

/// Applies `kernel` to contiguous copies of `x`, `weight` and `bias` (when there is one).
pub(crate) fn apply<K: WeightedKernel>(
    kernel: K,
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        None => x.apply_op2(&weight, NoBias(kernel)),
        Some(b) => x.apply_op3(&weight, &b.contiguous()?, WithBias(kernel)),
    }
}

/// Adds each `total.len()`-wide row of `rows` into `total`, in order.
pub(crate) fn add_rows(total: &mut [f32], rows: &[f32]) {
    for row in rows.chunks_exact(total.len()) {
        for (t, v) in total.iter_mut().zip(row) {
            *t += v;
        }
    }
}
