//! Running a model at the size it was trained at, whatever the picture's size.
//!
//! A diffusion model learns objects at the scale of its training pictures: the default model,
//! trained on 32x32 scenes, mistakes a 128x128 picture's shapes for backgrounds and recolours
//! everything. So by default a picture is scaled to the model's working size (keeping its aspect
//! ratio and pixel count), edited there, and the result scaled back to the picture's size. Where
//! the model left the picture alone, the input's own pixels are kept, so the scaling blurs only
//! what was edited.

use std::path::Path;

use image::imageops::{self, FilterType};
use image::{GrayImage, Luma, RgbImage};

/// The side a model was trained at, from `model_index.json` → `rl4pix.training_config.size`;
/// None when the model does not record one (it then runs at every picture's own size).
pub fn recorded_size(model_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(model_dir.join("model_index.json")).ok()?;
    let index: serde_json::Value = serde_json::from_str(&text).ok()?;
    let size = index["rl4pix"]["training_config"]["size"].as_u64()?;
    u32::try_from(size).ok().filter(|&s| s > 0)
}

/// Where an edit runs: `model` (the recorded working size, the default) or `input` (the
/// picture's own size).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum SizeMode {
    Model,
    Input,
}

impl SizeMode {
    pub fn parse(text: &str) -> Option<Self> {
        match text.trim().to_ascii_lowercase().as_str() {
            "model" => Some(Self::Model),
            "input" => Some(Self::Input),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Model => "model",
            Self::Input => "input",
        }
    }
}

/// The size a `width x height` picture is edited at: about `side²` pixels in the picture's
/// aspect ratio, each side a multiple of `grid` (the VAE's cell) and at least one cell.
pub fn working_dims(width: u32, height: u32, side: u32, grid: u32) -> (u32, u32) {
    let grid = grid.max(1);
    let scale = (side as f64 * side as f64 / (width as f64 * height as f64)).sqrt();
    let snap = |v: u32| {
        let cells = ((v as f64 * scale) / grid as f64).round().max(1.0);
        cells as u32 * grid
    };
    (snap(width), snap(height))
}

pub fn shrink(image: &RgbImage, (width, height): (u32, u32)) -> RgbImage {
    // Triangle widens with the ratio, so a large reduction averages areas instead of aliasing.
    imageops::resize(image, width, height, FilterType::Triangle)
}

/// How much a pixel of the working-size result differs from the working-size input before
/// it counts as edited (in 0..=1 of the channel range); a soft ramp between the two.
const UNCHANGED_BELOW: f32 = 0.03;
const CHANGED_ABOVE: f32 = 0.10;

/// The result at the input's size. `keep_input`: the input's pixels are kept where the model
/// left the working-size picture unchanged, blended in softly around the edits.
pub fn restore(
    input: &RgbImage,
    shrunk_input: &RgbImage,
    output: &RgbImage,
    keep_input: bool,
) -> RgbImage {
    let (width, height) = input.dimensions();
    let enlarged = imageops::resize(output, width, height, FilterType::CatmullRom);
    if !keep_input {
        return enlarged;
    }
    let mask = change_mask(shrunk_input, output);
    let mask = imageops::resize(&mask, width, height, FilterType::Triangle);
    let mut blended = enlarged;
    for ((out, src), m) in blended.pixels_mut().zip(input.pixels()).zip(mask.pixels()) {
        let edited = m[0] as f32 / 255.0;
        for c in 0..3 {
            let v = src[c] as f32 * (1.0 - edited) + out[c] as f32 * edited;
            out[c] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    blended
}

/// 255 where the model changed the picture, 0 where it did not; grown by one pixel so the
/// edges of an edit are taken from the model too.
fn change_mask(before: &RgbImage, after: &RgbImage) -> GrayImage {
    let (w, h) = after.dimensions();
    let raw = GrayImage::from_fn(w, h, |x, y| {
        let (a, b) = (before.get_pixel(x, y), after.get_pixel(x, y));
        let diff = (0..3)
            .map(|c| (a[c] as f32 - b[c] as f32).abs() / 255.0)
            .fold(0.0, f32::max);
        let t = ((diff - UNCHANGED_BELOW) / (CHANGED_ABOVE - UNCHANGED_BELOW)).clamp(0.0, 1.0);
        Luma([(t * 255.0).round() as u8])
    });
    GrayImage::from_fn(w, h, |x, y| {
        let mut most = 0;
        for ny in y.saturating_sub(1)..=(y + 1).min(h - 1) {
            for nx in x.saturating_sub(1)..=(x + 1).min(w - 1) {
                most = most.max(raw.get_pixel(nx, ny)[0]);
            }
        }
        Luma([most])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::Rgb;

    #[test]
    fn working_dims_keep_area_and_aspect_on_the_grid() {
        assert_eq!(working_dims(128, 128, 32, 8), (32, 32));
        assert_eq!(working_dims(32, 32, 32, 8), (32, 32));
        assert_eq!(working_dims(16, 16, 32, 8), (32, 32));
        assert_eq!(working_dims(256, 128, 32, 8), (48, 24));
        // Extreme shapes keep at least one cell per side.
        assert_eq!(working_dims(4000, 10, 32, 8), (640, 8));
    }

    #[test]
    fn recorded_size_reads_the_default_model() {
        let toy = Path::new(env!("CARGO_MANIFEST_DIR")).join("../model/assets/toy");
        assert_eq!(recorded_size(&toy), Some(32));
        assert_eq!(recorded_size(Path::new("/nonexistent")), None);
    }

    #[test]
    fn untouched_pixels_come_from_the_input() {
        // A fine checkerboard the working size cannot hold, with one corner edited.
        let input = RgbImage::from_fn(64, 64, |x, y| {
            if (x + y) % 2 == 0 {
                Rgb([200, 200, 200])
            } else {
                Rgb([40, 40, 40])
            }
        });
        let small = shrink(&input, (16, 16));
        let mut edited = small.clone();
        for y in 0..4 {
            for x in 0..4 {
                edited.put_pixel(x, y, Rgb([255, 0, 0]));
            }
        }
        let kept = restore(&input, &small, &edited, true);
        let plain = restore(&input, &small, &edited, false);
        // Far from the edit: exactly the input, where plain scaling lost the pattern.
        assert_eq!(kept.get_pixel(40, 40), input.get_pixel(40, 40));
        assert_eq!(kept.get_pixel(41, 40), input.get_pixel(41, 40));
        assert_ne!(plain.get_pixel(40, 40), input.get_pixel(40, 40));
        // Inside the edit: the model's red.
        assert_eq!(kept.get_pixel(4, 4), &Rgb([255, 0, 0]));
        assert_eq!(kept.dimensions(), (64, 64));
    }
}
