//! 2-D convolution (groups 1, dilation 1) on the NCHW layout as matrix products.
//!
//! For each image, `Y (C_out x HW_out) = W (C_out x C_in*kh*kw) . col (C_in*kh*kw x HW_out)`:
//! a 1x1 stride-1 convolution multiplies the image itself (no copy); larger kernels build `col`
//! one tile of output rows at a time, per task, so the output lands in NCHW directly with no
//! layout change. The bias, per channel or per sample and channel (a resnet's time embedding),
//! is added to each output tile right after its product, while the tile is in cache.
//!
//! Backward: the input gradient of a stride-1 convolution is the convolution of the output
//! gradient with the flipped, transposed kernel (same gather kernel, parallel without races);
//! strided ones scatter `W^T . dY` back per image. Weight and bias gradients are computed only
//! for tensors that track gradients, so a frozen base costs nothing there.

use candle_core::{CpuStorage, Result, Shape, Tensor};
use rayon::prelude::*;

use super::amx;
use super::gemm::{num_threads, par_for, MatMut, MatRef, SharedMut};
use super::matmul::sgemm;
use super::weighted::{self, add_rows, Grads3, Input, WeightData, WeightedKernel};
use super::{cpu_storage_slice, cpu_tensor, uninit_vec, with_data};

#[derive(Debug, Clone, Copy)]
struct Geom {
    batch: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    kh: usize,
    kw: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
}

impl Geom {
    fn new(x: &Shape, weight: &Shape, stride: usize, pad: usize) -> Result<Self> {
        let (batch, c_in, h, w) = x.dims4()?;
        let (c_out, wc_in, kh, kw) = weight.dims4()?;
        if wc_in != c_in || stride == 0 || h + 2 * pad < kh || w + 2 * pad < kw {
            candle_core::bail!(
                "conv2d: input {x:?}, kernel {weight:?}, stride {stride}, padding {pad}"
            );
        }
        Ok(Self {
            batch,
            c_in,
            h,
            w,
            c_out,
            kh,
            kw,
            stride,
            pad,
            oh: (h + 2 * pad - kh) / stride + 1,
            ow: (w + 2 * pad - kw) / stride + 1,
        })
    }

    fn k(&self) -> usize {
        self.c_in * self.kh * self.kw
    }
    fn in_plane(&self) -> usize {
        self.h * self.w
    }
    fn out_plane(&self) -> usize {
        self.oh * self.ow
    }
    /// 1x1, stride 1, no padding: the image is its own `col` matrix.
    fn is_pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }

    /// Output rows per tile: about `TILE_COLUMNS` output positions, with `col` kept near 1M
    /// floats (4 MB). Depends on the layer's shape only (see [`forward`]).
    fn rows_per_tile(&self) -> usize {
        let by_columns = (TILE_COLUMNS / self.ow.max(1)).max(1);
        let by_size = if self.is_pointwise() {
            usize::MAX
        } else {
            ((1 << 20) / (self.k() * self.ow).max(1)).max(1)
        };
        by_columns.min(by_size).min(self.oh).max(1)
    }

    /// Blocks of output channels per tile: more than one only for small maps, which have too
    /// few tiles to share out.
    fn channel_blocks(&self, tiles: usize) -> usize {
        if tiles >= MIN_TILES {
            1
        } else {
            MIN_TILES
                .div_ceil(tiles)
                .min((self.c_out / MIN_CHANNEL_BLOCK).max(1))
        }
    }
}

/// Output positions per tile.
const TILE_COLUMNS: usize = 256;
/// Below this many tiles per image the output channels are split as well.
const MIN_TILES: usize = 4;
/// The smallest block of output channels given a task of its own.
const MIN_CHANNEL_BLOCK: usize = 64;

/// Fills `col` (K x rows*ow, row-major) with the patches of output rows `oy0..oy0 + rows`.
fn im2col_tile(g: &Geom, image: &[f32], oy0: usize, rows: usize, col: &mut [f32]) {
    let n = rows * g.ow;
    for (r, dst_row) in col[..g.k() * n].chunks_exact_mut(n).enumerate() {
        im2col_row(g, image, oy0, rows, r, dst_row);
    }
}

