//! Fused CPU kernels for the UNet's hot paths, as candle custom ops.
//!
//! Each op has a forward for f32 tensors on the CPU and a backward (`bwd`) so that the same code
//! serves inference, LoRA training (frozen base: gradients of frozen weights are skipped) and
//! full-parameter pretraining. Callers check [`fast_path`] and otherwise use the composed candle
//! ops (other devices and dtypes, e.g. CUDA f16). `RL4PIX_FUSED=0` ([`FUSED_ENV`]) turns the
//! kernels off so that the composed path, the one a GPU runs, can be tested on the CPU.
//!
//! - [`attention`]: softmax(scale q k^T) v over all heads at once, reading heads straight out of
//!   the `(B, N, heads * d)` projections and writing the merged result, with the scores kept in
//!   per-task blocks (never a `(B, heads, N, M)` tensor); optionally also returns the
//!   head-averaged probabilities for cross-attention capture.
//! - [`norm`]: GroupNorm (optionally followed by SiLU) and LayerNorm in one pass each.
//! - [`geglu`]: `a * gelu(gate)` straight from the `(.., 2 * inner)` projection.
//! - [`conv`]: 2-D convolution as matrix products on the NCHW layout (1x1: one product; k x k: an
//!   im2col tile per task), with an optional per-sample bias (the resnet's time embedding).
//! - [`linear`]: `x W^T + b` with the bias written by the product and no weight gradient when
//!   the weight is frozen; token-major or channel-major inputs and outputs, so a spatial
//!   transformer's projections need no permuted copies.
//! - [`lora`]: a LoRA-adapted projection (frozen base plus one adapter) as one op, its rank-r
//!   products as dot products and its backward one sweep over the tokens.
//! - [`residual`]: the residual additions, kept on the same thread pool as everything else.
//! - [`matmul`]: every op's matrix products: f32 on the gemm crate ([`gemm`]), or bf16 inputs with
//!   f32 sums on the AMX tile unit ([`amx`]) under the `bf16` matmul precision.
//!
//! Threads: everything runs on rayon's global pool (`RAYON_NUM_THREADS`, as candle's matmul),
//! inline when there is one thread or little work; products split themselves over the pool only
//! when the surrounding loop has too few tasks to keep every thread busy.

pub mod amx;
pub mod attention;
pub mod conv;
pub mod geglu;
pub mod gemm;
pub mod linear;
pub mod lora;
pub mod matmul;
pub mod modules;
pub mod norm;
pub mod residual;
#[cfg(test)]
pub(crate) mod test_util;
pub mod vecmath;
mod weighted;

use candle_core::{CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor};

use gemm::SharedMut;

/// Whether the fused CPU kernels handle these tensors (f32 on the CPU, kernels enabled). This is
/// the one place the model chooses between the fused kernels and the composed candle ops.
pub fn fast_path(xs: &Tensor) -> bool {
    fused_enabled() && matches!(xs.device(), Device::Cpu) && xs.dtype() == DType::F32
}

/// The environment variable that turns the fused kernels off (`RL4PIX_FUSED=0`), so that the
/// composed candle ops, the path CUDA and f16/bf16 weights take, also run on the CPU.
pub const FUSED_ENV: &str = "RL4PIX_FUSED";

/// Whether the fused kernels are enabled; [`FUSED_ENV`] is read once per process. `0`, `false`
/// and `off` turn them off; anything else (or nothing) leaves them on.
pub fn fused_enabled() -> bool {
    static ENABLED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ENABLED.get_or_init(|| {
        let value = std::env::var(FUSED_ENV).unwrap_or_default();
        parse_fused_switch(&value).unwrap_or_else(|| {
            tracing::warn!(
                "{FUSED_ENV}={value:?} is not 0/1, true/false or on/off; fused kernels stay on"
            );
            true
        })
    })
}

/// `None` for a value that is neither on nor off; empty means unset (on).
fn parse_fused_switch(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "" | "1" | "true" | "on" | "yes" => Some(true),
        "0" | "false" | "off" | "no" => Some(false),
        _ => None,
    }
}

/// `weight` in `dtype` for one use ([`crate::weights::WeightStorage::AsStored`] keeps half-precision
/// weights half between uses). A no-op when it already has that dtype; half to f32 on the CPU is
/// converted in parallel blocks with the F16C instructions, about a tenth of the time of the
/// products that then read it.
pub fn widen(weight: &Tensor, dtype: DType) -> Result<Tensor> {
    if weight.dtype() == dtype {
        return Ok(weight.clone());
    }
    if !(matches!(weight.device(), Device::Cpu) && dtype == DType::F32) {
        return weight.to_dtype(dtype);
    }
    let weight = weight.contiguous()?;
    let (storage, layout) = weight.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return weight.to_dtype(dtype);
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return weight.to_dtype(dtype);
    };
    let out = match cpu {
        CpuStorage::F16(data) => widen_half(&data[start..end]),
        CpuStorage::BF16(data) => widen_half(&data[start..end]),
        _ => return weight.to_dtype(dtype),
    };
    cpu_tensor(out, weight.dims())
}

