//! GEGLU: `hidden * gelu(gate)` where `hidden, gate` are the two halves of the last dimension of
//! the feed-forward's first projection (diffusers' `GEGLU`), in one pass, with backward.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor};

use super::gemm::{num_threads, par_for, SharedMut};
use super::vecmath::{dispatch, gelu, gelu_grad, MulAdd};
use super::{cpu_storage_slice, cpu_tensor, uninit_vec, with_data};

#[inline(always)]
fn geglu_rows_impl<F: MulAdd>(inner: usize, x: &[f32], out: SharedMut, first: usize, rows: usize) {
    let xs = &x[first * 2 * inner..(first + rows) * 2 * inner];
    // SAFETY: this task owns these rows of the output.
    let ys = unsafe { out.slice(first * inner, rows * inner) };
    for (xr, yr) in xs.chunks_exact(2 * inner).zip(ys.chunks_exact_mut(inner)) {
        let (hidden, gate) = xr.split_at(inner);
        for ((y, &h), &g) in yr.iter_mut().zip(hidden).zip(gate) {
            *y = h * gelu::<F>(g);
        }
    }
}

dispatch!(fn geglu_rows(inner: usize, x: &[f32], out: SharedMut, first: usize, rows: usize) => geglu_rows_impl);

#[inline(always)]
fn geglu_bwd_rows_impl<F: MulAdd>(
    inner: usize,
    x: &[f32],
    grad: &[f32],
    dx: SharedMut,
    first: usize,
    rows: usize,
) {
    let xs = &x[first * 2 * inner..(first + rows) * 2 * inner];
    let gs = &grad[first * inner..(first + rows) * inner];
    // SAFETY: this task owns these rows of dx.
    let dxs = unsafe { dx.slice(first * 2 * inner, rows * 2 * inner) };
    for ((xr, gr), dr) in xs
        .chunks_exact(2 * inner)
        .zip(gs.chunks_exact(inner))
        .zip(dxs.chunks_exact_mut(2 * inner))
    {
        let (hidden, gate) = xr.split_at(inner);
        let (d_hidden, d_gate) = dr.split_at_mut(inner);
        for j in 0..inner {
            d_hidden[j] = gr[j] * gelu::<F>(gate[j]);
            d_gate[j] = gr[j] * hidden[j] * gelu_grad::<F>(gate[j]);
        }
    }
}

dispatch!(fn geglu_bwd_rows(inner: usize, x: &[f32], grad: &[f32], dx: SharedMut, first: usize, rows: usize) => geglu_bwd_rows_impl);

struct Geglu;

fn split(shape: &Shape) -> Result<(usize, usize, Vec<usize>)> {
    let dims = shape.dims();
    let last = *dims.last().unwrap_or(&0);
    if last == 0 || !last.is_multiple_of(2) {
        candle_core::bail!("geglu: last dimension of {shape:?} must be even");
    }
    let mut out = dims.to_vec();
    *out.last_mut().unwrap_or(&mut 0) = last / 2;
    Ok((shape.elem_count() / last, last / 2, out))
}

fn for_row_blocks(rows: usize, inner: usize, f: impl Fn(usize, usize) + Sync + Send) {
    let block = rows.div_ceil(8 * num_threads()).max(1);
    // erf and exp cost a few dozen operations per element.
    par_for(rows.div_ceil(block), rows * inner * 16, |t| {
        f(t * block, block.min(rows - t * block))
    });
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "rl4pix-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (rows, inner, out_dims) = split(l.shape())?;
        let x = cpu_storage_slice(s, l)?;
        let mut out = uninit_vec(rows * inner);
        let shared = SharedMut::new(&mut out);
        for_row_blocks(rows, inner, |first, n| {
            geglu_rows(inner, x, shared, first, n)
        });
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (rows, inner, _) = split(arg.shape())?;
        let mut dx = uninit_vec(arg.elem_count());
        with_data(arg, |x| {
            with_data(grad, |g| {
                let shared = SharedMut::new(&mut dx);
                for_row_blocks(rows, inner, |first, n| {
                    geglu_bwd_rows(inner, x, g, shared, first, n)
                });
                Ok(())
            })
        })?;
        Ok(Some(cpu_tensor(dx, arg.dims())?))
    }
}

/// `x[..., :inner] * gelu(x[..., inner:])` for `x` of last dimension `2 * inner`.
pub fn geglu(xs: &Tensor) -> Result<Tensor> {
    xs.contiguous()?.apply_op1(Geglu)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::max_abs_diff as diff;
    use candle_core::{Device, Var, D};

    #[test]
    fn matches_the_composed_form_with_gradient() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 5, 24), &Device::Cpu).unwrap()).unwrap();
        let target = Tensor::randn(0f32, 1.0, (3, 5, 12), &Device::Cpu).unwrap();
        let fused = geglu(&x).unwrap();
        let chunks = x.chunk(2, D::Minus1).unwrap();
        let reference = (&chunks[0] * chunks[1].gelu_erf().unwrap()).unwrap();
        assert!(diff(&fused, &reference) < 1e-5);
        let loss = |t: &Tensor| (t * &target).unwrap().sum_all().unwrap();
        let gf = loss(&fused).backward().unwrap();
        let gr = loss(&reference).backward().unwrap();
        let (a, b) = (gf.get(&x).unwrap(), gr.get(&x).unwrap());
        assert!(diff(a, b) < 1e-4, "{}", diff(a, b));
    }
}