/// Row `r` of [`im2col_tile`]'s matrix: tap (ci, ky, kx) at every output position of the tile.
fn im2col_row(g: &Geom, image: &[f32], oy0: usize, rows: usize, r: usize, dst_row: &mut [f32]) {
    let (ci, ky, kx) = (r / (g.kh * g.kw), r / g.kw % g.kh, r % g.kw);
    let plane = &image[ci * g.in_plane()..(ci + 1) * g.in_plane()];
    if g.stride == 1 && g.ow == g.w {
        shifted_plane(g, plane, oy0, rows, ky, kx, dst_row);
    } else {
        gathered_rows(g, plane, oy0, rows, ky, kx, dst_row);
    }
}

/// Stride 1, "same" width: the tap's rows are one shifted run of the plane. Copy it in one go,
/// then zero what fell outside the image (rows above/below, and the column that wrapped
/// around from the neighbouring row).
fn shifted_plane(
    g: &Geom,
    plane: &[f32],
    oy0: usize,
    rows: usize,
    ky: usize,
    kx: usize,
    dst: &mut [f32],
) {
    let w = g.w as isize;
    let dy = ky as isize - g.pad as isize;
    let dx = kx as isize - g.pad as isize;
    // Output rows whose input row is inside the image.
    let y_lo = (-dy - oy0 as isize).clamp(0, rows as isize) as usize;
    let y_hi = (g.h as isize - dy - oy0 as isize).clamp(y_lo as isize, rows as isize) as usize;
    dst[..y_lo * g.ow].fill(0.0);
    dst[y_hi * g.ow..].fill(0.0);
    if y_hi > y_lo {
        let start = ((oy0 + y_lo) as isize + dy) * w + dx;
        let len = ((y_hi - y_lo) * g.ow) as isize;
        // Clip the run to the plane; the clipped elements are wrapped columns, zeroed below.
        let src_lo = start.max(0);
        let src_hi = (start + len).min(plane.len() as isize);
        let base = y_lo * g.ow;
        let d_lo = base + (src_lo - start) as usize;
        let d_hi = base + (src_hi - start) as usize;
        dst[base..d_lo].fill(0.0);
        dst[d_hi..y_hi * g.ow].fill(0.0);
        dst[d_lo..d_hi].copy_from_slice(&plane[src_lo as usize..src_hi as usize]);
        // Columns whose input column is outside the image read the neighbouring row.
        let zero_cols = if dx < 0 {
            0..(-dx).min(w) as usize
        } else {
            (g.ow - (dx.min(w) as usize))..g.ow
        };
        if !zero_cols.is_empty() {
            for row in dst[base..y_hi * g.ow].chunks_exact_mut(g.ow) {
                row[zero_cols.clone()].fill(0.0);
            }
        }
    }
}

/// Any stride: row by row, with the valid column range computed once.
fn gathered_rows(
    g: &Geom,
    plane: &[f32],
    oy0: usize,
    rows: usize,
    ky: usize,
    kx: usize,
    dst_row: &mut [f32],
) {
    // Output columns whose input column is inside the image.
    let ox_lo = g.pad.saturating_sub(kx).div_ceil(g.stride).min(g.ow);
    let ox_hi = if g.w + g.pad > kx {
        ((g.w + g.pad - kx - 1) / g.stride + 1).min(g.ow)
    } else {
        0
    }
    .max(ox_lo);
    for (j, oy) in (oy0..oy0 + rows).enumerate() {
        let dst = &mut dst_row[j * g.ow..(j + 1) * g.ow];
        let iy = (oy * g.stride + ky) as isize - g.pad as isize;
        if iy < 0 || iy >= g.h as isize {
            dst.fill(0.0);
            continue;
        }
        let src_row = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
        dst[..ox_lo].fill(0.0);
        dst[ox_hi..].fill(0.0);
        if ox_hi > ox_lo {
            let ix0 = ox_lo * g.stride + kx - g.pad;
            if g.stride == 1 {
                dst[ox_lo..ox_hi].copy_from_slice(&src_row[ix0..ix0 + ox_hi - ox_lo]);
            } else {
                for (d, ix) in dst[ox_lo..ox_hi].iter_mut().zip((ix0..).step_by(g.stride)) {
                    *d = src_row[ix];
                }
            }
        }
    }
}