/// Half-precision values in f32, converted in parallel blocks with the F16C (or AVX-512 BF16)
/// instructions.
pub(crate) fn widen_half<T: Sync>(data: &[T]) -> Vec<f32>
where
    [T]: half::slice::HalfFloatSliceExt,
{
    use half::slice::HalfFloatSliceExt;
    use rayon::prelude::*;
    const BLOCK: usize = 1 << 16;
    let mut out = uninit_vec(data.len());
    out.par_chunks_mut(BLOCK)
        .zip(data.par_chunks(BLOCK))
        .for_each(|(o, i)| i.convert_to_f32_slice(o));
    out
}

/// The weight a fused convolution or projection of `xs` takes: an f16 weight kept half in
/// memory goes in as it is when no gradient is needed (the kernel packs it straight to bf16 for
/// the tile unit, or widens it into a scratch buffer), so no f32 copy of the whole weight is
/// made per use. Anything else is [`widen`]ed to `xs`'s dtype, as the backward passes need.
pub fn fused_weight(weight: &Tensor, xs: &Tensor) -> Result<Tensor> {
    let half_in_place = weight.dtype() == DType::F16
        && xs.dtype() == DType::F32
        && matches!(weight.device(), Device::Cpu)
        && !xs.track_op()
        && !weight.track_op();
    if half_in_place {
        Ok(weight.clone())
    } else {
        widen(weight, xs.dtype())
    }
}

/// The f32 elements of a contiguous CPU tensor's storage, from its start offset.
pub(crate) fn cpu_slice<'a>(storage: &'a Storage, layout: &Layout) -> Result<&'a [f32]> {
    let Storage::Cpu(cpu) = storage else {
        candle_core::bail!("fused op: expected a CPU tensor");
    };
    let data = cpu.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused op: expected a contiguous tensor"),
    }
}

/// Same, for the `CpuStorage` a custom op's `cpu_fwd` receives.
pub(crate) fn cpu_storage_slice<'a>(
    storage: &'a candle_core::CpuStorage,
    layout: &Layout,
) -> Result<&'a [f32]> {
    let data = storage.as_slice::<f32>()?;
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused op: expected a contiguous tensor"),
    }
}

/// Runs `f` on the contiguous f32 data of `t` (made contiguous first if needed).
pub(crate) fn with_data<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    f(cpu_slice(&storage, layout)?)
}

/// Runs `f` on the contiguous f32 data of every tensor in `ts`, in order (each made contiguous
/// first if needed).
pub(crate) fn with_all_data<const N: usize, R>(
    ts: [&Tensor; N],
    f: impl FnOnce([&[f32]; N]) -> Result<R>,
) -> Result<R> {
    let ts = ts
        .into_iter()
        .map(Tensor::contiguous)
        .collect::<Result<Vec<_>>>()?;
    let guards: Vec<_> = ts.iter().map(Tensor::storage_and_layout).collect();
    let data = guards
        .iter()
        .map(|(storage, layout)| cpu_slice(storage, layout))
        .collect::<Result<Vec<_>>>()?;
    f(data.try_into().expect("one slice per tensor"))
}

/// The forward of an op whose output has the shape of its first input: the three inputs' data
/// and a fresh output buffer, which `fill` writes completely.
pub(crate) fn forward_like_first(
    (xs, xl): weighted::Input,
    (ys, yl): weighted::Input,
    (zs, zl): weighted::Input,
    fill: impl FnOnce(&[f32], &[f32], &[f32], SharedMut),
) -> Result<(CpuStorage, Shape)> {
    let (x, y, z) = (
        cpu_storage_slice(xs, xl)?,
        cpu_storage_slice(ys, yl)?,
        cpu_storage_slice(zs, zl)?,
    );
    let mut out = uninit_vec(x.len());
    fill(x, y, z, SharedMut::new(&mut out));
    Ok((CpuStorage::F32(out), xl.shape().clone()))
}

/// Applies a three-input op to contiguous copies of its inputs.
pub(crate) fn apply_contiguous3(
    x: &Tensor,
    y: &Tensor,
    z: &Tensor,
    op: impl CustomOp3 + Send + Sync + 'static,
) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&y.contiguous()?, &z.contiguous()?, op)
}

/// A fresh f32 buffer whose every element the caller writes before anything reads it.
///
/// Zeroing it first cost 6-7% of a forward pass once the products ran on AMX (glibc's calloc
/// clears reused heap memory with a memset). Candle's own CPU backend allocates its outputs the
/// same way (`alloc_uninit`). Debug builds, which run the test suite, fill the buffer with NaN
/// instead, so a kernel that reads an element it has not written fails every parity test.
// Clippy's lint is about types with invalid bit patterns or reads before writes; neither applies.
#[allow(clippy::uninit_vec)]
pub(crate) fn uninit_vec(len: usize) -> Vec<f32> {
    if cfg!(debug_assertions) {
        return vec![f32::NAN; len];
    }
    let mut out = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`, and f32 has no invalid bit patterns; every caller writes
    // each element before reading it (checked by the NaN fill above in debug builds).
    unsafe { out.set_len(len) };
    out
}

pub(crate) fn cpu_tensor(data: Vec<f32>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(data, shape, &Device::Cpu)
}

#[cfg(test)]
mod switch_tests {
    use super::parse_fused_switch;

    #[test]
    fn fused_switch_values() {
        for on in ["", "1", "true", "ON", " yes "] {
            assert_eq!(parse_fused_switch(on), Some(true), "{on:?}");
        }
        for off in ["0", "false", "Off", "no"] {
            assert_eq!(parse_fused_switch(off), Some(false), "{off:?}");
        }
        assert_eq!(parse_fused_switch("2"), None);
    }
}
