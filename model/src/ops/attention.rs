//! Multi-head attention on the projections' own layout.
//!
//! `q` is `(B, N, heads * d)`, `k` and `v` are `(B, M, heads * d)` as the linear projections
//! produce them; head `h` is the column range `h * d .. (h + 1) * d`, read through strides. The
//! result is `(B, N, heads * d)`, the layout `to_out` consumes, so no head split or merge is ever
//! copied. Scores live in one `(rows, M)` block per task, softmaxed in place.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};

use super::amx;
use super::gemm::{par_for, MatMut, MatRef, SharedMut};
use super::matmul::sgemm;
use super::vecmath::{dispatch, exp, softmax_row, MulAdd, LANES};
use super::{apply_contiguous3, cpu_tensor, forward_like_first, uninit_vec, with_all_data};

#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    q_len: usize,
    kv_len: usize,
    heads: usize,
    head_dim: usize,
}

impl Dims {
    fn channels(&self) -> usize {
        self.heads * self.head_dim
    }

    fn of(q: &Shape, k: &Shape, v: &Shape, heads: usize) -> Result<Self> {
        let (b, n, c) = q.dims3()?;
        let (bk, m, ck) = k.dims3()?;
        if (bk, m, ck) != v.dims3()? || bk != b || ck != c || heads == 0 || c % heads != 0 {
            candle_core::bail!(
                "fused attention: q {q:?}, k {k:?}, v {v:?} do not fit {heads} heads"
            );
        }
        Ok(Self {
            batch: b,
            q_len: n,
            kv_len: m,
            heads,
            head_dim: c / heads,
        })
    }

    /// Query rows per task: blocks of up to 64, at least four per sample where the sample has
    /// 64 rows. Depends on the sequence length alone, never on the batch or the thread count, so
    /// a sample's result is the same however it is batched.
    fn rows_per_task(&self) -> usize {
        let mut rows = 64;
        while rows > 16 && self.q_len.div_ceil(rows) < 4 {
            rows /= 2;
        }
        rows.min(self.q_len.max(1))
    }
}

/// An `rows x cols` destination stored column-major (`cols x rows` row-major) in `buf`.
///
/// The gemm crate runs its microkernel along the destination's unit-stride axis, 64 rows at a
/// time at best. A head is only 8 to 40 wide, so `dk` and `dv` written straight into their
/// `(M, d)` head slices would run on the narrowest, latency-bound kernel (16 x 6); written
/// column-major, the long `M` side is the kernel's, and `p^T` / `ds^T`, the left operands,
/// are already laid out along it (no packing). The small result is transposed afterwards.
fn column_major(buf: &mut [f32], rows: usize) -> MatMut {
    MatMut {
        ptr: buf.as_mut_ptr(),
        rs: 1,
        cs: rows as isize,
    }
}

/// `dst [+]= scale * y^T x`: a key or value gradient `(M, d)` kept column-major in `dst` (see
/// [`column_major`]), from a block's `rows x M` probabilities or their gradient `y` and its
/// `rows x d` slice `x`. On the tile unit it is computed as its transpose `x^T y` into the same
/// buffer, so the large `y` is packed row by row instead of through transposes and only the
/// small `x` is transposed.
///
/// # Safety
/// `x` addresses a valid `rows x d` region; `dst` and `y` hold `d x m` and `rows x m`.
#[allow(clippy::too_many_arguments)]
unsafe fn kv_grad(
    d: usize,
    m: usize,
    rows: usize,
    dst: &mut [f32],
    accumulate: bool,
    y: &[f32],
    x: MatRef,
    scale: f32,
) {
    let y_blk = MatRef::rows(y, 0, m);
    // SAFETY: the caller's guarantees.
    unsafe {
        if amx::wanted(d, m, rows) {
            let dst = MatMut::rows(dst, 0, m);
            sgemm(d, m, rows, dst, accumulate, x.t(), y_blk, scale, false)
        } else {
            let dst = column_major(dst, m);
            sgemm(m, d, rows, dst, accumulate, y_blk.t(), x, scale, false)
        }
    }
}

/// One (sample, head)'s operands that every query block of the backward multiplies by, packed
/// for the tile unit once per task instead of once per block (the forward's [`PackedHead`]).
struct BackwardHead {
    /// k^T (d x M), for the scores.
    k_t: amx::PackedB,
    /// v^T (d x M), for the probabilities' gradient.
    v_t: amx::PackedB,
    /// k (M x d), for the queries' gradient.
    k: amx::PackedB,
}

