//! SSIM (Wang et al. 2004) exactly as scikit-image computes
//! `structural_similarity(gt, gen, channel_axis=-1, data_range=1, gaussian_weights=True, sigma=1.5,
//! use_sample_covariance=False)`: per channel, local statistics from a separable Gaussian
//! (sigma 1.5, truncated at 3.5 sigma: 11 taps) with scipy's `reflect` boundary (edge sample repeated),
//! population covariance, the SSIM map with a 5-pixel border dropped, its mean, then the mean over
//! channels. Everything in f64 on [0, 1].

use image::RgbImage;

use super::{check_same_size, MetricError, Result};

const SIGMA: f64 = 1.5;
const TRUNCATE: f64 = 3.5;
const K1: f64 = 0.01;
const K2: f64 = 0.03;

/// Radius of the Gaussian as scipy.ndimage computes it: int(truncate * sigma + 0.5).
const RADIUS: usize = (TRUNCATE * SIGMA + 0.5) as usize;
/// Side of the window scikit-image assumes (and requires the image to have at least).
pub const WINDOW: usize = 2 * RADIUS + 1;

fn gaussian_kernel() -> [f64; WINDOW] {
    let mut kernel = [0.0; WINDOW];
    for (i, k) in kernel.iter_mut().enumerate() {
        let x = i as f64 - RADIUS as f64;
        *k = (-0.5 * x * x / (SIGMA * SIGMA)).exp();
    }
    let total: f64 = kernel.iter().sum();
    kernel.map(|k| k / total)
}

/// scipy's `reflect` mode (d c b a | a b c d | d c b a), periodic for any offset.
fn reflect(i: isize, n: usize) -> usize {
    let period = 2 * n as isize;
    let m = i.rem_euclid(period);
    if m < n as isize {
        m as usize
    } else {
        (period - 1 - m) as usize
    }
}

/// Separable Gaussian filter of a `width` x `height` plane: along rows' axis 0 (y) first, then x,
/// the order scipy's `gaussian_filter` applies its 1-D passes in.
fn gaussian_filter(plane: &[f64], width: usize, height: usize, kernel: &[f64; WINDOW]) -> Vec<f64> {
    let mut along_y = vec![0.0; plane.len()];
    for y in 0..height {
        for x in 0..width {
            let mut acc = 0.0;
            for (k, w) in kernel.iter().enumerate() {
                let sy = reflect(y as isize + k as isize - RADIUS as isize, height);
                acc += w * plane[sy * width + x];
            }
            along_y[y * width + x] = acc;
        }
    }
    let mut out = vec![0.0; plane.len()];
    for y in 0..height {
        let row = &along_y[y * width..(y + 1) * width];
        for x in 0..width {
            let mut acc = 0.0;
            for (k, w) in kernel.iter().enumerate() {
                acc += w * row[reflect(x as isize + k as isize - RADIUS as isize, width)];
            }
            out[y * width + x] = acc;
        }
    }
    out
}

/// Mean SSIM of one channel pair (planes of `width` x `height`, values in [0, 1]).
pub fn ssim_plane(x: &[f64], y: &[f64], width: usize, height: usize) -> f64 {
    let kernel = gaussian_kernel();
    let filter = |p: &[f64]| gaussian_filter(p, width, height, &kernel);
    let xx: Vec<f64> = x.iter().map(|v| v * v).collect();
    let yy: Vec<f64> = y.iter().map(|v| v * v).collect();
    let xy: Vec<f64> = x.iter().zip(y).map(|(a, b)| a * b).collect();
    let (ux, uy) = (filter(x), filter(y));
    let (uxx, uyy, uxy) = (filter(&xx), filter(&yy), filter(&xy));
    let c1 = K1 * K1;
    let c2 = K2 * K2;
    let pad = (WINDOW - 1) / 2;
    let mut sum = 0.0;
    let mut count = 0usize;
    for row in pad..height - pad {
        for col in pad..width - pad {
            let i = row * width + col;
            let vx = uxx[i] - ux[i] * ux[i];
            let vy = uyy[i] - uy[i] * uy[i];
            let vxy = uxy[i] - ux[i] * uy[i];
            let a1 = 2.0 * ux[i] * uy[i] + c1;
            let a2 = 2.0 * vxy + c2;
            let b1 = ux[i] * ux[i] + uy[i] * uy[i] + c1;
            let b2 = vx + vy + c2;
            sum += (a1 * a2) / (b1 * b2);
            count += 1;
        }
    }
    sum / count as f64
}

/// SSIM of two RGB images of the same size (at least 11x11), averaged over the three channels.
pub fn ssim(generated: &RgbImage, ground_truth: &RgbImage) -> Result<f64> {
    check_same_size("SSIM", generated.dimensions(), ground_truth.dimensions())?;
    let (width, height) = (
        ground_truth.width() as usize,
        ground_truth.height() as usize,
    );
    if width < WINDOW || height < WINDOW {
        return Err(MetricError::TooSmall {
            min: WINDOW,
            width: ground_truth.width(),
            height: ground_truth.height(),
        });
    }
    let plane = |image: &RgbImage, c: usize| -> Vec<f64> {
        image.pixels().map(|p| f64::from(p.0[c]) / 255.0).collect()
    };
    let total: f64 = (0..3)
        .map(|c| ssim_plane(&plane(ground_truth, c), &plane(generated, c), width, height))
        .sum();
    Ok(total / 3.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_is_eleven_taps() {
        assert_eq!(WINDOW, 11);
        let k = gaussian_kernel();
        assert!((k.iter().sum::<f64>() - 1.0).abs() < 1e-15);
    }

    #[test]
    fn reflect_repeats_the_edge() {
        let n = 3;
        let got: Vec<usize> = (-4..7).map(|i| reflect(i, n)).collect();
        assert_eq!(got, vec![2, 2, 1, 0, 0, 1, 2, 2, 1, 0, 0]);
    }

    #[test]
    fn identical_images_score_one() {
        let image = RgbImage::from_fn(13, 12, |x, y| {
            image::Rgb([(x * 17) as u8, (y * 9) as u8, 40])
        });
        assert!((ssim(&image, &image).unwrap() - 1.0).abs() < 1e-12);
        assert!(ssim(&RgbImage::new(10, 20), &RgbImage::new(10, 20)).is_err());
    }
}
