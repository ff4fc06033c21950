//! `y = x W^T + b` over a channel axis, for token-major `(B, S, C)` or channel-major
//! `(B, C, S)` inputs and outputs.
//!
//! The channel-major forms let a spatial transformer project a feature map into tokens and
//! back (`proj_in` / `proj_out`, linear or 1x1 convolution alike) by reading and writing through
//! strides, with no permuted copy on either side. The backward pass computes the
//! weight and bias gradients only when they track gradients (a frozen base under LoRA).

use candle_core::{CpuStorage, Result, Shape, Tensor};

use super::amx;
use super::gemm::{num_threads, par_for, MatMut, MatRef, SharedMut};
use super::matmul::sgemm;
use super::weighted::{self, add_rows, Grads3, Input, WeightData, WeightedKernel};
use super::{cpu_storage_slice, cpu_tensor, uninit_vec, with_data};

/// Where the channel axis is: last (`(B, S, C)`, one token per row) or second (`(B, C, S)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Channels {
    Last,
    First,
}

/// Rows and output columns of one forward task.
const ROW_BLOCK: usize = 256;
const COL_BLOCK: usize = 512;

#[derive(Debug, Clone, Copy)]
struct Proj {
    input: Channels,
    output: Channels,
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    batch: usize,
    positions: usize,
    in_f: usize,
    out_f: usize,
}

impl Dims {
    fn work(&self) -> usize {
        self.batch * self.positions * self.in_f * self.out_f
    }
}

impl Proj {
    fn dims(&self, x: &Shape, weight: &Shape) -> Result<(Dims, Vec<usize>)> {
        let (out_f, in_f) = weight.dims2()?;
        let xd = x.dims();
        let bad = || candle_core::bail!("linear: input {x:?} for weight {weight:?}");
        let (batch, positions) = match self.input {
            Channels::Last => {
                if xd.last() != Some(&in_f) {
                    return bad();
                }
                // Rows of one sample (the leading dimension) stay together; see `forward`.
                let batch = if xd.len() >= 2 { xd[0] } else { 1 };
                (batch, x.elem_count() / (in_f * batch).max(1))
            }
            Channels::First => {
                if xd.len() != 3 || xd[1] != in_f {
                    return bad();
                }
                (xd[0], xd[2])
            }
        };
        let out_dims = match (self.input, self.output) {
            (Channels::Last, Channels::Last) => {
                let mut d = xd.to_vec();
                if let Some(last) = d.last_mut() {
                    *last = out_f;
                }
                d
            }
            (Channels::First, Channels::Last) => vec![batch, positions, out_f],
            (Channels::First, Channels::First) => vec![batch, out_f, positions],
            (Channels::Last, Channels::First) => {
                if xd.len() != 3 {
                    return bad();
                }
                vec![xd[0], out_f, xd[1]]
            }
        };
        let (batch, positions) = match (self.input, self.output) {
            (Channels::Last, Channels::First) => (xd[0], xd[1]),
            _ => (batch, positions),
        };
        Ok((
            Dims {
                batch,
                positions,
                in_f,
                out_f,
            },
            out_dims,
        ))
    }
}

/// Sample `b` of a `(B, S, C)` or `(B, C, S)` buffer as an `S x C` matrix.
fn view(data: &[f32], layout: Channels, b: usize, positions: usize, channels: usize) -> MatRef {
    let offset = b * positions * channels;
    match layout {
        Channels::Last => MatRef::rows(data, offset, channels),
        Channels::First => MatRef::rows_t(data, offset, positions),
    }
}

fn view_mut(
    ptr: SharedMut,
    layout: Channels,
    b: usize,
    positions: usize,
    channels: usize,
) -> MatMut {
    let (rs, cs) = match layout {
        Channels::Last => (channels as isize, 1),
        Channels::First => (1, positions as isize),
    };
    MatMut {
        // SAFETY (of later writes): sample b is this call's alone.
        ptr: unsafe { ptr.0.add(b * positions * channels) },
        rs,
        cs,
    }
}

/// Runs `f(b, parallel_gemm)` for every sample: samples in parallel when there are enough of
/// them, otherwise one after another with the products themselves split over the threads.
fn for_samples(batch: usize, work: usize, f: impl Fn(usize, bool) + Sync + Send) {
    if batch >= num_threads() {
        par_for(batch, work, |b| f(b, false));
    } else {
        (0..batch).for_each(|b| f(b, true));
    }
}

impl WeightedKernel for Proj {
    const NAMES: (&'static str, &'static str) = ("rl4pix-linear", "rl4pix-linear-bias");

