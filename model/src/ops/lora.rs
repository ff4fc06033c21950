//! A LoRA-adapted projection as one op: `y = x W^T + b + (x A^T) (s B^T)` for token-major `x`
//! (`(..., in)`), the frozen base `W` (out, in) and bias `b`, and one adapter's `A` (rank, in)
//! and `s B^T` (rank, out).
//!
//! Composed, the adapter is two thin matrix products, a scale and an add: four autograd nodes
//! of activation size, each of whose gradients candle materialises (zero-filled, then added to),
//! and rank-4 products the matmul kernels run on their narrowest, mostly idle tiles. Here the
//! rank-`r` intermediates are `r` dot products per token, the backward pass computes `dx`, `dA`
//! and `d(s B^T)` in one sweep over the tokens, and the graph gets one node.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor};

use super::gemm::{par_for, MatMut, MatRef, SharedMut};
use super::matmul::sgemm;
use super::vecmath::dot;
use super::weighted::Input;
use super::{cpu_storage_slice, cpu_tensor, uninit_vec, with_all_data};

/// Tokens per task. Fixed, so a token's result and the order partial gradients are summed in
/// depend on neither the batch nor the thread count.
const ROW_BLOCK: usize = 256;

struct LoraProjection {
    /// The frozen base, already in f32; never tracks gradients.
    weight: Tensor,
    bias: Option<Tensor>,
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    rows: usize,
    in_f: usize,
    out_f: usize,
    rank: usize,
}

impl Dims {
    fn of(x: &Shape, weight: &Shape, down: &Shape, up: &Shape) -> Result<Self> {
        let (out_f, in_f) = weight.dims2()?;
        let (rank, down_in) = down.dims2()?;
        let (up_rank, up_out) = up.dims2()?;
        if x.dims().last() != Some(&in_f) || down_in != in_f || up_rank != rank || up_out != out_f {
            candle_core::bail!(
                "lora projection: input {x:?}, weight {weight:?}, down {down:?}, up^T {up:?}"
            );
        }
        Ok(Self {
            rows: x.elem_count() / in_f.max(1),
            in_f,
            out_f,
            rank,
        })
    }
}

/// `t[k] = x . down[k]` for each of the adapter's `rank` rows.
fn down_project(x_row: &[f32], down: &[f32], in_f: usize, t: &mut [f32]) {
    for (tk, down_k) in t.iter_mut().zip(down.chunks_exact(in_f)) {
        *tk = dot(x_row, down_k);
    }
}

/// `dst += sum_k coef[k] * rows[k]`.
fn add_combination(dst: &mut [f32], coef: &[f32], rows: &[f32]) {
    for (&c, row) in coef.iter().zip(rows.chunks_exact(dst.len())) {
        for (d, &r) in dst.iter_mut().zip(row) {
            *d += c * r;
        }
    }
}

/// Runs `f` with the f32 data of a captured tensor as a custom-op input.
fn with_input<R>(t: &Tensor, f: impl FnOnce(Input) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        candle_core::bail!("lora projection: expected a CPU tensor");
    };
    f((cpu, layout))
}

