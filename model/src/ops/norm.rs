//! GroupNorm (optionally fused with the SiLU that follows it in every resnet) and LayerNorm,
//! each one pass over the data for the statistics and one for the output, with backward.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::gemm::{num_threads, par_for, SharedMut};
use super::vecmath::{dispatch, silu, silu_grad, sum, sum_sq_dev, MulAdd};
use super::{apply_contiguous3, cpu_tensor, forward_like_first, uninit_vec, with_all_data};

/// (batch, channels, elements per channel) of an NC... tensor.
fn ncs(shape: &Shape) -> Result<(usize, usize, usize)> {
    let dims = shape.dims();
    if dims.len() < 2 {
        candle_core::bail!("group norm: expected (B, C, ...), got {shape:?}");
    }
    Ok((dims[0], dims[1], dims[2..].iter().product()))
}

#[derive(Debug, Clone, Copy)]
struct GroupDims {
    channels: usize,
    spatial: usize,
    groups: usize,
}

impl GroupDims {
    fn per_group(&self) -> usize {
        self.channels / self.groups
    }
    fn group_len(&self) -> usize {
        self.per_group() * self.spatial
    }
}

/// Mean and 1/std of one group's elements (biased variance, as PyTorch).
#[inline(always)]
fn moments(xs: &[f32], eps: f32) -> (f32, f32) {
    let len = xs.len().max(1) as f32;
    let mean = sum(xs) / len;
    let var = sum_sq_dev(xs, mean) / len;
    (mean, 1.0 / (var + eps).sqrt())
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn group_norm_task_impl<F: MulAdd>(
    dims: GroupDims,
    eps: f32,
    with_silu: bool,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    out: SharedMut,
    task: usize,
) {
    let len = dims.group_len();
    let g = task % dims.groups;
    let xs = &x[task * len..(task + 1) * len];
    // SAFETY: task owns group `task` of the output.
    let ys = unsafe { out.slice(task * len, len) };
    let (mean, rstd) = moments(xs, eps);
    for (i, (xc, yc)) in xs
        .chunks_exact(dims.spatial)
        .zip(ys.chunks_exact_mut(dims.spatial))
        .enumerate()
    {
        let c = g * dims.per_group() + i;
        let a = rstd * gamma[c];
        let b = beta[c] - mean * a;
        if with_silu {
            for (y, &x) in yc.iter_mut().zip(xc) {
                *y = silu::<F>(F::mul_add(x, a, b));
            }
        } else {
            for (y, &x) in yc.iter_mut().zip(xc) {
                *y = F::mul_add(x, a, b);
            }
        }
    }
}

dispatch!(fn group_norm_task(dims: GroupDims, eps: f32, with_silu: bool, x: &[f32], gamma: &[f32], beta: &[f32], out: SharedMut, task: usize) => group_norm_task_impl);

/// Writes dx for one group and returns nothing; per-channel sums of dz and dz * xhat go to
/// `dgamma_dbeta[c]` and `[channels + c]` of this sample's row.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn group_norm_bwd_task_impl<F: MulAdd>(
    dims: GroupDims,
    eps: f32,
    with_silu: bool,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    grad: &[f32],
    dx: SharedMut,
    sums: SharedMut,
    task: usize,
) {
    let len = dims.group_len();
    let (b, g) = (task / dims.groups, task % dims.groups);
    let cpg = dims.per_group();
    let xs = &x[task * len..(task + 1) * len];
    let gs = &grad[task * len..(task + 1) * len];
    // SAFETY: task owns group `task` of dx and channels of group g in row b of `sums`.
    let dxs = unsafe { dx.slice(task * len, len) };
    let (mean, rstd) = moments(xs, eps);
    let (mut m1, mut m2) = (0f32, 0f32);
    for i in 0..cpg {
        let c = g * cpg + i;
        let range = i * dims.spatial..(i + 1) * dims.spatial;
        let (xc, gc, dc) = (&xs[range.clone()], &gs[range.clone()], &mut dxs[range]);
        // dz (the gradient before the affine), stored in dx for the second pass.
        if with_silu {
            let a = rstd * gamma[c];
            let bias = beta[c] - mean * a;
            for ((d, &x), &g) in dc.iter_mut().zip(xc).zip(gc) {
                *d = g * silu_grad::<F>(F::mul_add(x, a, bias));
            }
        } else {
            dc.copy_from_slice(gc);
        }
        let s_dz = sum(dc);
        let mut acc = [0f32; super::vecmath::LANES];
        let mut tail = 0f32;
        let mut xcs = xc.chunks_exact(acc.len());
        let mut dcs = dc.chunks_exact(acc.len());
        for (xv, dv) in (&mut xcs).zip(&mut dcs) {
            for j in 0..acc.len() {
                acc[j] += dv[j] * (xv[j] - mean);
            }
        }
        for (&x, &d) in xcs.remainder().iter().zip(dcs.remainder()) {
            tail += d * (x - mean);
        }
        let s_dz_xhat = (acc.iter().sum::<f32>() + tail) * rstd;
        unsafe {
            *sums.0.add(b * 2 * dims.channels + c) = s_dz_xhat;
            *sums.0.add(b * 2 * dims.channels + dims.channels + c) = s_dz;
        }
        m1 += gamma[c] * s_dz;
        m2 += gamma[c] * s_dz_xhat;
    }
    let inv_len = 1.0 / len.max(1) as f32;
    let (m1, m2) = (m1 * inv_len, m2 * inv_len);
    for i in 0..cpg {
        let c = g * cpg + i;
        let range = i * dims.spatial..(i + 1) * dims.spatial;
        let (xc, dc) = (&xs[range.clone()], &mut dxs[range]);
        let gc = gamma[c];
        for (d, &x) in dc.iter_mut().zip(xc) {
            let xhat = (x - mean) * rstd;
            *d = rstd * (gc * *d - m1 - xhat * m2);
        }
    }
}

