//! L1, L2 (mean squared error, not its root) and PSNR on RGB in [0, 1], as MagicBrush computes them
//! (`ToTensor()` of both images, then the mean over all pixels and channels).

use image::RgbImage;

use super::{check_same_size, Result};

/// PSNR of identical images: a finite stand-in for +inf so averages stay finite (MSE floor 1e-10).
pub const PSNR_CAP_DB: f64 = 100.0;

fn mean_of(a: &RgbImage, b: &RgbImage, what: &'static str, f: impl Fn(f64) -> f64) -> Result<f64> {
    check_same_size(what, a.dimensions(), b.dimensions())?;
    let n = a.as_raw().len();
    if n == 0 {
        return Ok(0.0);
    }
    let sum: f64 = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| f((f64::from(x) - f64::from(y)) / 255.0))
        .sum();
    Ok(sum / n as f64)
}

/// Mean absolute difference.
pub fn l1(generated: &RgbImage, ground_truth: &RgbImage) -> Result<f64> {
    mean_of(generated, ground_truth, "L1", f64::abs)
}

/// Mean squared difference (MagicBrush's "L2").
pub fn mse(generated: &RgbImage, ground_truth: &RgbImage) -> Result<f64> {
    mean_of(generated, ground_truth, "L2", |d| d * d)
}

/// 10 log10(1 / MSE) for data range 1; capped at [`PSNR_CAP_DB`] for identical images.
pub fn psnr(mse: f64) -> f64 {
    (10.0 * (1.0 / mse.max(1e-10)).log10()).min(PSNR_CAP_DB)
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn known_values() {
        let a = RgbImage::from_pixel(2, 2, Rgb([0, 0, 0]));
        let b = RgbImage::from_pixel(2, 2, Rgb([255, 51, 0]));
        assert!((l1(&a, &b).unwrap() - (1.0 + 0.2) / 3.0).abs() < 1e-12);
        assert!((mse(&a, &b).unwrap() - (1.0 + 0.04) / 3.0).abs() < 1e-12);
        assert!((psnr(0.01) - 20.0).abs() < 1e-12);
        assert_eq!(psnr(0.0), PSNR_CAP_DB);
        assert!(l1(&a, &RgbImage::new(3, 2)).is_err());
    }
}