/// `dst (rows x cols) = scale * a (rows x k) . b (k x cols)`, with `b` already packed for the
/// tile unit when `packed` is given.
///
/// # Safety
/// As [`sgemm`]; `packed`, when given, is `b` packed.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    packed: Option<&amx::PackedB>,
    rows: usize,
    cols: usize,
    k: usize,
    dst: MatMut,
    a: MatRef,
    b: MatRef,
    scale: f32,
) {
    // SAFETY: the caller's guarantees.
    unsafe {
        match packed {
            Some(pb) => {
                let pa = amx::PackedA::pack(rows, k, a, false);
                amx::gemm_packed(dst, false, &pa, 0..rows, pb, 0..cols, scale, false)
            }
            None => sgemm(rows, cols, k, dst, false, a, b, scale, false),
        }
    }
}

/// Softmax of one head's scores for a block of `rows` queries into `scores` (rows x M).
///
/// # Safety
/// The pointers of `q_blk` and `k_head` address a valid `rows x d` and `M x d` region.
#[inline(always)]
unsafe fn head_probs<F: MulAdd>(
    dims: &Dims,
    rows: usize,
    q_blk: MatRef,
    k_head: MatRef,
    packed: Option<&BackwardHead>,
    scale: f32,
    scores: &mut [f32],
) {
    let m = dims.kv_len;
    // SAFETY: the caller vouches for the q and k regions; `scores` holds the rows x M result.
    unsafe {
        product(
            packed.map(|p| &p.k_t),
            rows,
            m,
            dims.head_dim,
            MatMut::rows(scores, 0, m),
            q_blk,
            k_head.t(),
            scale,
        )
    };
    for row in scores.chunks_exact_mut(m) {
        softmax_row::<F>(row);
    }
}

/// exp(row - max(row)) in place over a row padded to whole 16-lane blocks (the padding holds
/// -inf, so it changes neither the max nor, once zeroed, the sum); returns 1 / sum.
#[inline(always)]
fn exp_row_padded<F: MulAdd>(row: &mut [f32], len: usize) -> f32 {
    let m = super::vecmath::max(row);
    let mut acc = [0f32; LANES];
    for chunk in row.chunks_exact_mut(LANES) {
        for (a, x) in acc.iter_mut().zip(chunk.iter_mut()) {
            *x = exp::<F>(*x - m);
            *a += *x;
        }
    }
    // The padding's exp is the clamp's tiny positive value, not 0: take it back out.
    let pad: f32 = row[len..].iter().sum();
    row[len..].fill(0.0);
    1.0 / (acc.iter().sum::<f32>() - pad)
}

