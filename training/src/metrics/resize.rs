//! Antialiased bicubic resizing of 8-bit RGB, bit-exact with the two implementations that matter:
//!
//! - PIL's `Image.resize(size)` (default filter BICUBIC), which MagicBrush's scripts use to bring a
//!   generated image to the ground truth's size, and transformers' PIL-backed CLIP image processor;
//! - torch's uint8 `interpolate(mode="bicubic", antialias=True)`, which transformers' default
//!   (torchvision-backed) `CLIPImageProcessor` uses.
//!
//! Both are Keys' cubic (a = -0.5) with its support widened by the scale factor when shrinking,
//! weights normalised per output pixel and turned into fixed point, a horizontal pass rounded to 8 bits,
//! then a vertical pass. They differ only in the fixed-point precision: PIL always uses 22 fraction
//! bits; torch stores weights as int16 and takes, per axis, the most bits for which the largest
//! weight still fits. That alone moves about 1% of pixels by one level.

use image::{Luma, Rgb, RgbImage};

use crate::data::Mask;

const PIL_PRECISION_BITS: u32 = 32 - 8 - 2;

/// Whose fixed-point arithmetic to reproduce.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resampler {
    Pil,
    Torch,
}
const BICUBIC_SUPPORT: f64 = 2.0;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// For each output index: the first input index and the fixed-point weights of the inputs it reads;
/// and the number of fraction bits of those weights.
fn coefficients(
    in_size: usize,
    out_size: usize,
    resampler: Resampler,
) -> (Vec<(usize, Vec<i64>)>, u32) {
    let scale = in_size as f64 / out_size as f64;
    let filter_scale = scale.max(1.0);
    let support = BICUBIC_SUPPORT * filter_scale;
    let float = (0..out_size)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            // `as` truncates toward zero, as C's (int) cast does.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut weights: Vec<f64> = (xmin..xmax.max(xmin))
                .map(|x| bicubic((x as f64 - center + 0.5) / filter_scale))
                .collect();
            let total: f64 = weights.iter().sum();
            if total != 0.0 {
                weights.iter_mut().for_each(|w| *w /= total);
            }
            (xmin, weights)
        })
        .collect::<Vec<_>>();
    let bits = match resampler {
        Resampler::Pil => PIL_PRECISION_BITS,
        Resampler::Torch => {
            let largest = float
                .iter()
                .flat_map(|(_, w)| w.iter().copied())
                .fold(0.0f64, f64::max);
            (0..22u32)
                .find(|&p| (0.5 + largest * f64::from(1u32 << (p + 1))) as i64 >= 1 << 15)
                .unwrap_or(22)
        }
    };
    let fixed = float
        .into_iter()
        .map(|(start, weights)| {
            let fixed = weights
                .iter()
                .map(|&w| {
                    let scaled = w * f64::from(1u32 << bits);
                    // `as` truncates toward zero, as the C casts do.
                    if w < 0.0 {
                        (scaled - 0.5) as i64
                    } else {
                        (scaled + 0.5) as i64
                    }
                })
                .collect();
            (start, fixed)
        })
        .collect();
    (fixed, bits)
}

/// One resampling pass along x (`horizontal`) or y over an RGB buffer of `width` x `height`.
fn pass(
    src: &[u8],
    width: usize,
    height: usize,
    out_len: usize,
    horizontal: bool,
    resampler: Resampler,
) -> Vec<u8> {
    let (in_len, other) = if horizontal {
        (width, height)
    } else {
        (height, width)
    };
    let (coeffs, bits) = coefficients(in_len, out_len, resampler);
    let (out_w, out_h) = if horizontal {
        (out_len, height)
    } else {
        (width, out_len)
    };
    let mut out = vec![0u8; out_w * out_h * 3];
    for o in 0..other {
        for (i, (start, weights)) in coeffs.iter().enumerate() {
            let mut acc = [1i64 << bits.saturating_sub(1); 3];
            for (k, &w) in weights.iter().enumerate() {
                let (x, y) = if horizontal {
                    (start + k, o)
                } else {
                    (o, start + k)
                };
                let p = (y * width + x) * 3;
                for c in 0..3 {
                    acc[c] += i64::from(src[p + c]) * w;
                }
            }
            let (x, y) = if horizontal { (i, o) } else { (o, i) };
            let q = (y * out_w + x) * 3;
            for c in 0..3 {
                out[q + c] = (acc[c] >> bits).clamp(0, 255) as u8;
            }
        }
    }
    out
}

/// `image` resized to `width` x `height` exactly as PIL's `image.resize((width, height))` (BICUBIC).
pub fn resize_bicubic(image: &RgbImage, width: u32, height: u32) -> RgbImage {
    resize_bicubic_with(image, width, height, Resampler::Pil)
}

/// `image` resized with antialiased bicubic, rounding as `resampler` does.
pub fn resize_bicubic_with(
    image: &RgbImage,
    width: u32,
    height: u32,
    resampler: Resampler,
) -> RgbImage {
    if image.dimensions() == (width, height) || width == 0 || height == 0 {
        return if image.dimensions() == (width, height) {
            image.clone()
        } else {
            RgbImage::new(width, height)
        };
    }
    let (w, h) = (image.width() as usize, image.height() as usize);
    let mut data = image.as_raw().clone();
    let mut cur_w = w;
    if w != width as usize {
        data = pass(&data, w, h, width as usize, true, resampler);
        cur_w = width as usize;
    }
    if h != height as usize {
        data = pass(&data, cur_w, h, height as usize, false, resampler);
    }
    RgbImage::from_fn(width, height, |x, y| {
        let p = ((y as usize) * width as usize + x as usize) * 3;
        Rgb([data[p], data[p + 1], data[p + 2]])
    })
}

/// A mask brought to another size (bilinear), for data sets whose masks differ from their images.
pub fn resize_mask(mask: &Mask, width: u32, height: u32) -> Mask {
    if mask.dimensions() == (width, height) {
        return mask.clone();
    }
    let resized =
        image::imageops::resize(mask, width, height, image::imageops::FilterType::Triangle);
    Mask::from_fn(width, height, |x, y| {
        Luma([resized.get_pixel(x, y).0[0].clamp(0.0, 1.0)])
    })
}