dispatch!(fn group_norm_bwd_task(dims: GroupDims, eps: f32, with_silu: bool, x: &[f32], gamma: &[f32], beta: &[f32], grad: &[f32], dx: SharedMut, sums: SharedMut, task: usize) => group_norm_bwd_task_impl);

struct GroupNormOp {
    groups: usize,
    eps: f32,
    with_silu: bool,
}

impl GroupNormOp {
    fn dims(&self, shape: &Shape, gamma: &Shape, beta: &Shape) -> Result<(usize, GroupDims)> {
        let (b, c, s) = ncs(shape)?;
        if self.groups == 0
            || c % self.groups != 0
            || gamma.elem_count() != c
            || beta.elem_count() != c
        {
            candle_core::bail!(
                "group norm: {shape:?} with {} groups, weight {gamma:?}, bias {beta:?}",
                self.groups
            );
        }
        Ok((
            b,
            GroupDims {
                channels: c,
                spatial: s,
                groups: self.groups,
            },
        ))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "rl4pix-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, dims) = self.dims(xl.shape(), gl.shape(), bl.shape())?;
        forward_like_first((xs, xl), (gs, gl), (bs, bl), |x, gamma, beta, out| {
            par_for(batch * dims.groups, 4 * x.len(), |task| {
                group_norm_task(dims, self.eps, self.with_silu, x, gamma, beta, out, task)
            });
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (batch, dims) = self.dims(x.shape(), gamma.shape(), beta.shape())?;
        let c = dims.channels;
        let mut dx = uninit_vec(x.elem_count());
        // Per sample: [sum dz * xhat (dgamma) ; sum dz (dbeta)] for every channel.
        let mut sums = uninit_vec(batch * 2 * c);
        with_all_data([x, gamma, beta, grad], |[xd, gd, bd, gr]| {
            let (dxs, ss) = (SharedMut::new(&mut dx), SharedMut::new(&mut sums));
            par_for(batch * dims.groups, 8 * xd.len(), |task| {
                group_norm_bwd_task(
                    dims,
                    self.eps,
                    self.with_silu,
                    xd,
                    gd,
                    bd,
                    gr,
                    dxs,
                    ss,
                    task,
                )
            });
            Ok(())
        })?;
        let (dgamma, dbeta) = affine_grads(&sums, c, gamma, beta)?;
        Ok((Some(cpu_tensor(dx, x.dims())?), dgamma, dbeta))
    }
}

/// Weight and bias gradients of a norm's affine step from per-task partial sums laid out as
/// `[d_gamma (width) | d_beta (width)]` per task; `None` for a parameter that tracks no gradient.
fn affine_grads(
    partials: &[f32],
    width: usize,
    gamma: &Tensor,
    beta: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let sum = |offset: usize| {
        let mut total = vec![0f32; width];
        for task in partials.chunks_exact(2 * width) {
            for (t, &v) in total.iter_mut().zip(&task[offset..offset + width]) {
                *t += v;
            }
        }
        total
    };
    let dgamma = if gamma.track_op() {
        Some(cpu_tensor(sum(0), gamma.dims())?)
    } else {
        None
    };
    let dbeta = if beta.track_op() {
        Some(cpu_tensor(sum(width), beta.dims())?)
    } else {
        None
    };
    Ok((dgamma, dbeta))
}

/// GroupNorm over `(B, C, ...)` with per-channel weight and bias, then SiLU when `with_silu`.
pub fn group_norm(
    xs: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    groups: usize,
    eps: f64,
    with_silu: bool,
) -> Result<Tensor> {
    let op = GroupNormOp {
        groups,
        eps: eps as f32,
        with_silu,
    };
    apply_contiguous3(xs, gamma, beta, op)
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_rows_impl<F: MulAdd>(
    width: usize,
    eps: f32,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    out: SharedMut,
    first_row: usize,
    rows: usize,
) {
    let xs = &x[first_row * width..(first_row + rows) * width];
    // SAFETY: this task owns these rows of the output.
    let ys = unsafe { out.slice(first_row * width, rows * width) };
    for (xr, yr) in xs.chunks_exact(width).zip(ys.chunks_exact_mut(width)) {
        let (mean, rstd) = moments(xr, eps);
        for ((y, &x), (&g, &b)) in yr.iter_mut().zip(xr).zip(gamma.iter().zip(beta)) {
            *y = F::mul_add((x - mean) * rstd, g, b);
        }
    }
}

dispatch!(fn layer_norm_rows(width: usize, eps: f32, x: &[f32], gamma: &[f32], beta: &[f32], out: SharedMut, first_row: usize, rows: usize) => layer_norm_rows_impl);

/// dx for a block of rows; dgamma and dbeta partial sums of the block into `partial`
/// (2 * width: [dgamma ; dbeta]).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn layer_norm_bwd_rows_impl<F: MulAdd>(
    width: usize,
    eps: f32,
    x: &[f32],
    gamma: &[f32],
    grad: &[f32],
    dx: SharedMut,
    partial: &mut [f32],
    first_row: usize,
    rows: usize,
) {
    let range = first_row * width..(first_row + rows) * width;
    let (xs, gs) = (&x[range.clone()], &grad[range]);
    // SAFETY: this task owns these rows of dx.
    let dxs = unsafe { dx.slice(first_row * width, rows * width) };
    let (dgamma, dbeta) = partial.split_at_mut(width);
    let inv_w = 1.0 / width.max(1) as f32;
    for ((xr, gr), dr) in xs
        .chunks_exact(width)
        .zip(gs.chunks_exact(width))
        .zip(dxs.chunks_exact_mut(width))
    {
        let (mean, rstd) = moments(xr, eps);
        let (mut m1, mut m2) = (0f32, 0f32);
        for j in 0..width {
            let xhat = (xr[j] - mean) * rstd;
            let dxhat = gr[j] * gamma[j];
            dgamma[j] += gr[j] * xhat;
            dbeta[j] += gr[j];
            m1 += dxhat;
            m2 += dxhat * xhat;
        }
        let (m1, m2) = (m1 * inv_w, m2 * inv_w);
        for j in 0..width {
            let xhat = (xr[j] - mean) * rstd;
            dr[j] = rstd * F::mul_add(gr[j], gamma[j], -m1 - xhat * m2);
        }
    }
}

dispatch!(fn layer_norm_bwd_rows(width: usize, eps: f32, x: &[f32], gamma: &[f32], grad: &[f32], dx: SharedMut, partial: &mut [f32], first_row: usize, rows: usize) => layer_norm_bwd_rows_impl);

struct LayerNormOp {
    eps: f32,
}

/// Rows per parallel task for `rows` rows.
fn row_block(rows: usize) -> usize {
    rows.div_ceil(8 * num_threads()).max(1)
}

impl LayerNormOp {
    fn dims(shape: &Shape, gamma: &Shape, beta: &Shape) -> Result<(usize, usize)> {
        let width = *shape.dims().last().unwrap_or(&0);
        if width == 0 || gamma.elem_count() != width || beta.elem_count() != width {
            candle_core::bail!("layer norm: {shape:?} with weight {gamma:?}, bias {beta:?}");
        }
        Ok((shape.elem_count() / width, width))
    }
}

impl CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "rl4pix-layer-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (rows, width) = Self::dims(xl.shape(), gl.shape(), bl.shape())?;
        forward_like_first((xs, xl), (gs, gl), (bs, bl), |x, gamma, beta, out| {
            let block = row_block(rows);
            par_for(rows.div_ceil(block), 2 * x.len(), |t| {
                let first = t * block;
                let n = block.min(rows - first);
                layer_norm_rows(width, self.eps, x, gamma, beta, out, first, n);
            });
        })
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (rows, width) = Self::dims(x.shape(), gamma.shape(), beta.shape())?;
        let block = row_block(rows);
        let tasks = rows.div_ceil(block);
        let mut dx = uninit_vec(x.elem_count());
        let mut partials = vec![0f32; tasks * 2 * width];
        with_all_data([x, gamma, grad], |[xd, gd, gr]| {
            let shared = SharedMut::new(&mut dx);
            partials
                .par_chunks_mut(2 * width)
                .enumerate()
                .for_each(|(t, partial)| {
                    let first = t * block;
                    let n = block.min(rows - first);
                    layer_norm_bwd_rows(width, self.eps, xd, gd, gr, shared, partial, first, n);
                });
            Ok(())
        })?;
        let (dgamma, dbeta) = affine_grads(&partials, width, gamma, beta)?;
        Ok((Some(cpu_tensor(dx, x.dims())?), dgamma, dbeta))
    }
}

