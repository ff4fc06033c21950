//! The InstructRL4Pix reward: `attention_weight * L_att + alpha * L_clip`, plus our direct
//! localization term.
//!
//! - `L_att = cos(a_gt, a_model)`: a_gt is the mask (white = 1) area-averaged to the latent grid,
//!   a_model the instruction's averaged cross-attention map on that grid.
//! - `L_clip = MAE(source, output) * [MAE > tau]` on [0, 1] RGB.
//! - `L_loc = cos(mask, |output - source|)`, the change averaged over channels, at pixel level.
//! - `L_out = mean |output - source|` outside the mask (weighted by 1 - mask): ours, a direct
//!   penalty on changing what the instruction did not ask to change.
//! - `L1(output, target)`: the ORACLE ABLATION's term (it reads the ground-truth edit); logged for
//!   every run as the policy's true error, rewarded only with `oracle_weight`.

use image::RgbImage;
use serde::{Deserialize, Serialize};

use super::config::RewardConfig;
use crate::data::Mask;

/// One sample's reward and its terms (each unweighted).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RewardTerms {
    pub reward: f64,
    pub attention: f64,
    pub clip: f64,
    pub mae: f64,
    pub localization: f64,
    #[serde(default)]
    pub outside: f64,
    /// L1 to the target; `None` when no target was given.
    #[serde(default)]
    pub oracle_l1: Option<f64>,
}

pub fn reward(
    config: &RewardConfig,
    mask: &Mask,
    attention_map: &[f32],
    (lh, lw): (usize, usize),
    source: &RgbImage,
    output: &RgbImage,
    target: Option<&RgbImage>,
) -> RewardTerms {
    let a_gt = area_average(mask, lh, lw);
    let attention = cosine(&a_gt, attention_map);
    let (mae, clip) = clip_term(source, output, config.tau);
    let localization = localization_term(mask, source, output);
    let outside = outside_change(mask, source, output);
    let oracle_l1 = target.map(|t| mean_abs_diff(output, t));
    let reward = config.attention_weight * attention
        + config.alpha * clip
        + config.localization_weight * localization
        + config.outside_weight * outside
        - config.oracle_weight * oracle_l1.unwrap_or(0.0);
    RewardTerms {
        reward,
        attention,
        clip,
        mae,
        localization,
        outside,
        oracle_l1,
    }
}

/// Mean |a - b| over pixels and channels, on [0, 1].
pub fn mean_abs_diff(a: &RgbImage, b: &RgbImage) -> f64 {
    assert_eq!(a.dimensions(), b.dimensions(), "images of different sizes");
    let n = a.as_raw().len().max(1) as f64;
    a.as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(&x, &y)| (x as f64 - y as f64).abs() / 255.0)
        .sum::<f64>()
        / n
}

/// Mean channel-averaged change |output - source| weighted by (1 - mask); 0 when the mask covers
/// everything.
pub fn outside_change(mask: &Mask, source: &RgbImage, output: &RgbImage) -> f64 {
    let (w, h) = source.dimensions();
    let mask = area_average(mask, h as usize, w as usize);
    let (mut sum, mut weight) = (0f64, 0f64);
    for ((a, b), m) in source.pixels().zip(output.pixels()).zip(&mask) {
        let keep = 1.0 - (*m as f64).clamp(0.0, 1.0);
        let change = (0..3)
            .map(|c| (a.0[c] as f64 - b.0[c] as f64).abs() / 255.0)
            .sum::<f64>()
            / 3.0;
        sum += keep * change;
        weight += keep;
    }
    if weight == 0.0 {
        0.0
    } else {
        sum / weight
    }
}

/// Cosine similarity; 0 when either vector is all zeros (no direction to agree with).
pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "cosine of vectors of different lengths");
    let (mut dot, mut na, mut nb) = (0f64, 0f64, 0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (x as f64, y as f64);
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 0.0;
    }
    dot / (na.sqrt() * nb.sqrt())
}

/// (MAE, MAE if it exceeds tau else 0) between two images of the same size, on [0, 1].
pub fn clip_term(source: &RgbImage, output: &RgbImage, tau: f64) -> (f64, f64) {
    assert_eq!(
        source.dimensions(),
        output.dimensions(),
        "images of different sizes"
    );
    let n = source.as_raw().len().max(1) as f64;
    let sum: f64 = source
        .as_raw()
        .iter()
        .zip(output.as_raw())
        .map(|(&a, &b)| (a as f64 - b as f64).abs() / 255.0)
        .sum();
    let mae = sum / n;
    (mae, if mae > tau { mae } else { 0.0 })
}