/// Adds `col` (K x rows*ow) back onto the image positions it was gathered from.
fn col2im_tile(g: &Geom, col: &[f32], oy0: usize, rows: usize, image: &mut [f32]) {
    let n = rows * g.ow;
    for ci in 0..g.c_in {
        let plane = &mut image[ci * g.in_plane()..(ci + 1) * g.in_plane()];
        for ky in 0..g.kh {
            for kx in 0..g.kw {
                let r = (ci * g.kh + ky) * g.kw + kx;
                let src_row = &col[r * n..(r + 1) * n];
                for (j, oy) in (oy0..oy0 + rows).enumerate() {
                    let iy = (oy * g.stride + ky) as isize - g.pad as isize;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst_row = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    for ox in 0..g.ow {
                        let ix = (ox * g.stride + kx) as isize - g.pad as isize;
                        if ix >= 0 && (ix as usize) < g.w {
                            dst_row[ix as usize] += src_row[j * g.ow + ox];
                        }
                    }
                }
            }
        }
    }
}

/// How the bias enters: none, one value per output channel, or one per (sample, channel).
#[derive(Clone, Copy)]
enum Bias<'a> {
    None,
    Channel(&'a [f32]),
    SampleChannel(&'a [f32]),
}

impl Bias<'_> {
    fn value(&self, c_out: usize, b: usize, c: usize) -> Option<f32> {
        match self {
            Bias::None => None,
            Bias::Channel(v) => Some(v[c]),
            Bias::SampleChannel(v) => Some(v[b * c_out + c]),
        }
    }
}

/// `out` (B, C_out, oh, ow) = conv(x, weight) + bias.
///
/// Tasks are (image, tile of output rows, block of output channels), all sized by the layer's
/// shape alone, never by the batch or the thread count: gemm rounds a little differently for
/// different block shapes, and a request's result must not depend on what it was batched
/// with. Products are never split further, so the result is the same at any thread count.
fn forward(g: &Geom, x: &[f32], weight: WeightData, bias: Bias, out: &mut [f32]) {
    let (k, plane) = (g.k(), g.out_plane());
    let shared = SharedMut::new(out);
    let rows_per_tile = g.rows_per_tile();
    let tiles = g.oh.div_ceil(rows_per_tile);
    let blocks = g.channel_blocks(tiles);
    let per_block = g.c_out.div_ceil(blocks);
    let tile_len = k * rows_per_tile * g.ow;
    let image_len = g.c_in * g.in_plane();
    // With several channel blocks per tile, gather each tile's patches once, up front.
    let gathered = if blocks > 1 && !g.is_pointwise() {
        let mut cols = uninit_vec(g.batch * tiles * tile_len);
        let shared_cols = SharedMut::new(&mut cols);
        par_for(g.batch * tiles, g.batch * tiles * tile_len, |t| {
            let (b, tile) = (t / tiles, t % tiles);
            let oy0 = tile * rows_per_tile;
            let rows = rows_per_tile.min(g.oh - oy0);
            // SAFETY: task t owns tile t of the buffer.
            let col = unsafe { shared_cols.slice(t * tile_len, k * rows * g.ow) };
            im2col_tile(g, &x[b * image_len..(b + 1) * image_len], oy0, rows, col);
        });
        Some(cols)
    } else {
        None
    };
    // Under the bf16 matmul precision the weight is rounded and packed for the tile unit once
    // per call, not once per tile.
    let packed_weight = (amx::wanted(per_block, rows_per_tile * g.ow, k)
        && (blocks == 1 || per_block.is_multiple_of(32)))
    // SAFETY: the weight holds c_out rows of k.
    .then(|| unsafe {
        match weight {
            WeightData::F32(w) => amx::PackedA::pack(g.c_out, k, MatRef::rows(w, 0, k), true),
            WeightData::F16(w) => amx::PackedA::pack_f16_rows(g.c_out, k, w, true),
        }
    });
    let weight = weight.for_f32_products(packed_weight.is_some());
    let weight = &weight[..];
    let task = |t: usize| {
        let (b, tile, block) = (t / (tiles * blocks), t / blocks % tiles, t % blocks);
        let oy0 = tile * rows_per_tile;
        let rows = rows_per_tile.min(g.oh - oy0);
        let n = rows * g.ow;
        let c0 = block * per_block;
        let channels = per_block.min(g.c_out.saturating_sub(c0));
        if channels == 0 {
            return;
        }
        let out_offset = (b * g.c_out + c0) * plane + oy0 * g.ow;
        let dst = MatMut {
            ptr: unsafe { shared.0.add(out_offset) },
            rs: plane as isize,
            cs: 1,
        };
        let image = &x[b * image_len..(b + 1) * image_len];
        let mut local = Vec::new();
        let cols = if g.is_pointwise() {
            Some(MatRef::rows(x, b * image_len + oy0 * g.ow, g.in_plane()))
        } else if let Some(gathered) = &gathered {
            Some(MatRef::rows(gathered, (b * tiles + tile) * tile_len, n))
        } else if packed_weight.is_some() {
            // Patches go straight into the packed operand, two rows at a time.
            None
        } else {
            local = uninit_vec(k * n);
            im2col_tile(g, image, oy0, rows, &mut local);
            Some(MatRef::rows(&local, 0, n))
        };
        // SAFETY: in bounds by the shape checks; this task alone writes these channels of
        // these output positions of image b.
        unsafe {
            match (&packed_weight, cols) {
                (Some(pw), cols) => {
                    let pc = match cols {
                        Some(cols) => amx::PackedB::pack(k, n, cols, false),
                        None => amx::PackedB::pack_rows(k, n, |r, row| {
                            im2col_row(g, image, oy0, rows, r, row)
                        }),
                    };
                    amx::gemm_packed(dst, false, pw, c0..c0 + channels, &pc, 0..n, 1.0, false)
                }
                (None, Some(cols)) => {
                    let w_block = MatRef::rows(weight, c0 * k, k);
                    sgemm(channels, n, k, dst, false, w_block, cols, 1.0, false)
                }
                (None, None) => unreachable!("f32 products always have their patches"),
            }
        };
        drop(local);
        // The bias goes on after the product, while the tile is in cache (accumulating the
        // product onto it would, again, round by block shape).
        for c in c0..c0 + channels {
            if let Some(v) = bias.value(g.c_out, b, c) {
                // SAFETY: as above.
                for y in unsafe { shared.slice((b * g.c_out + c) * plane + oy0 * g.ow, n) } {
                    *y += v;
                }
            }
        }
    };
    par_for(
        g.batch * tiles * blocks,
        g.batch * g.c_out * plane * k,
        task,
    );
}