/// LayerNorm over the last dimension with weight and bias.
pub fn layer_norm(xs: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    apply_contiguous3(xs, gamma, beta, LayerNormOp { eps: eps as f32 })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::max_abs_diff;
    use candle_core::{Device, Module, Var};

    fn var(shape: &[usize], mean: f32) -> Var {
        Var::from_tensor(&Tensor::randn(mean, 1.0, shape, &Device::Cpu).unwrap()).unwrap()
    }

    #[test]
    fn group_norm_with_and_without_silu_matches_candle_with_gradients() {
        let x = var(&[2, 8, 5, 3], 0.5);
        let gamma = var(&[8], 1.0);
        let beta = var(&[8], 0.0);
        let target = Tensor::randn(0f32, 1.0, (2, 8, 5, 3), &Device::Cpu).unwrap();
        let reference_norm = candle_nn::GroupNorm::new(
            gamma.as_tensor().clone(),
            beta.as_tensor().clone(),
            8,
            4,
            1e-5,
        )
        .unwrap();
        for with_silu in [false, true] {
            let fused = group_norm(&x, &gamma, &beta, 4, 1e-5, with_silu).unwrap();
            let mut reference = reference_norm.forward(&x).unwrap();
            if with_silu {
                reference = candle_nn::ops::silu(&reference).unwrap();
            }
            assert!(max_abs_diff(&fused, &reference) < 1e-5);
            let loss = |t: &Tensor| (t * &target).unwrap().sum_all().unwrap();
            let gf = loss(&fused).backward().unwrap();
            let gr = loss(&reference).backward().unwrap();
            for v in [&x, &gamma, &beta] {
                let (a, b) = (gf.get(v).unwrap(), gr.get(v).unwrap());
                assert!(
                    max_abs_diff(a, b) < 1e-4,
                    "silu {with_silu}: {}",
                    max_abs_diff(a, b)
                );
            }
        }
    }

    #[test]
    fn frozen_affine_gets_no_gradient() {
        let x = var(&[1, 4, 3, 3], 0.0);
        let gamma = Tensor::ones(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        let beta = Tensor::zeros(4, candle_core::DType::F32, &Device::Cpu).unwrap();
        let y = group_norm(&x, &gamma, &beta, 2, 1e-6, true).unwrap();
        let grads = y.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&gamma).is_none());
    }

    #[test]
    fn layer_norm_matches_candle_with_gradients() {
        let x = var(&[3, 7, 40], 0.3);
        let gamma = var(&[40], 1.0);
        let beta = var(&[40], 0.0);
        let target = Tensor::randn(0f32, 1.0, (3, 7, 40), &Device::Cpu).unwrap();
        let fused = layer_norm(&x, &gamma, &beta, 1e-5).unwrap();
        let reference = candle_nn::ops::layer_norm_slow(&x, &gamma, &beta, 1e-5).unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-5);
        let loss = |t: &Tensor| (t * &target).unwrap().sum_all().unwrap();
        let gf = loss(&fused).backward().unwrap();
        let gr = loss(&reference).backward().unwrap();
        for v in [&x, &gamma, &beta] {
            let (a, b) = (gf.get(v).unwrap(), gr.get(v).unwrap());
            assert!(max_abs_diff(a, b) < 1e-4, "{}", max_abs_diff(a, b));
        }
    }
}