/// One forward task: query rows `row0..row0 + rows` of batch `b`, every head. `probs`, when
/// given, receives the mean over heads of the probabilities, (B, N, M).
///
/// The rows are left unnormalised: the product with v is scaled by 1 / sum afterwards, d values
/// per row instead of M. Capture normalises its own copy, so the output is the same with or
/// without it.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn forward_task_impl<F: MulAdd>(
    dims: Dims,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: SharedMut,
    probs: Option<SharedMut>,
    packed_kv: Option<&[PackedHead]>,
    b: usize,
    row0: usize,
    rows: usize,
) {
    let (n, m, c, d) = (dims.q_len, dims.kv_len, dims.channels(), dims.head_dim);
    let stride = m.div_ceil(LANES) * LANES;
    let inv_heads = 1.0 / dims.heads as f32;
    let mut scores = vec![f32::NEG_INFINITY; rows * stride];
    let mut inv_sums = vec![0f32; rows];
    for h in 0..dims.heads {
        let q_blk = MatRef::rows(q, (b * n + row0) * c + h * d, c);
        let k_head = MatRef::rows(k, b * m * c + h * d, c);
        let v_head = MatRef::rows(v, b * m * c + h * d, c);
        // SAFETY: all views are in bounds by the shape checks; this task alone writes rows
        // row0..row0 + rows of batch b (in `out` and `probs`).
        let packed = packed_kv.map(|heads| &heads[b * dims.heads + h]);
        unsafe {
            product(
                packed.map(|head| &head.k_t),
                rows,
                m,
                d,
                MatMut::rows(&mut scores, 0, stride),
                q_blk,
                k_head.t(),
                scale,
            );
            if h > 0 {
                // Restore the -inf padding the previous head zeroed.
                for row in scores.chunks_exact_mut(stride) {
                    row[m..].fill(f32::NEG_INFINITY);
                }
            }
            for (row, inv) in scores.chunks_exact_mut(stride).zip(inv_sums.iter_mut()) {
                *inv = exp_row_padded::<F>(row, m);
            }
            if let Some(probs) = probs {
                let dst = probs.slice((b * n + row0) * m, rows * m);
                for ((p_row, s_row), &inv) in dst
                    .chunks_exact_mut(m)
                    .zip(scores.chunks_exact(stride))
                    .zip(&inv_sums)
                {
                    let w = inv * inv_heads;
                    if h == 0 {
                        for (p, &s) in p_row.iter_mut().zip(s_row) {
                            *p = s * w;
                        }
                    } else {
                        for (p, &s) in p_row.iter_mut().zip(s_row) {
                            *p += s * w;
                        }
                    }
                }
            }
            let out_offset = (b * n + row0) * c + h * d;
            let dst = MatMut {
                ptr: out.0.add(out_offset),
                rs: c as isize,
                cs: 1,
            };
            product(
                packed.map(|head| &head.v),
                rows,
                d,
                m,
                dst,
                MatRef::rows(&scores, 0, stride),
                v_head,
                1.0,
            );
            for (i, &inv) in inv_sums.iter().enumerate() {
                for x in out.slice(out_offset + i * c, d) {
                    *x *= inv;
                }
            }
        }
    }
}

dispatch!(fn forward_task(dims: Dims, scale: f32, q: &[f32], k: &[f32], v: &[f32], out: SharedMut, probs: Option<SharedMut>, packed_kv: Option<&[PackedHead]>, b: usize, row0: usize, rows: usize) => forward_task_impl);

/// One (sample, head)'s keys (transposed) and values packed for the tile unit under the bf16
/// matmul precision: packed once per call and shared by every query block.
struct PackedHead {
    k_t: amx::PackedB,
    v: amx::PackedB,
}

/// Forward over all (batch, query block) tasks.
fn forward_kernel(
    dims: Dims,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    out: SharedMut,
    probs: Option<SharedMut>,
) {
    let rows_per_task = dims.rows_per_task();
    let blocks = dims.q_len.div_ceil(rows_per_task);
    let work = dims.batch * dims.heads * dims.q_len * dims.kv_len * dims.head_dim;
    let (m, c, d) = (dims.kv_len, dims.channels(), dims.head_dim);
    let packed_kv = amx::wanted(rows_per_task.min(dims.q_len), m, d).then(|| {
        use rayon::prelude::*;
        (0..dims.batch * dims.heads)
            .into_par_iter()
            .map(|t| {
                let (b, h) = (t / dims.heads, t % dims.heads);
                let k_head = MatRef::rows(k, b * m * c + h * d, c);
                let v_head = MatRef::rows(v, b * m * c + h * d, c);
                // SAFETY: head h of sample b: m rows of d, in bounds by the shape checks.
                unsafe {
                    PackedHead {
                        k_t: amx::PackedB::pack(d, m, k_head.t(), false),
                        v: amx::PackedB::pack(m, d, v_head, false),
                    }
                }
            })
            .collect::<Vec<_>>()
    });
    let packed_kv = packed_kv.as_deref();
    par_for(dims.batch * blocks, work, |task| {
        let (b, blk) = (task / blocks, task % blocks);
        let row0 = blk * rows_per_task;
        let rows = rows_per_task.min(dims.q_len - row0);
        forward_task(dims, scale, q, k, v, out, probs, packed_kv, b, row0, rows);
    });
}

