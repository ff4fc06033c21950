//! Images in and out of the model: decoding, tensors in [-1, 1], resizing to the VAE's grid,
//! and heat-map overlays of attention maps.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::{imageops::FilterType, RgbImage};

use crate::error::{ModelError, Result};

/// Decodes PNG/JPEG/WebP bytes (format sniffed from the content) into RGB.
pub fn decode_image(bytes: &[u8]) -> Result<RgbImage> {
    let reader = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| ModelError::Image(format!("cannot read image: {e}")))?;
    if reader.format().is_none() {
        return Err(ModelError::Image(
            "not a recognised image format (expected PNG, JPEG or WebP)".into(),
        ));
    }
    let img = reader
        .decode()
        .map_err(|e| ModelError::Image(format!("cannot decode image: {e}")))?;
    Ok(img.to_rgb8())
}

/// Reads and decodes an image file, naming the file in errors.
pub fn load_image(path: &Path) -> Result<RgbImage> {
    let bytes = std::fs::read(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        cause: source,
    })?;
    decode_image(&bytes).map_err(|e| match e {
        ModelError::Image(message) => ModelError::Image(format!("{}: {message}", path.display())),
        other => other,
    })
}

/// The size diffusers' image processor uses: each side floored to a multiple of `factor`
/// (at least one multiple).
pub fn size_for_vae(width: u32, height: u32, factor: u32) -> (u32, u32) {
    let fit = |v: u32| (v - v % factor).max(factor);
    (fit(width), fit(height))
}

/// Resizes with a Lanczos filter when the size differs (as diffusers' processor does).
pub fn resize_if_needed(img: &RgbImage, width: u32, height: u32) -> RgbImage {
    if img.width() == width && img.height() == height {
        img.clone()
    } else {
        image::imageops::resize(img, width, height, FilterType::Lanczos3)
    }
}

/// RGB u8 -> (3, H, W) f32 in [-1, 1].
pub fn image_to_tensor(img: &RgbImage, device: &Device) -> Result<Tensor> {
    let (w, h) = img.dimensions();
    let data: Vec<f32> = img
        .as_raw()
        .iter()
        .map(|&v| v as f32 / 127.5 - 1.0)
        .collect();
    Ok(Tensor::from_vec(data, (h as usize, w as usize, 3), device)?
        .permute((2, 0, 1))?
        .contiguous()?)
}