/// d input. Stride 1: a convolution of `grad` with the flipped, transposed kernel.
/// Otherwise `W^T . dY` scattered back, one image per task.
fn input_grad(g: &Geom, weight: &[f32], grad: &[f32]) -> Vec<f32> {
    if g.stride == 1 && g.pad < g.kh && g.pad < g.kw && g.kh == g.kw {
        let mut dx = uninit_vec(g.batch * g.c_in * g.in_plane());
        let mut flipped = uninit_vec(weight.len());
        let taps = g.kh * g.kw;
        for co in 0..g.c_out {
            for ci in 0..g.c_in {
                for t in 0..taps {
                    flipped[(ci * g.c_out + co) * taps + (taps - 1 - t)] =
                        weight[(co * g.c_in + ci) * taps + t];
                }
            }
        }
        let back = Geom {
            batch: g.batch,
            c_in: g.c_out,
            h: g.oh,
            w: g.ow,
            c_out: g.c_in,
            kh: g.kh,
            kw: g.kw,
            stride: 1,
            pad: g.kh - 1 - g.pad,
            oh: g.h,
            ow: g.w,
        };
        forward(&back, grad, WeightData::F32(&flipped), Bias::None, &mut dx);
        return dx;
    }
    let (k, plane) = (g.k(), g.out_plane());
    let image_len = g.c_in * g.in_plane();
    // col2im adds each patch into place, so this one starts from zeros.
    let mut dx = vec![0f32; g.batch * image_len];
    dx.par_chunks_mut(image_len)
        .enumerate()
        .for_each(|(b, image)| {
            let rows_per_tile = g.rows_per_tile();
            let mut col = uninit_vec(k * rows_per_tile * g.ow);
            let mut oy0 = 0;
            while oy0 < g.oh {
                let rows = rows_per_tile.min(g.oh - oy0);
                let n = rows * g.ow;
                let dy = MatRef::rows(grad, b * g.c_out * plane + oy0 * g.ow, plane);
                unsafe {
                    sgemm(
                        k,
                        n,
                        g.c_out,
                        MatMut::rows(&mut col, 0, n),
                        false,
                        MatRef::rows(weight, 0, k).t(),
                        dy,
                        1.0,
                        false,
                    )
                };
                col2im_tile(g, &col[..k * n], oy0, rows, image);
                oy0 += rows;
            }
        });
    dx
}

