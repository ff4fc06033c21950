//! Metric parity with the reference implementations, on fixtures from
//! `tests/make_metrics_fixtures.py`: SSIM and PSNR with scikit-image, L1/L2 as MagicBrush's script
//! computes them, the resize with PIL and torch, CLIP preprocessing and CLIP-T with transformers.

use std::path::{Path, PathBuf};

use candle_core::Device;
use image::RgbImage;
use rl4pix_training::metrics::clip_t::{cosine, ClipImageProcessor};
use rl4pix_training::metrics::resize::{resize_bicubic, Resampler};
use rl4pix_training::metrics::{l1, mse, psnr, ssim, ClipScorer};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn rgb(path: &Path) -> RgbImage {
    image::open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_rgb8()
}

fn json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn pixel_metrics_and_ssim_match_scikit_image() {
    let dir = fixtures().join("metrics");
    let expected = json(&dir.join("expected.json"));
    for case in expected["pairs"].as_array().unwrap() {
        let gt = rgb(&dir.join(case["gt"].as_str().unwrap()));
        let gen = rgb(&dir.join(case["gen"].as_str().unwrap()));
        let size = format!("{}x{}", gt.width(), gt.height());
        let want = |key: &str| case[key].as_f64().unwrap();
        let got_ssim = ssim(&gen, &gt).unwrap();
        assert!(
            (got_ssim - want("ssim")).abs() < 1e-9,
            "{size}: SSIM {got_ssim} vs {}",
            want("ssim")
        );
        let got_mse = mse(&gen, &gt).unwrap();
        assert!((got_mse - want("l2")).abs() < 1e-12, "{size}: L2");
        assert!(
            (l1(&gen, &gt).unwrap() - want("l1")).abs() < 1e-12,
            "{size}: L1"
        );
        assert!((psnr(got_mse) - want("psnr")).abs() < 1e-9, "{size}: PSNR");
    }
}

#[test]
fn resize_is_bit_exact_with_pil() {
    let dir = fixtures().join("metrics");
    let expected = json(&dir.join("expected.json"));
    for case in expected["resizes"].as_array().unwrap() {
        let src = rgb(&dir.join(case["src"].as_str().unwrap()));
        let want = rgb(&dir.join(case["expected"].as_str().unwrap()));
        let got = resize_bicubic(&src, want.width(), want.height());
        let differing = got
            .as_raw()
            .iter()
            .zip(want.as_raw())
            .filter(|(a, b)| a != b)
            .count();
        assert_eq!(
            differing,
            0,
            "{} -> {}x{}",
            case["src"],
            want.width(),
            want.height()
        );
    }
}

fn clip_expected() -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(fixtures().join("clip/expected.safetensors"), &Device::Cpu)
        .unwrap()
}

#[test]
fn clip_preprocessing_matches_both_transformers_backends() {
    let dir = fixtures().join("clip");
    let expected = clip_expected();
    let processor = ClipImageProcessor::from_dir(&dir.join("tiny"), 32).unwrap();
    for (key, processor) in [
        ("pixel_values", processor.clone()),
        ("pixel_values_pil", processor.with_resampler(Resampler::Pil)),
    ] {
        let t = &expected[key];
        let want: Vec<Vec<Vec<Vec<f32>>>> = (0..t.dims4().unwrap().0)
            .map(|i| t.get(i).unwrap().to_vec3::<f32>().unwrap())
            .collect();
        for (i, want) in want.iter().enumerate() {
            let (values, h, w) = processor.pixel_values(&rgb(&dir.join(format!("image_{i}.png"))));
            assert_eq!((h, w), (32, 32));
            let mut worst = 0f32;
            for c in 0..3 {
                for y in 0..h {
                    for x in 0..w {
                        worst = worst.max((values[c * h * w + y * w + x] - want[c][y][x]).abs());
                    }
                }
            }
            // Same 8-bit pixels; only the last float rounding of the normalisation may differ.
            assert!(worst < 1e-5, "{key} image {i}: max |diff| {worst}");
        }
    }
}

#[test]
fn clip_t_matches_transformers() {
    let dir = fixtures().join("clip");
    let scorer = ClipScorer::load(&dir.join("tiny"), &Device::Cpu).unwrap();
    let expected = clip_expected();
    let texts = json(&dir.join("expected.json"));
    let texts = texts["texts"].as_array().unwrap();
    let images: Vec<Vec<f32>> = expected["image_embeds"].to_vec2().unwrap();
    let text_embeds: Vec<Vec<f32>> = expected["text_embeds"].to_vec2().unwrap();
    let reference_cos = |a: &[f32], b: &[f32]| {
        let dot: f64 = a
            .iter()
            .zip(b)
            .map(|(x, y)| f64::from(*x) * f64::from(*y))
            .sum();
        let n = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        dot / (n(a) * n(b))
    };
    for (i, image_embed) in images.iter().enumerate() {
        let image = rgb(&dir.join(format!("image_{i}.png")));
        let ours = scorer.image_embedding(&image).unwrap();
        let ours: Vec<f32> = ours.flatten_all().unwrap().to_vec1().unwrap();
        let worst = ours
            .iter()
            .zip(image_embed)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        assert!(worst < 1e-4, "image {i}: embedding max |diff| {worst}");
        for (j, text) in texts.iter().enumerate() {
            let score = scorer.score(&image, text.as_str().unwrap()).unwrap();
            let want = reference_cos(image_embed, &text_embeds[j]);
            assert!(
                (score - want).abs() < 1e-5,
                "image {i} text {j}: {score} vs {want}"
            );
        }
    }
    let a = scorer.text_embedding("a red circle").unwrap();
    assert!((cosine(&a, &a).unwrap() - 1.0).abs() < 1e-6);
}
