//! Our two localisation metrics: how well the masked region matches the ground truth, and how well
//! everything outside it was left alone. Soft masks weight pixels by the mask value.

use image::RgbImage;

use super::{check_same_size, Result};
use crate::data::Mask;

/// Mean of |a - b| over pixels and channels, each pixel weighted by `weight(mask value)`;
/// `None` when the weights sum to zero (nothing to measure).
fn weighted_l1(
    a: &RgbImage,
    b: &RgbImage,
    mask: &Mask,
    weight: impl Fn(f32) -> f64,
) -> Option<f64> {
    let mut sum = 0.0;
    let mut total_weight = 0.0;
    for ((pa, pb), m) in a.pixels().zip(b.pixels()).zip(mask.pixels()) {
        let w = weight(m.0[0].clamp(0.0, 1.0));
        if w > 0.0 {
            let diff: f64 = (0..3)
                .map(|c| (f64::from(pa.0[c]) - f64::from(pb.0[c])).abs() / 255.0)
                .sum();
            sum += w * diff / 3.0;
            total_weight += w;
        }
    }
    (total_weight > 0.0).then(|| sum / total_weight)
}

/// L1 between generated and ground truth inside the mask (white = edited region).
pub fn edit_region_l1(
    generated: &RgbImage,
    ground_truth: &RgbImage,
    mask: &Mask,
) -> Result<Option<f64>> {
    check_same_size(
        "edit-region L1",
        generated.dimensions(),
        ground_truth.dimensions(),
    )?;
    check_same_size(
        "edit-region L1 (mask)",
        generated.dimensions(),
        mask.dimensions(),
    )?;
    Ok(weighted_l1(generated, ground_truth, mask, f64::from))
}

/// L1 between generated and the edit's source outside the mask.
pub fn preservation_l1(
    generated: &RgbImage,
    source: &RgbImage,
    mask: &Mask,
) -> Result<Option<f64>> {
    check_same_size(
        "preservation L1",
        generated.dimensions(),
        source.dimensions(),
    )?;
    check_same_size(
        "preservation L1 (mask)",
        generated.dimensions(),
        mask.dimensions(),
    )?;
    Ok(weighted_l1(generated, source, mask, |m| 1.0 - f64::from(m)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb};

    #[test]
    fn inside_and_outside_are_separate() {
        let mask = Mask::from_fn(4, 1, |x, _| Luma([if x < 1 { 1.0 } else { 0.0 }]));
        let source = RgbImage::from_pixel(4, 1, Rgb([0, 0, 0]));
        let truth = RgbImage::from_fn(4, 1, |x, _| {
            if x < 1 {
                Rgb([255, 255, 255])
            } else {
                Rgb([0, 0, 0])
            }
        });
        // Edits the right place, and also smudges one outside pixel by 51/255.
        let generated = RgbImage::from_fn(4, 1, |x, _| match x {
            0 => Rgb([255, 255, 255]),
            1 => Rgb([51, 51, 51]),
            _ => Rgb([0, 0, 0]),
        });
        assert_eq!(
            edit_region_l1(&generated, &truth, &mask).unwrap(),
            Some(0.0)
        );
        let kept = preservation_l1(&generated, &source, &mask)
            .unwrap()
            .unwrap();
        assert!((kept - 0.2 / 3.0).abs() < 1e-12);
        let empty = Mask::new(4, 1);
        assert_eq!(edit_region_l1(&generated, &truth, &empty).unwrap(), None);
    }
}