/// Gradients of q, k and v. Tasks are (batch, head) pairs, so each owns its slices of dq, dk
/// and dv; the probabilities are recomputed block by block.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn backward_task_impl<F: MulAdd>(
    dims: Dims,
    scale: f32,
    q: &[f32],
    k: &[f32],
    v: &[f32],
    grad: &[f32],
    dq: SharedMut,
    dk: SharedMut,
    dv: SharedMut,
    task: usize,
) {
    let (n, m, c, d) = (dims.q_len, dims.kv_len, dims.channels(), dims.head_dim);
    let rows_per_block = 128.min(n.max(1));
    {
        {
            let (b, h) = (task / dims.heads, task % dims.heads);
            let mut probs = uninit_vec(rows_per_block * m);
            let mut dprobs = uninit_vec(rows_per_block * m);
            let mut dk_t = uninit_vec(d * m);
            let mut dv_t = uninit_vec(d * m);
            let k_head = MatRef::rows(k, b * m * c + h * d, c);
            let v_head = MatRef::rows(v, b * m * c + h * d, c);
            let kv_offset = b * m * c + h * d;
            let packed = amx::wanted(rows_per_block, m, d).then(|| {
                // SAFETY: head h of sample b: M rows of d, in bounds by the shape checks.
                unsafe {
                    BackwardHead {
                        k_t: amx::PackedB::pack(d, m, k_head.t(), false),
                        v_t: amx::PackedB::pack(d, m, v_head.t(), false),
                        k: amx::PackedB::pack(m, d, k_head, false),
                    }
                }
            });
            let packed = packed.as_ref();
            let mut row0 = 0;
            while row0 < n {
                let rows = rows_per_block.min(n - row0);
                let p = &mut probs[..rows * m];
                let dp = &mut dprobs[..rows * m];
                let q_off = (b * n + row0) * c + h * d;
                let q_blk = MatRef::rows(q, q_off, c);
                let g_blk = MatRef::rows(grad, q_off, c);
                let first = row0 == 0;
                // SAFETY: views in bounds by the shape checks; this task alone writes head h of
                // batch b in dq, dk and dv.
                unsafe {
                    head_probs::<F>(&dims, rows, q_blk, k_head, packed, scale, p);
                    // dv += p^T g
                    kv_grad(d, m, rows, &mut dv_t, !first, p, g_blk, 1.0);
                    // dp = g v^T
                    product(
                        packed.map(|p| &p.v_t),
                        rows,
                        m,
                        d,
                        MatMut::rows(dp, 0, m),
                        g_blk,
                        v_head.t(),
                        1.0,
                    );
                }
                // ds = p * (dp - sum(dp * p)), kept in dp.
                for (p_row, dp_row) in p.chunks_exact(m).zip(dp.chunks_exact_mut(m)) {
                    let inner = super::vecmath::dot(p_row, dp_row);
                    for (g, &pv) in dp_row.iter_mut().zip(p_row) {
                        *g = pv * (*g - inner);
                    }
                }
                unsafe {
                    // dq = scale ds k
                    let dq_blk = MatMut {
                        ptr: dq.0.add(q_off),
                        rs: c as isize,
                        cs: 1,
                    };
                    product(
                        packed.map(|p| &p.k),
                        rows,
                        d,
                        m,
                        dq_blk,
                        MatRef::rows(dp, 0, m),
                        k_head,
                        scale,
                    );
                    // dk += scale ds^T q
                    kv_grad(d, m, rows, &mut dk_t, !first, dp, q_blk, scale);
                }
                row0 += rows;
            }
            for (shared, grad_t) in [(dk, &dk_t), (dv, &dv_t)] {
                for i in 0..m {
                    // SAFETY: head h of batch b is this task's alone.
                    let dst = unsafe { shared.slice(kv_offset + i * c, d) };
                    for (j, x) in dst.iter_mut().enumerate() {
                        *x = grad_t[j * m + i];
                    }
                }
            }
        }
    }
}

dispatch!(fn backward_task(dims: Dims, scale: f32, q: &[f32], k: &[f32], v: &[f32], grad: &[f32], dq: SharedMut, dk: SharedMut, dv: SharedMut, task: usize) => backward_task_impl);

struct FusedAttention {
    heads: usize,
    scale: f32,
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "rl4pix-fused-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = Dims::of(ql.shape(), kl.shape(), vl.shape(), self.heads)?;
        forward_like_first((qs, ql), (ks, kl), (vs, vl), |q, k, v, out| {
            forward_kernel(dims, self.scale, q, k, v, out, None)
        })
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let dims = Dims::of(q.shape(), k.shape(), v.shape(), self.heads)?;
        let mut dq = uninit_vec(q.elem_count());
        let mut dk = uninit_vec(k.elem_count());
        let mut dv = uninit_vec(v.elem_count());
        with_all_data([q, k, v, grad], |[qd, kd, vd, gd]| {
            let shared = (
                SharedMut::new(&mut dq),
                SharedMut::new(&mut dk),
                SharedMut::new(&mut dv),
            );
            let work = 3 * dims.batch * dims.heads * dims.q_len * dims.kv_len * dims.head_dim;
            par_for(dims.batch * dims.heads, work, |task| {
                let (dq, dk, dv) = shared;
                backward_task(dims, self.scale, qd, kd, vd, gd, dq, dk, dv, task)
            });
            Ok(())
        })?;
        Ok((
            Some(cpu_tensor(dq, q.dims())?),
            Some(cpu_tensor(dk, k.dims())?),
            Some(cpu_tensor(dv, v.dims())?),
        ))
    }
}