/// (B, 3, H, W) in [-1, 1] -> RGB u8 images, rounding as diffusers does (`round(x * 255)`).
pub fn tensor_to_images(t: &Tensor) -> Result<Vec<RgbImage>> {
    let (b, c, h, w) = t.dims4()?;
    if c != 3 {
        return Err(ModelError::InvalidArgument(format!(
            "expected 3 image channels, found {c}"
        )));
    }
    let unit = ((t.to_dtype(DType::F32)? / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let hwc = unit.permute((0, 2, 3, 1))?.contiguous()?;
    let mut images = Vec::with_capacity(b);
    for i in 0..b {
        let pixels: Vec<u8> = hwc
            .get(i)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|v| (v * 255.0).round() as u8)
            .collect();
        let img = RgbImage::from_raw(w as u32, h as u32, pixels)
            .ok_or_else(|| ModelError::Image("buffer size mismatch".into()))?;
        images.push(img);
    }
    Ok(images)
}

/// Interpolation matrix (out x in) for 1-D bilinear resizing with half-pixel centres
/// (`align_corners=False`, as PyTorch's `interpolate(mode="bilinear")`).
fn bilinear_matrix(out: usize, inp: usize) -> Vec<f32> {
    let mut m = vec![0f32; out * inp];
    let scale = inp as f64 / out as f64;
    for o in 0..out {
        let src = ((o as f64 + 0.5) * scale - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(inp - 1);
        let i1 = (i0 + 1).min(inp - 1);
        let frac = (src - i0 as f64) as f32;
        m[o * inp + i0] += 1.0 - frac;
        m[o * inp + i1] += frac;
    }
    m
}

/// Bilinear resize of maps (..., H, W) -> (..., out_h, out_w) as two matrix products.
pub fn resize_bilinear(maps: &Tensor, out_h: usize, out_w: usize) -> candle_core::Result<Tensor> {
    let dims = maps.dims();
    let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    if (h, w) == (out_h, out_w) {
        return Ok(maps.clone());
    }
    let dev = maps.device();
    let rows =
        Tensor::from_vec(bilinear_matrix(out_h, h), (out_h, h), dev)?.to_dtype(maps.dtype())?;
    let cols = Tensor::from_vec(bilinear_matrix(out_w, w), (out_w, w), dev)?
        .to_dtype(maps.dtype())?
        .t()?;
    rows.broadcast_matmul(&maps.broadcast_matmul(&cols)?)
}

/// A perceptual colour map (dark blue -> cyan -> yellow -> red) for v in [0, 1].
fn heat_colour(v: f32) -> [f32; 3] {
    const STOPS: [(f32, [f32; 3]); 5] = [
        (0.0, [0.0, 0.0, 0.5]),
        (0.25, [0.0, 0.4, 1.0]),
        (0.5, [0.0, 0.9, 0.8]),
        (0.75, [1.0, 0.85, 0.0]),
        (1.0, [0.9, 0.0, 0.0]),
    ];
    let v = v.clamp(0.0, 1.0);
    for pair in STOPS.windows(2) {
        let ((a, ca), (b, cb)) = (pair[0], pair[1]);
        if v <= b {
            let t = (v - a) / (b - a);
            return [0, 1, 2].map(|k| ca[k] + t * (cb[k] - ca[k]));
        }
    }
    STOPS[4].1
}

/// Blends a heat map (row-major `map_h x map_w`, any scale; normalised to its own min..max)
/// over `image`, bilinearly resized to the image's size.
pub fn heatmap_overlay(
    image: &RgbImage,
    map: &[f32],
    map_h: usize,
    map_w: usize,
    opacity: f32,
) -> Result<RgbImage> {
    if map.len() != map_h * map_w || map.is_empty() {
        return Err(ModelError::InvalidArgument(format!(
            "attention map has {} values, expected {map_h}x{map_w}",
            map.len()
        )));
    }
    let (w, h) = image.dimensions();
    let t = Tensor::from_slice(map, (map_h, map_w), &Device::Cpu)?;
    let up = resize_bilinear(&t, h as usize, w as usize)?.to_vec2::<f32>()?;
    let (lo, hi) = up
        .iter()
        .flatten()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let range = if hi > lo { hi - lo } else { 1.0 };
    let mut out = image.clone();
    for (y, row) in up.iter().enumerate() {
        for (x, &v) in row.iter().enumerate() {
            let colour = heat_colour((v - lo) / range);
            let px = out.get_pixel_mut(x as u32, y as u32);
            for k in 0..3 {
                let base = px[k] as f32 / 255.0;
                px[k] = ((base * (1.0 - opacity) + colour[k] * opacity) * 255.0).round() as u8;
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bilinear_matches_half_pixel_convention() -> candle_core::Result<()> {
        // torch.nn.functional.interpolate(torch.tensor([[[[0., 1.], [2., 3.]]]]), size=(4, 4),
        // mode="bilinear", align_corners=False)[0, 0, 0] == [0.0, 0.25, 0.75, 1.0]
        let t = Tensor::new(&[[0f32, 1.], [2., 3.]], &Device::Cpu)?;
        let up = resize_bilinear(&t, 4, 4)?.to_vec2::<f32>()?;
        assert_eq!(up[0], vec![0.0, 0.25, 0.75, 1.0]);
        assert_eq!(up[3], vec![2.0, 2.25, 2.75, 3.0]);
        Ok(())
    }

    #[test]
    fn vae_size_floors_to_factor() {
        assert_eq!(size_for_vae(40, 24, 8), (40, 24));
        assert_eq!(size_for_vae(45, 31, 8), (40, 24));
        assert_eq!(size_for_vae(5, 3, 8), (8, 8));
    }

    #[test]
    fn tensor_round_trip_is_exact() -> Result<()> {
        let img = RgbImage::from_fn(5, 3, |x, y| image::Rgb([x as u8 * 50, y as u8 * 80, 255]));
        let t = image_to_tensor(&img, &Device::Cpu)?.unsqueeze(0)?;
        assert_eq!(tensor_to_images(&t)?[0], img);
        Ok(())
    }

    #[test]
    fn garbage_is_not_an_image() {
        let err = decode_image(b"definitely not a png").unwrap_err();
        assert!(
            err.to_string().contains("not a recognised image format"),
            "{err}"
        );
    }
}