/// d weight = sum over images and tiles of dY_tile . col_tile^T; one partial sum per thread.
fn weight_grad(g: &Geom, x: &[f32], grad: &[f32]) -> Vec<f32> {
    let (k, plane) = (g.k(), g.out_plane());
    let rows_per_tile = g.rows_per_tile();
    let tiles = g.oh.div_ceil(rows_per_tile);
    let total = g.batch * tiles;
    let workers = num_threads().min(total).max(1);
    let per_worker = total.div_ceil(workers);
    let partials: Vec<Vec<f32>> = (0..workers)
        .into_par_iter()
        .map(|wkr| {
            let mut dw = vec![0f32; g.c_out * k];
            let mut col = Vec::new();
            for t in wkr * per_worker..((wkr + 1) * per_worker).min(total) {
                let (b, tile) = (t / tiles, t % tiles);
                let oy0 = tile * rows_per_tile;
                let rows = rows_per_tile.min(g.oh - oy0);
                let n = rows * g.ow;
                let dy = MatRef::rows(grad, b * g.c_out * plane + oy0 * g.ow, plane);
                let cols = if g.is_pointwise() {
                    MatRef::rows(x, b * g.c_in * g.in_plane() + oy0 * g.ow, g.in_plane())
                } else {
                    col.resize(k * n, 0.0);
                    let image = &x[b * g.c_in * g.in_plane()..(b + 1) * g.c_in * g.in_plane()];
                    im2col_tile(g, image, oy0, rows, &mut col[..k * n]);
                    MatRef::rows(&col, 0, n)
                };
                unsafe {
                    sgemm(
                        g.c_out,
                        k,
                        n,
                        MatMut::rows(&mut dw, 0, k),
                        true,
                        dy,
                        cols.t(),
                        1.0,
                        false,
                    )
                };
            }
            dw
        })
        .collect();
    let mut iter = partials.into_iter();
    let mut sum = iter.next().unwrap_or_else(|| vec![0f32; g.c_out * k]);
    for p in iter {
        for (s, v) in sum.iter_mut().zip(p) {
            *s += v;
        }
    }
    sum
}

/// Sum of the output gradient over each image's plane: (B, C_out).
fn bias_grad_per_sample(g: &Geom, grad: &[f32]) -> Vec<f32> {
    grad.par_chunks(g.out_plane())
        .map(super::vecmath::sum)
        .collect()
}

struct Conv2dOp {
    stride: usize,
    pad: usize,
}

impl WeightedKernel for Conv2dOp {
    const NAMES: (&'static str, &'static str) = ("rl4pix-conv2d", "rl4pix-conv2d-bias");

    fn forward(&self, xs: Input, ws: Input, bias: Option<Input>) -> Result<(CpuStorage, Shape)> {
        let g = Geom::new(xs.1.shape(), ws.1.shape(), self.stride, self.pad)?;
        let x = cpu_storage_slice(xs.0, xs.1)?;
        let w = WeightData::of(ws.0, ws.1)?;
        let bias = match bias {
            None => Bias::None,
            Some((s, l)) => {
                let v = cpu_storage_slice(s, l)?;
                if v.len() == g.c_out {
                    Bias::Channel(v)
                } else if v.len() == g.batch * g.c_out {
                    Bias::SampleChannel(v)
                } else {
                    candle_core::bail!("conv2d: bias {:?} for {} channels", l.shape(), g.c_out)
                }
            }
        };
        let mut out = uninit_vec(g.batch * g.c_out * g.out_plane());
        forward(&g, x, w, bias, &mut out);
        Ok((
            CpuStorage::F32(out),
            Shape::from((g.batch, g.c_out, g.oh, g.ow)),
        ))
    }

