//! Training batches drawn straight from the synthetic world (an endless stream, so no epoch
//! overfits), and image <-> tensor conversion.

use candle_core::{Device, Tensor};
use image::RgbImage;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::synth::{random_scene, render, SynthWorld};

/// (B, 3, H, W) in [-1, 1] from same-sized RGB images.
pub fn images_to_tensor(images: &[&RgbImage], device: &Device) -> candle_core::Result<Tensor> {
    let Some(first) = images.first() else {
        candle_core::bail!("no images");
    };
    let (w, h) = first.dimensions();
    let mut data = Vec::with_capacity(images.len() * 3 * (w * h) as usize);
    for image in images {
        if image.dimensions() != (w, h) {
            candle_core::bail!("images of different sizes in one batch");
        }
        for c in 0..3 {
            data.extend(image.pixels().map(|p| p.0[c] as f32 / 127.5 - 1.0));
        }
    }
    Tensor::from_vec(data, (images.len(), 3, h as usize, w as usize), device)
}

/// (B, 3, H, W) roughly in [-1, 1] -> RGB images, clamped and rounded.
pub fn tensor_to_images(tensor: &Tensor) -> candle_core::Result<Vec<RgbImage>> {
    let (b, c, h, w) = tensor.dims4()?;
    if c != 3 {
        candle_core::bail!("expected 3 channels, got {c}");
    }
    let data: Vec<f32> = tensor
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1()?;
    let plane = h * w;
    Ok((0..b)
        .map(|i| {
            let base = i * 3 * plane;
            RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let at = y as usize * w + x as usize;
                let px = |ch: usize| {
                    let v = (data[base + ch * plane + at] + 1.0) * 127.5;
                    v.round().clamp(0.0, 255.0) as u8
                };
                image::Rgb([px(0), px(1), px(2)])
            })
        })
        .collect())
}

/// Random scenes (for the VAE).
pub fn scene_batch(
    world: &SynthWorld,
    rng: &mut ChaCha8Rng,
    count: usize,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let images: Vec<RgbImage> = (0..count)
        .map(|_| render(&random_scene(rng), world.size))
        .collect();
    images_to_tensor(&images.iter().collect::<Vec<_>>(), device)
}

/// A batch of edits: source and target images, instructions and local descriptions.
pub struct EditBatch {
    pub sources: Vec<RgbImage>,
    pub targets: Vec<RgbImage>,
    pub instructions: Vec<String>,
    pub descriptions: Vec<String>,
}

pub fn edit_batch(world: &SynthWorld, rng: &mut ChaCha8Rng, count: usize) -> EditBatch {
    let mut batch = EditBatch {
        sources: Vec::with_capacity(count),
        targets: Vec::with_capacity(count),
        instructions: Vec::with_capacity(count),
        descriptions: Vec::with_capacity(count),
    };
    for _ in 0..count {
        let turn = world.random_turn(rng).turn;
        batch.sources.push(turn.source);
        batch.targets.push(turn.target);
        batch.instructions.push(turn.instruction);
        batch
            .descriptions
            .push(turn.local_description.unwrap_or_default());
    }
    batch
}

/// Standard normal noise of `shape` from `rng` (candle's own RNG cannot be seeded per run, and
/// a resumed run must draw the same noise).
pub fn randn(
    rng: &mut ChaCha8Rng,
    shape: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let count: usize = shape.iter().product();
    let data: Vec<f32> = (0..count).map(|_| StandardNormal.sample(rng)).collect();
    Tensor::from_vec(data, shape, device)
}

/// Uniform integers in `0..high`, as f32 (timesteps).
pub fn random_timesteps(rng: &mut ChaCha8Rng, count: usize, high: usize) -> Vec<usize> {
    (0..count).map(|_| rng.random_range(0..high)).collect()
}