/// Cosine between the mask (at the images' size) and the per-pixel change, channel-averaged.
pub fn localization_term(mask: &Mask, source: &RgbImage, output: &RgbImage) -> f64 {
    let (w, h) = source.dimensions();
    let mask = area_average(mask, h as usize, w as usize);
    let change: Vec<f32> = source
        .pixels()
        .zip(output.pixels())
        .map(|(a, b)| {
            (0..3)
                .map(|c| (a.0[c] as f32 - b.0[c] as f32).abs() / 255.0)
                .sum::<f32>()
                / 3.0
        })
        .collect();
    cosine(&mask, &change)
}

/// The mask resampled to (rows, cols) by area averaging: each cell is the overlap-weighted mean of
/// the pixels it covers (an exact block mean when the sizes divide), row-major.
pub fn area_average(mask: &Mask, rows: usize, cols: usize) -> Vec<f32> {
    let (w, h) = (mask.width() as usize, mask.height() as usize);
    if w == 0 || h == 0 {
        return vec![0.0; rows * cols];
    }
    let spans = |n_in: usize, n_out: usize| -> Vec<Vec<(usize, f64)>> {
        let step = n_in as f64 / n_out as f64;
        (0..n_out)
            .map(|o| {
                let (lo, hi) = (o as f64 * step, (o + 1) as f64 * step);
                let first = lo.floor() as usize;
                let last = (hi.ceil() as usize).min(n_in);
                (first..last)
                    .map(|i| {
                        let overlap = (hi.min(i as f64 + 1.0) - lo.max(i as f64)).max(0.0);
                        (i, overlap)
                    })
                    .filter(|&(_, o)| o > 0.0)
                    .collect()
            })
            .collect()
    };
    let ys = spans(h, rows);
    let xs = spans(w, cols);
    let mut out = Vec::with_capacity(rows * cols);
    for y_span in &ys {
        for x_span in &xs {
            let (mut sum, mut weight) = (0f64, 0f64);
            for &(y, wy) in y_span {
                for &(x, wx) in x_span {
                    sum += mask.get_pixel(x as u32, y as u32).0[0] as f64 * wy * wx;
                    weight += wy * wx;
                }
            }
            out.push(if weight > 0.0 {
                (sum / weight) as f32
            } else {
                0.0
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Luma, Rgb};

    /// The default weights but for L_att's, alpha, tau and the localization weight.
    fn weights(
        attention_weight: f64,
        alpha: f64,
        tau: f64,
        localization_weight: f64,
    ) -> RewardConfig {
        RewardConfig {
            attention_weight,
            alpha,
            tau,
            localization_weight,
            ..RewardConfig::default_weights()
        }
    }

    fn mask_from(rows: &[&[f32]]) -> Mask {
        Mask::from_fn(rows[0].len() as u32, rows.len() as u32, |x, y| {
            Luma([rows[y as usize][x as usize]])
        })
    }

    #[test]
    fn area_average_takes_block_means_and_fractions() {
        let m = mask_from(&[
            &[1.0, 1.0, 0.0, 0.0],
            &[1.0, 0.0, 0.0, 0.0],
            &[0.0, 0.0, 1.0, 1.0],
            &[0.0, 0.0, 1.0, 1.0],
        ]);
        assert_eq!(area_average(&m, 2, 2), vec![0.75, 0.0, 0.0, 1.0]);
        // 3 columns onto 2 cells: the middle one is split half and half.
        let m = mask_from(&[&[1.0, 1.0, 0.0]]);
        let v = area_average(&m, 1, 2);
        assert!(
            (v[0] - 1.0).abs() < 1e-6 && (v[1] - 1.0 / 3.0).abs() < 1e-6,
            "{v:?}"
        );
    }

    #[test]
    fn attention_term_is_the_cosine_with_the_downsampled_mask() {
        let m = mask_from(&[&[1.0, 1.0, 0.0, 0.0], &[1.0, 1.0, 0.0, 0.0]]);
        let img = RgbImage::new(4, 2);
        let config = weights(1.0, 0.0, 0.0, 0.0);
        // a_gt = [1, 0] on a 1x2 grid.
        let r = reward(&config, &m, &[1.0, 0.0], (1, 2), &img, &img, None);
        assert!((r.attention - 1.0).abs() < 1e-12);
        let r = reward(&config, &m, &[0.0, 1.0], (1, 2), &img, &img, None);
        assert!(r.attention.abs() < 1e-12);
        let r = reward(&config, &m, &[1.0, 1.0], (1, 2), &img, &img, None);
        assert!((r.attention - 1.0 / 2f64.sqrt()).abs() < 1e-12);
        assert!((r.reward - r.attention).abs() < 1e-12);
        // A flat zero map has no direction.
        assert_eq!(
            reward(&config, &m, &[0.0, 0.0], (1, 2), &img, &img, None).attention,
            0.0
        );
    }

    #[test]
    fn clip_term_counts_only_above_tau() {
        let src = RgbImage::from_pixel(2, 2, Rgb([0, 0, 0]));
        let mut out = src.clone();
        out.put_pixel(0, 0, Rgb([255, 255, 255])); // MAE = 3 / 12 = 0.25
        assert_eq!(clip_term(&src, &out, 0.1), (0.25, 0.25));
        assert_eq!(clip_term(&src, &out, 0.25), (0.25, 0.0));
        let config = weights(2.0, -1.0, 0.1, 0.0);
        let m = mask_from(&[&[1.0, 0.0], &[0.0, 0.0]]);
        let r = reward(&config, &m, &[1.0, 0.0, 0.0, 0.0], (2, 2), &src, &out, None);
        assert!((r.reward - (2.0 * 1.0 - 0.25)).abs() < 1e-12, "{r:?}");
    }

    #[test]
    fn localization_rewards_change_inside_the_mask() {
        let m = mask_from(&[&[1.0, 0.0], &[0.0, 0.0]]);
        let src = RgbImage::from_pixel(2, 2, Rgb([10, 10, 10]));
        let mut inside = src.clone();
        inside.put_pixel(0, 0, Rgb([200, 10, 10]));
        let mut outside = src.clone();
        outside.put_pixel(1, 1, Rgb([200, 10, 10]));
        assert!((localization_term(&m, &src, &inside) - 1.0).abs() < 1e-6);
        assert!(localization_term(&m, &src, &outside).abs() < 1e-12);
        let config = weights(0.0, 0.0, 0.0, 0.5);
        let r = reward(&config, &m, &[0.0; 4], (2, 2), &src, &inside, None);
        assert!((r.reward - 0.5).abs() < 1e-6);
    }

    #[test]
    fn outside_change_sees_only_pixels_outside_the_mask() {
        let m = mask_from(&[&[1.0, 0.0], &[0.0, 0.0]]);
        let src = RgbImage::from_pixel(2, 2, Rgb([10, 10, 10]));
        let mut inside = src.clone();
        inside.put_pixel(0, 0, Rgb([255, 255, 255]));
        assert_eq!(outside_change(&m, &src, &inside), 0.0);
        let mut outside = src.clone();
        outside.put_pixel(1, 1, Rgb([10 + 51, 10, 10])); // 0.2 / 3 over one of three pixels
        let got = outside_change(&m, &src, &outside);
        assert!((got - 0.2 / 9.0).abs() < 1e-9, "{got}");
        let config = RewardConfig {
            outside_weight: -2.0,
            ..RewardConfig::default_weights()
        };
        let r = reward(&config, &m, &[0.0; 4], (2, 2), &src, &outside, None);
        assert!((r.reward + 2.0 * got).abs() < 1e-9, "{r:?}");
    }

    #[test]
    fn oracle_term_is_minus_l1_to_the_target_and_only_with_its_weight() {
        let m = mask_from(&[&[1.0, 0.0], &[0.0, 0.0]]);
        let src = RgbImage::from_pixel(2, 2, Rgb([0, 0, 0]));
        let target = RgbImage::from_pixel(2, 2, Rgb([255, 255, 255]));
        let off = RewardConfig::default_weights();
        let r = reward(&off, &m, &[0.0; 4], (2, 2), &src, &src, Some(&target));
        assert_eq!(r.oracle_l1, Some(1.0));
        assert_eq!(r.reward, 0.0, "logged, not rewarded: {r:?}");
        let oracle = RewardConfig {
            oracle_weight: 1.0,
            ..off
        };
        let r = reward(&oracle, &m, &[0.0; 4], (2, 2), &src, &target, Some(&target));
        assert_eq!((r.oracle_l1, r.reward), (Some(0.0), 0.0));
        let r = reward(&oracle, &m, &[0.0; 4], (2, 2), &src, &src, Some(&target));
        assert_eq!(r.reward, -1.0);
    }
}