    fn grads(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: Option<&Tensor>,
        grad: &Tensor,
    ) -> Result<Grads3> {
        let g = Geom::new(x.shape(), weight.shape(), self.stride, self.pad)?;
        with_data(grad, |gr| {
            let dx = if x.track_op() {
                let dx = with_data(weight, |w| Ok(input_grad(&g, w, gr)))?;
                Some(cpu_tensor(dx, x.dims())?)
            } else {
                None
            };
            let dw = if weight.track_op() {
                let dw = with_data(x, |xd| Ok(weight_grad(&g, xd, gr)))?;
                Some(cpu_tensor(dw, weight.dims())?)
            } else {
                None
            };
            let db = match bias {
                Some(bias) if bias.track_op() => {
                    let per_sample = bias_grad_per_sample(&g, gr);
                    let db = if bias.elem_count() == g.c_out {
                        let mut total = vec![0f32; g.c_out];
                        add_rows(&mut total, &per_sample);
                        total
                    } else {
                        per_sample
                    };
                    Some(cpu_tensor(db, bias.dims())?)
                }
                _ => None,
            };
            Ok((dx, dw, db))
        })
    }
}

/// Convolution of `x` (B, C_in, H, W) with `weight` (C_out, C_in, kh, kw), symmetric padding,
/// plus `bias`: (C_out) or (B, C_out). Differentiable in all three.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    stride: usize,
    padding: usize,
) -> Result<Tensor> {
    let op = Conv2dOp {
        stride,
        pad: padding,
    };
    weighted::apply(op, x, weight, bias)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::test_util::{max_abs_diff, var};
    use candle_core::Device;

    #[test]
    fn matches_candle_forward_and_backward() {
        // (kernel, stride, padding, input size): resnet 3x3, 1x1 projection, downsampler, odd.
        // (candle's own strided backward needs H and W of the same parity.)
        for (k, stride, pad, h, w) in [
            (3, 1, 1, 6, 5),
            (1, 1, 0, 4, 7),
            (3, 2, 1, 7, 5),
            (3, 2, 0, 8, 8),
        ] {
            let x = var(&[2, 5, h, w]);
            let weight = var(&[4, 5, k, k]);
            let bias = var(&[2, 4]);
            let fused = conv2d(&x, &weight, Some(&bias), stride, pad).unwrap();
            let reference = x
                .conv2d(&weight, pad, stride, 1, 1)
                .unwrap()
                .broadcast_add(&bias.unsqueeze(2).unwrap().unsqueeze(3).unwrap())
                .unwrap();
            assert_eq!(fused.dims(), reference.dims());
            assert!(
                max_abs_diff(&fused, &reference) < 1e-4,
                "k{k} s{stride} p{pad}"
            );
            let target = Tensor::randn(0f32, 1.0, fused.dims(), &Device::Cpu).unwrap();
            let loss = |t: &Tensor| (t * &target).unwrap().sum_all().unwrap();
            let gf = loss(&fused).backward().unwrap();
            let gr = loss(&reference).backward().unwrap();
            for v in [&x, &weight, &bias] {
                let (a, b) = (gf.get(v).unwrap(), gr.get(v).unwrap());
                assert!(
                    max_abs_diff(a, b) < 1e-3,
                    "k{k} s{stride} p{pad}: {}",
                    max_abs_diff(a, b)
                );
            }
        }
    }

    #[test]
    fn frozen_kernel_and_channel_bias() {
        let x = var(&[3, 4, 5, 5]);
        let weight = Tensor::randn(0f32, 1.0, (6, 4, 3, 3), &Device::Cpu).unwrap();
        let bias = Tensor::randn(0f32, 1.0, 6, &Device::Cpu).unwrap();
        let fused = conv2d(&x, &weight, Some(&bias), 1, 1).unwrap();
        let reference = x
            .conv2d(&weight, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&bias.reshape((1, 6, 1, 1)).unwrap())
            .unwrap();
        assert!(max_abs_diff(&fused, &reference) < 1e-4);
        let grads = fused.sum_all().unwrap().backward().unwrap();
        assert!(grads.get(&x).is_some());
        assert!(grads.get(&weight).is_none());
    }
}