impl CustomOp3 for LoraProjection {
    fn name(&self) -> &'static str {
        "rl4pix-lora-projection"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ds: &CpuStorage,
        dl: &Layout,
        us: &CpuStorage,
        ul: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(xl.shape(), self.weight.shape(), dl.shape(), ul.shape())?;
        let (storage, shape) = with_input(&self.weight, |w| match &self.bias {
            Some(bias) => with_input(bias, |b| {
                super::linear::forward_tokens((xs, xl), w, Some(b))
            }),
            None => super::linear::forward_tokens((xs, xl), w, None),
        })?;
        let CpuStorage::F32(mut out) = storage else {
            candle_core::bail!("lora projection: the base projection did not return f32");
        };
        let (x, down, up) = (
            cpu_storage_slice(xs, xl)?,
            cpu_storage_slice(ds, dl)?,
            cpu_storage_slice(us, ul)?,
        );
        let shared = SharedMut::new(&mut out);
        let blocks = dims.rows.div_ceil(ROW_BLOCK);
        let work = dims.rows * dims.rank * (dims.in_f + dims.out_f);
        par_for(blocks, work, |blk| {
            let r0 = blk * ROW_BLOCK;
            let rows = ROW_BLOCK.min(dims.rows - r0);
            let mut t = vec![0f32; dims.rank];
            // SAFETY: rows r0..r0 + rows of the output are this task's alone.
            let out_blk = unsafe { shared.slice(r0 * dims.out_f, rows * dims.out_f) };
            let x_blk = &x[r0 * dims.in_f..(r0 + rows) * dims.in_f];
            for (x_row, out_row) in x_blk
                .chunks_exact(dims.in_f)
                .zip(out_blk.chunks_exact_mut(dims.out_f))
            {
                down_project(x_row, down, dims.in_f, &mut t);
                add_combination(out_row, &t, up);
            }
        });
        Ok((CpuStorage::F32(out), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        down: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::of(x.shape(), self.weight.shape(), down.shape(), up.shape())?;
        let (rank, in_f, out_f) = (dims.rank, dims.in_f, dims.out_f);
        let want_dx = x.track_op();
        let want_adapter = down.track_op() || up.track_op();
        let mut dx = if want_dx {
            uninit_vec(dims.rows * in_f)
        } else {
            Vec::new()
        };
        let blocks = dims.rows.div_ceil(ROW_BLOCK);
        // Per-block partial sums of dA (rank x in) then d(s B^T) (rank x out), added in block
        // order afterwards.
        let partial_len = rank * (in_f + out_f);
        let mut partials = if want_adapter {
            vec![0f32; blocks * partial_len]
        } else {
            Vec::new()
        };
        with_all_data([x, down, up, grad, &self.weight], |[xd, dd, ud, gd, wd]| {
            if want_dx {
                // The base: dx = g W, every token at once.
                // SAFETY: g is rows x out, W out x in, dx rows x in; nothing else writes dx.
                unsafe {
                    sgemm(
                        dims.rows,
                        in_f,
                        out_f,
                        MatMut::rows(&mut dx, 0, in_f),
                        false,
                        MatRef::rows(gd, 0, out_f),
                        MatRef::rows(wd, 0, in_f),
                        1.0,
                        true,
                    )
                };
            }
            let dx_shared = SharedMut::new(&mut dx);
            let partial_shared = SharedMut::new(&mut partials);
            let work = dims.rows * rank * (2 * in_f + 2 * out_f);
            par_for(blocks, work, |blk| {
                let r0 = blk * ROW_BLOCK;
                let rows = ROW_BLOCK.min(dims.rows - r0);
                let (mut t, mut gu) = (vec![0f32; rank], vec![0f32; rank]);
                // SAFETY: block blk's rows of dx and its partial sums are this task's alone.
                let (mut dx_blk, mut partial) = unsafe {
                    (
                        want_dx.then(|| dx_shared.slice(r0 * in_f, rows * in_f)),
                        want_adapter.then(|| partial_shared.slice(blk * partial_len, partial_len)),
                    )
                };
                for i in 0..rows {
                    let row = r0 + i;
                    let x_row = &xd[row * in_f..(row + 1) * in_f];
                    let g_row = &gd[row * out_f..(row + 1) * out_f];
                    // gu[k] = g . (s B^T)[k]: the gradient reaching the rank-r intermediate.
                    for (gk, up_k) in gu.iter_mut().zip(ud.chunks_exact(out_f)) {
                        *gk = dot(g_row, up_k);
                    }
                    if let Some(dx_blk) = dx_blk.as_deref_mut() {
                        add_combination(&mut dx_blk[i * in_f..(i + 1) * in_f], &gu, dd);
                    }
                    if let Some(partial) = partial.as_deref_mut() {
                        down_project(x_row, dd, in_f, &mut t);
                        let (d_down, d_up) = partial.split_at_mut(rank * in_f);
                        for k in 0..rank {
                            let acc = &mut d_down[k * in_f..(k + 1) * in_f];
                            for (a, &xv) in acc.iter_mut().zip(x_row) {
                                *a += gu[k] * xv;
                            }
                            let acc = &mut d_up[k * out_f..(k + 1) * out_f];
                            for (a, &gv) in acc.iter_mut().zip(g_row) {
                                *a += t[k] * gv;
                            }
                        }
                    }
                }
            });
            Ok(())
        })?;
        let dx = want_dx.then(|| cpu_tensor(dx, x.dims())).transpose()?;
        let (d_down, d_up) = if want_adapter {
            let mut total = vec![0f32; partial_len];
            super::weighted::add_rows(&mut total, &partials);
            let d_up = total.split_off(rank * in_f);
            (
                down.track_op()
                    .then(|| cpu_tensor(total, down.dims()))
                    .transpose()?,
                up.track_op()
                    .then(|| cpu_tensor(d_up, up.dims()))
                    .transpose()?,
            )
        } else {
            (None, None)
        };
        Ok((dx, d_down, d_up))
    }
}

/// Whether a base projection can go into [`lora_projection`]: neither its weight nor its bias
/// tracks gradients.
pub fn base_is_frozen(weight: &Tensor, bias: Option<&Tensor>) -> bool {
    !weight.track_op() && !bias.is_some_and(Tensor::track_op)
}

/// `x W^T + b + (x down^T) up_t_scaled` for `x` (..., in), a frozen `weight` (out, in) already
/// in `x`'s dtype, `bias` (out), `down` (rank, in) and `up_t_scaled` (rank, out). Differentiable
/// with respect to `x`, `down` and `up_t_scaled`; the base must not track gradients (callers
/// that train it take the composed ops). CPU f32 only (see [`super::fast_path`]).
pub fn lora_projection(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    down: &Tensor,
    up_t_scaled: &Tensor,
) -> Result<Tensor> {
    if !base_is_frozen(weight, bias) {
        candle_core::bail!("lora projection: the base weight and bias must be frozen");
    }
    let op = LoraProjection {
        weight: weight.detach(),
        bias: bias.map(Tensor::detach),
    };
    super::apply_contiguous3(x, down, up_t_scaled, op)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{max_abs_diff as diff, var};
    use candle_core::Device;

    #[test]
    fn matches_the_composed_adapter_with_gradients() {
        // 600 tokens: three row blocks, the last one partial.
        let (x, down, up) = (var(&[2, 300, 24]), var(&[4, 24]), var(&[4, 20]));
        let weight = Tensor::randn(0f32, 1.0, (20, 24), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 20, &Device::Cpu).unwrap();
        let target = Tensor::randn(0f32, 1.0, (2, 300, 20), &Device::Cpu).unwrap();
        let fused = lora_projection(&x, &weight, Some(&bias), &down, &up).unwrap();
        let reference = x
            .broadcast_matmul(&weight.t().unwrap())
            .unwrap()
            .broadcast_add(&bias)
            .unwrap()
            .add(
                &x.broadcast_matmul(&down.t().unwrap())
                    .unwrap()
                    .broadcast_matmul(&up)
                    .unwrap(),
            )
            .unwrap();
        assert!(
            diff(&fused, &reference) < 1e-4,
            "{}",
            diff(&fused, &reference)
        );
        let loss = |t: &Tensor| (t * &target).unwrap().sum_all().unwrap();
        let gf = loss(&fused).backward().unwrap();
        let gr = loss(&reference).backward().unwrap();
        for t in [&x, &down, &up] {
            let (a, r) = (gf.get(t).unwrap(), gr.get(t).unwrap());
            assert!(diff(a, r) < 1e-3, "{}", diff(a, r));
        }
        // Frozen adapter: only x gets a gradient; no bias works too.
        let frozen = lora_projection(
            &x,
            &weight,
            None,
            &down.as_detached_tensor(),
            &up.as_detached_tensor(),
        )
        .unwrap();
        let grads = frozen.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some());
        // A trainable base is refused rather than silently frozen.
        assert!(lora_projection(&x, &up, None, &down, &up).is_err());
    }
}
