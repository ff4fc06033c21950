//! CLIP-T: cosine between CLIP's embedding of the generated image and of the local description.
//!
//! The CLIP model is a transformers `CLIPModel` folder (`config.json`, `model.safetensors`, tokenizer
//! files, `preprocessor_config.json`). Images are preprocessed as transformers' `CLIPImageProcessor`
//! does: shortest side resized to `size.shortest_edge` with antialiased bicubic, centre crop to
//! `crop_size`, scaled to [0, 1], normalised with CLIP's mean and std. The resize reproduces the
//! processor's own arithmetic bit for bit: torch's uint8 kernel for `CLIPImageProcessor` (the
//! torchvision backend, transformers' default) and PIL's for `CLIPImageProcessorPil`.

use std::path::Path;

use candle_core::{Device, Tensor};
use image::RgbImage;
use rl4pix_model::clip::ClipModel;
use rl4pix_model::tokenizer::ClipTokenizer;
use rl4pix_model::ModelError;
use serde::Deserialize;

use super::resize::{resize_bicubic_with, Resampler};
use super::Result;

pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];
/// PIL's code for BICUBIC, the only filter CLIP's processors use.
const PIL_BICUBIC: u32 = 3;

#[derive(Debug, Deserialize, Default)]
struct SizeSpec {
    shortest_edge: Option<u32>,
    height: Option<u32>,
    width: Option<u32>,
}

#[derive(Debug, Deserialize)]
struct PreprocessorFile {
    #[serde(default)]
    size: Option<SizeSpec>,
    #[serde(default)]
    crop_size: Option<SizeSpec>,
    #[serde(default)]
    image_mean: Option<[f64; 3]>,
    #[serde(default)]
    image_std: Option<[f64; 3]>,
    #[serde(default)]
    rescale_factor: Option<f64>,
    #[serde(default)]
    do_resize: Option<bool>,
    #[serde(default)]
    do_center_crop: Option<bool>,
    #[serde(default)]
    do_normalize: Option<bool>,
    #[serde(default)]
    resample: Option<u32>,
    #[serde(default)]
    image_processor_type: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum ResizeTo {
    ShortestEdge(u32),
    Exact { width: u32, height: u32 },
}

/// CLIP's image preprocessing, from `preprocessor_config.json` or CLIP's defaults.
#[derive(Debug, Clone)]
pub struct ClipImageProcessor {
    resize: Option<ResizeTo>,
    crop: Option<(u32, u32)>,
    rescale_factor: f64,
    mean: [f64; 3],
    std: [f64; 3],
    normalize: bool,
    resampler: Resampler,
}

impl ClipImageProcessor {
    /// CLIP's defaults for a vision tower of `image_size`.
    pub fn defaults(image_size: u32) -> Self {
        ClipImageProcessor {
            resize: Some(ResizeTo::ShortestEdge(image_size)),
            crop: Some((image_size, image_size)),
            rescale_factor: 1.0 / 255.0,
            mean: OPENAI_CLIP_MEAN,
            std: OPENAI_CLIP_STD,
            normalize: true,
            resampler: Resampler::Torch,
        }
    }

    /// Reads `dir/preprocessor_config.json`, or uses the defaults for `image_size` without one.
    pub fn from_dir(dir: &Path, image_size: u32) -> std::result::Result<Self, ModelError> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Ok(Self::defaults(image_size));
        }
        let file: PreprocessorFile = rl4pix_model::config::read_json(&path)?;
        let bad = |key: &str, value: String| ModelError::Unsupported {
            file: path.clone(),
            key: key.to_string(),
            value,
        };
        if let Some(resample) = file.resample.filter(|r| *r != PIL_BICUBIC) {
            return Err(bad(
                "resample",
                format!("{resample} (only 3, bicubic, is supported)"),
            ));
        }
        let resize = match file.size {
            _ if file.do_resize == Some(false) => None,
            None => Some(ResizeTo::ShortestEdge(image_size)),
            Some(SizeSpec {
                shortest_edge: Some(edge),
                ..
            }) => Some(ResizeTo::ShortestEdge(edge)),
            Some(SizeSpec {
                height: Some(height),
                width: Some(width),
                ..
            }) => Some(ResizeTo::Exact { width, height }),
            Some(other) => return Err(bad("size", format!("{other:?}"))),
        };
        let crop = match file.crop_size {
            _ if file.do_center_crop == Some(false) => None,
            None => Some((image_size, image_size)),
            Some(SizeSpec {
                height: Some(h),
                width: Some(w),
                ..
            }) => Some((w, h)),
            Some(other) => return Err(bad("crop_size", format!("{other:?}"))),
        };
        let resampler = match file.image_processor_type.as_deref() {
            Some(kind) if kind.ends_with("Pil") => Resampler::Pil,
            _ => Resampler::Torch,
        };
        Ok(ClipImageProcessor {
            resize,
            crop,
            rescale_factor: file.rescale_factor.unwrap_or(1.0 / 255.0),
            mean: file.image_mean.unwrap_or(OPENAI_CLIP_MEAN),
            std: file.image_std.unwrap_or(OPENAI_CLIP_STD),
            normalize: file.do_normalize.unwrap_or(true),
            resampler,
        })
    }

    /// Reproduce PIL's rounding instead of torch's (as `CLIPImageProcessorPil` does).
    pub fn with_resampler(mut self, resampler: Resampler) -> Self {
        self.resampler = resampler;
        self
    }

    /// Pixel values (3, H, W), channel-major, as the processor's `pixel_values[i]`.
    pub fn pixel_values(&self, image: &RgbImage) -> (Vec<f32>, usize, usize) {
        let mut image = image.clone();
        if let Some(resize) = self.resize {
            let (w, h) = image.dimensions();
            let (new_w, new_h) = match resize {
                ResizeTo::Exact { width, height } => (width, height),
                ResizeTo::ShortestEdge(edge) => {
                    let (short, long) = if w <= h { (w, h) } else { (h, w) };
                    let new_long =
                        (f64::from(edge) * f64::from(long) / f64::from(short.max(1))) as u32;
                    if w <= h {
                        (edge, new_long)
                    } else {
                        (new_long, edge)
                    }
                }
            };
            image = resize_bicubic_with(&image, new_w, new_h, self.resampler);
        }
        if let Some((crop_w, crop_h)) = self.crop {
            image = center_crop(&image, crop_w, crop_h);
        }
        let (w, h) = (image.width() as usize, image.height() as usize);
        let mut values = vec![0f32; 3 * w * h];
        for (x, y, p) in image.enumerate_pixels() {
            for c in 0..3 {
                let mut v = f64::from(p.0[c]) * self.rescale_factor;
                if self.normalize {
                    v = (v - self.mean[c]) / self.std[c];
                }
                values[c * w * h + y as usize * w + x as usize] = v as f32;
            }
        }
        (values, h, w)
    }
}