    fn forward(&self, xs: Input, ws: Input, bias: Option<Input>) -> Result<(CpuStorage, Shape)> {
        let p = *self;
        let (d, out_dims) = p.dims(xs.1.shape(), ws.1.shape())?;
        let x = cpu_storage_slice(xs.0, xs.1)?;
        let weight = WeightData::of(ws.0, ws.1)?;
        let bias = match bias {
            Some((s, l)) => {
                let b = cpu_storage_slice(s, l)?;
                if b.len() != d.out_f {
                    candle_core::bail!("linear: bias {:?} for {} outputs", l.shape(), d.out_f);
                }
                Some(b)
            }
            None => None,
        };
        let mut out = uninit_vec(d.batch * d.positions * d.out_f);
        let shared = SharedMut::new(&mut out);
        // Tasks are fixed blocks of one sample's rows and output columns, sized by the layer alone,
        // never by the batch or the thread count: gemm rounds a little differently for different
        // block shapes, and a request's result must not depend on what it was batched with.
        let row_blocks = d.positions.div_ceil(ROW_BLOCK).max(1);
        let col_blocks = d.out_f.div_ceil(COL_BLOCK).max(1);
        // Under the bf16 matmul precision the weight is rounded and packed for the tile unit once
        // per call, not once per block.
        let packed_w = amx::wanted(d.positions.min(ROW_BLOCK), d.out_f, d.in_f)
            // SAFETY: the weight holds out_f rows of in_f.
            .then(|| unsafe {
                match weight {
                    WeightData::F32(w) => {
                        amx::PackedB::pack(d.in_f, d.out_f, MatRef::rows_t(w, 0, d.in_f), true)
                    }
                    WeightData::F16(w) => amx::PackedB::pack_f16_columns(d.in_f, d.out_f, w, true),
                }
            });
        let w = weight.for_f32_products(packed_w.is_some());
        let w = &w[..];
        par_for(d.batch * row_blocks * col_blocks, d.work(), |t| {
            let b = t / (row_blocks * col_blocks);
            let r0 = (t / col_blocks % row_blocks) * ROW_BLOCK;
            let c0 = (t % col_blocks) * COL_BLOCK;
            let rows = ROW_BLOCK.min(d.positions - r0);
            let cols = COL_BLOCK.min(d.out_f - c0);
            let x_blk = view(x, p.input, b, d.positions, d.in_f);
            let x_blk = MatRef {
                ptr: unsafe { x_blk.ptr.offset(r0 as isize * x_blk.rs) },
                ..x_blk
            };
            let out_blk = view_mut(shared, p.output, b, d.positions, d.out_f);
            let out_blk = MatMut {
                ptr: unsafe {
                    out_blk
                        .ptr
                        .offset(r0 as isize * out_blk.rs + c0 as isize * out_blk.cs)
                },
                ..out_blk
            };
            // SAFETY: the views are in bounds by the shape checks; this task alone writes rows
            // r0..r0 + rows and columns c0..c0 + cols of sample b.
            unsafe {
                match &packed_w {
                    Some(pw) => {
                        let px = amx::PackedA::pack(rows, d.in_f, x_blk, false);
                        amx::gemm_packed(
                            out_blk,
                            false,
                            &px,
                            0..rows,
                            pw,
                            c0..c0 + cols,
                            1.0,
                            false,
                        )
                    }
                    None => sgemm(
                        rows,
                        cols,
                        d.in_f,
                        out_blk,
                        false,
                        x_blk,
                        MatRef::rows_t(w, c0 * d.in_f, d.in_f),
                        1.0,
                        false,
                    ),
                }
                // The bias goes on after the product, while the block is in cache (accumulating
                // the product onto it would, again, round by block shape).
                if let Some(bias) = bias {
                    let bias = &bias[c0..c0 + cols];
                    match p.output {
                        Channels::Last => {
                            for i in 0..rows {
                                let row =
                                    shared.slice((b * d.positions + r0 + i) * d.out_f + c0, cols);
                                for (y, &v) in row.iter_mut().zip(bias) {
                                    *y += v;
                                }
                            }
                        }
                        Channels::First => {
                            for (j, &v) in bias.iter().enumerate() {
                                let plane =
                                    shared.slice((b * d.out_f + c0 + j) * d.positions + r0, rows);
                                for y in plane {
                                    *y += v;
                                }
                            }
                        }
                    }
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from(out_dims)))
    }

    fn grads(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<Grads3> {
        let p = *self;
        let (d, _) = p.dims(x.shape(), weight.shape())?;
        with_data(grad, |g| {
            let dx = if x.track_op() {
                let mut dx = uninit_vec(x.elem_count());
                let shared = SharedMut::new(&mut dx);
                with_data(weight, |w| {
                    for_samples(d.batch, d.work(), |b, parallel| unsafe {
                        sgemm(
                            d.positions,
                            d.in_f,
                            d.out_f,
                            view_mut(shared, p.input, b, d.positions, d.in_f),
                            false,
                            view(g, p.output, b, d.positions, d.out_f),
                            MatRef::rows(w, 0, d.in_f),
                            1.0,
                            parallel,
                        )
                    });
                    Ok(())
                })?;
                Some(cpu_tensor(dx, x.dims())?)
            } else {
                None
            };
            let dw = if weight.track_op() {
                let mut dw = uninit_vec(d.out_f * d.in_f);
                with_data(x, |xd| {
                    for b in 0..d.batch {
                        unsafe {
                            sgemm(
                                d.out_f,
                                d.in_f,
                                d.positions,
                                MatMut::rows(&mut dw, 0, d.in_f),
                                b > 0,
                                view(g, p.output, b, d.positions, d.out_f).t(),
                                view(xd, p.input, b, d.positions, d.in_f),
                                1.0,
                                true,
                            )
                        };
                    }
                    Ok(())
                })?;
                Some(cpu_tensor(dw, weight.dims())?)
            } else {
                None
            };
            let db = match bias {
                Some(bias) if bias.track_op() => {
                    let mut total = vec![0f32; d.out_f];
                    let sample_len = d.positions * d.out_f;
                    for sample in g.chunks_exact(sample_len) {
                        match p.output {
                            Channels::Last => add_rows(&mut total, sample),
                            Channels::First => {
                                for (t, plane) in
                                    total.iter_mut().zip(sample.chunks_exact(d.positions))
                                {
                                    *t += super::vecmath::sum(plane);
                                }
                            }
                        }
                    }
                    Some(cpu_tensor(total, bias.dims())?)
                }
                _ => None,
            };
            Ok((dx, dw, db))
        })
    }
}

/// `x W^T + b` with `weight` (out, in) and `bias` (out); `input` / `output` say where the
/// channel axis of `x` and of the result is (`Channels::First`: `(B, C, S)`).
pub fn project(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    input: Channels,
    output: Channels,
) -> Result<Tensor> {
    weighted::apply(Proj { input, output }, x, weight, bias)
}

/// The token-major projection's forward on raw storage, for fused ops that add to its result.
pub(crate) fn forward_tokens(
    x: Input,
    weight: Input,
    bias: Option<Input>,
) -> Result<(CpuStorage, Shape)> {
    let proj = Proj {
        input: Channels::Last,
        output: Channels::Last,
    };
    proj.forward(x, weight, bias)
}

/// `x W^T + b` for `x` (..., in), `weight` (out, in), `bias` (out).
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    project(x, weight, bias, Channels::Last, Channels::Last)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{max_abs_diff as diff, var};
    use candle_core::{Device, Module};

    #[test]
    fn matches_candle_linear_with_gradients() {
        let (x, w, b) = (var(&[2, 5, 7]), var(&[3, 7]), var(&[3]));
        let target = Tensor::randn(0f32, 1.0, (2, 5, 3), &Device::Cpu).unwrap();
        let fused = linear(&x, &w, Some(&b)).unwrap();
        let reference = candle_nn::Linear::new(w.as_tensor().clone(), Some(b.as_tensor().clone()))
            .forward(&x)
            .unwrap();
        assert!(diff(&fused, &reference) < 1e-5);
        let loss = |t: &Tensor| (t * &target).unwrap().sum_all().unwrap();
        let gf = loss(&fused).backward().unwrap();
        let gr = loss(&reference).backward().unwrap();
        for t in [&x, &w, &b] {
            assert!(diff(gf.get(t).unwrap(), gr.get(t).unwrap()) < 1e-4);
        }
        let frozen = linear(&x, &w.as_detached_tensor(), None).unwrap();
        let grads = frozen.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some());
    }

    #[test]
    fn channel_major_layouts_match_permuted_tokens() {
        let (b, c, s, o) = (3, 6, 10, 4);
        let map = var(&[b, c, s]);
        let (w, bias) = (var(&[o, c]), var(&[o]));
        let tokens_ref = map.transpose(1, 2).unwrap();
        let reference =
            candle_nn::Linear::new(w.as_tensor().clone(), Some(bias.as_tensor().clone()))
                .forward(&tokens_ref.contiguous().unwrap())
                .unwrap();
        for (output, want) in [
            (Channels::Last, reference.clone()),
            (Channels::First, reference.transpose(1, 2).unwrap()),
        ] {
            let fused = project(&map, &w, Some(&bias), Channels::First, output).unwrap();
            assert_eq!(fused.dims(), want.dims());
            assert!(diff(&fused, &want) < 1e-5);
            let target = Tensor::randn(0f32, 1.0, want.dims(), &Device::Cpu).unwrap();
            let loss = |t: &Tensor| (t * &target).unwrap().sum_all().unwrap();
            let gf = loss(&fused).backward().unwrap();
            let gr = loss(&want).backward().unwrap();
            for t in [&map, &w, &bias] {
                assert!(diff(gf.get(t).unwrap(), gr.get(t).unwrap()) < 1e-4);
            }
        }
        // Tokens back to a channel-major map.
        let tokens = var(&[b, s, c]);
        let fused = project(&tokens, &w, Some(&bias), Channels::Last, Channels::First).unwrap();
        let want = candle_nn::Linear::new(w.as_tensor().clone(), Some(bias.as_tensor().clone()))
            .forward(&tokens)
            .unwrap()
            .transpose(1, 2)
            .unwrap();
        assert!(diff(&fused, &want) < 1e-5);
        let gf = fused.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        let gr = want.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for t in [&tokens, &w, &bias] {
            assert!(diff(gf.get(t).unwrap(), gr.get(t).unwrap()) < 1e-3);
        }
    }
}