/// softmax(scale * q_h k_h^T) v_h for every head h, merged back to `(B, N, heads * d)`.
/// Differentiable with respect to q, k and v. CPU f32 only (see [`super::fast_path`]).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Result<Tensor> {
    let op = FusedAttention {
        heads,
        scale: scale as f32,
    };
    apply_contiguous3(q, k, v, op)
}

/// The same output as [`attention`] (bit for bit), plus the probabilities averaged over heads,
/// `(B, N, M)`. Not differentiable: for capture outside an autograd graph.
pub fn attention_with_probs(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<(Tensor, Tensor)> {
    let dims = Dims::of(q.shape(), k.shape(), v.shape(), heads)?;
    let mut out = uninit_vec(q.elem_count());
    let mut probs = uninit_vec(dims.batch * dims.q_len * dims.kv_len);
    with_all_data([q, k, v], |[qd, kd, vd]| {
        let probs_out = Some(SharedMut::new(&mut probs));
        let out = SharedMut::new(&mut out);
        forward_kernel(dims, scale as f32, qd, kd, vd, out, probs_out);
        Ok(())
    })?;
    Ok((
        cpu_tensor(out, q.dims())?,
        cpu_tensor(probs, &[dims.batch, dims.q_len, dims.kv_len])?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::max_abs_diff;
    use candle_core::{Device, Var, D};

    fn composed(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f64) -> Tensor {
        let split = |t: &Tensor| {
            let (b, n, c) = t.dims3().unwrap();
            t.reshape((b, n, heads, c / heads))
                .unwrap()
                .transpose(1, 2)
                .unwrap()
                .contiguous()
                .unwrap()
        };
        let (q, k, v) = (split(q), split(k), split(v));
        let scores = (q.matmul(&k.t().unwrap()).unwrap() * scale).unwrap();
        let probs = candle_nn::ops::softmax(&scores, D::Minus1).unwrap();
        let out = probs.matmul(&v).unwrap();
        let (b, h, n, d) = out.dims4().unwrap();
        out.transpose(1, 2).unwrap().reshape((b, n, h * d)).unwrap()
    }

    #[test]
    fn forward_backward_and_capture_match_the_composed_ops() {
        let dev = Device::Cpu;
        let (b, n, m, heads, d) = (2, 70, 13, 3, 8);
        let q =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap()).unwrap();
        let k =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap()).unwrap();
        let v =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (b, m, heads * d), &dev).unwrap()).unwrap();
        let target = Tensor::randn(0f32, 1.0, (b, n, heads * d), &dev).unwrap();
        let scale = 0.3;
        let fused = attention(&q, &k, &v, heads, scale).unwrap();
        let reference = composed(&q, &k, &v, heads, scale);
        assert!(max_abs_diff(&fused, &reference) < 1e-5);

        let (plain, probs) = attention_with_probs(&q, &k, &v, heads, scale).unwrap();
        assert_eq!(max_abs_diff(&plain, &fused), 0.0);
        assert_eq!(probs.dims(), &[b, n, m]);
        let row_sums = probs.sum(D::Minus1).unwrap();
        assert!(max_abs_diff(&row_sums, &row_sums.ones_like().unwrap()) < 1e-5);

        let loss = |out: &Tensor| (out * &target).unwrap().sum_all().unwrap();
        let g_fused = loss(&fused).backward().unwrap();
        let g_ref = loss(&reference).backward().unwrap();
        for var in [&q, &k, &v] {
            let a = g_fused.get(var.as_tensor()).unwrap();
            let r = g_ref.get(var.as_tensor()).unwrap();
            assert!(max_abs_diff(a, r) < 1e-4, "{}", max_abs_diff(a, r));
        }
    }
}