/// Centre crop as transformers does it: top-left at floor((size - crop) / 2), zero padding (split
/// the same way) where the crop is larger than the image.
fn center_crop(image: &RgbImage, crop_w: u32, crop_h: u32) -> RgbImage {
    let (w, h) = image.dimensions();
    let offset =
        |size: u32, crop: u32| -> i64 { (i64::from(size) - i64::from(crop)).div_euclid(2) };
    let (left, top) = (offset(w, crop_w), offset(h, crop_h));
    RgbImage::from_fn(crop_w, crop_h, |x, y| {
        let (sx, sy) = (i64::from(x) + left, i64::from(y) + top);
        if sx >= 0 && sy >= 0 && sx < i64::from(w) && sy < i64::from(h) {
            *image.get_pixel(sx as u32, sy as u32)
        } else {
            image::Rgb([0, 0, 0])
        }
    })
}

/// A loaded CLIP model with its tokenizer and image processor.
pub struct ClipScorer {
    model: ClipModel,
    tokenizer: ClipTokenizer,
    processor: ClipImageProcessor,
    device: Device,
}

impl ClipScorer {
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let model = ClipModel::load(dir, device)?;
        let tokenizer = ClipTokenizer::from_dir(dir)?;
        let image_size = model.config().vision_config.image_size as u32;
        let processor = ClipImageProcessor::from_dir(dir, image_size)?;
        Ok(ClipScorer {
            model,
            tokenizer,
            processor,
            device: device.clone(),
        })
    }

    pub fn processor(&self) -> &ClipImageProcessor {
        &self.processor
    }

    /// Projected (unnormalised) image embedding, (1, D).
    pub fn image_embedding(&self, image: &RgbImage) -> Result<Tensor> {
        let (values, h, w) = self.processor.pixel_values(image);
        let pixels =
            Tensor::from_vec(values, (1, 3, h, w), &self.device).map_err(ModelError::from)?;
        Ok(self.model.image_embeds(&pixels).map_err(ModelError::from)?)
    }

    /// Projected (unnormalised) text embedding, (1, D).
    pub fn text_embedding(&self, text: &str) -> Result<Tensor> {
        let ids = self.tokenizer.encode(text)?;
        let ids = Tensor::new(ids.as_slice(), &self.device)
            .and_then(|t| t.unsqueeze(0))
            .map_err(ModelError::from)?;
        Ok(self.model.text_embeds(&ids)?)
    }

    /// CLIP-T of one image and its description.
    pub fn score(&self, image: &RgbImage, text: &str) -> Result<f64> {
        let a = self.image_embedding(image)?;
        let b = self.text_embedding(text)?;
        Ok(cosine(&a, &b)?)
    }
}

/// Cosine of two (1, D) embeddings, in f64.
pub fn cosine(a: &Tensor, b: &Tensor) -> std::result::Result<f64, ModelError> {
    let a: Vec<f32> = a.flatten_all()?.to_vec1()?;
    let b: Vec<f32> = b.flatten_all()?.to_vec1()?;
    let dot: f64 = a
        .iter()
        .zip(&b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    Ok(dot / (norm(&a) * norm(&b)).max(1e-12))
}
