//! Helpers the model's integration tests share (each test binary uses its own subset).
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use rl4pix_model::pipeline::EditParams;
use rl4pix_model::scheduler::SchedulerKind;

/// The diffusers pipeline fixtures of `tests/make_model_fixtures.py`.
pub fn pipelines_dir() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/pipelines"
    ))
}

/// Where the models run: `RL4PIX_DEVICE` (e.g. `cuda:0`), the CPU when unset.
pub fn device() -> Device {
    rl4pix_model::device::device_from_env().expect("RL4PIX_DEVICE")
}

/// max |t|.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |actual - expected| / max |expected|, in f32 on the CPU.
pub fn rel_err(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims(), "shape");
    let on_cpu = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
    };
    let (a, b) = (on_cpu(actual), on_cpu(expected));
    max_abs(&(a - &b).unwrap()) / max_abs(&b).max(1e-12)
}

/// The DDIM edit parameters a fixture's `<name>.pipeline.json` records.
pub fn fixture_params(p: &serde_json::Value) -> EditParams {
    EditParams {
        steps: p["steps"].as_u64().unwrap() as usize,
        guidance_scale: p["guidance_scale"].as_f64().unwrap(),
        image_guidance_scale: p["image_guidance_scale"].as_f64().unwrap(),
        scheduler: Some(SchedulerKind::Ddim),
        eta: p["eta"].as_f64().unwrap(),
        ..EditParams::default()
    }
}

/// A pipeline fixture's edit (`<name>.pipeline.*`): the request diffusers ran, with its initial
/// latents, and the image diffusers made in f32.
pub struct EditFixture {
    pub prompt: String,
    pub params: EditParams,
    pub latents: Tensor,
    pub input: image::RgbImage,
    pub expected: image::RgbImage,
}

pub fn edit_fixture(name: &str) -> EditFixture {
    use rl4pix_model::image_io::load_image;
    let dir = pipelines_dir();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{name}.reference.json"))).unwrap(),
    )
    .unwrap();
    let p = &json["pipeline"];
    let latents = candle_core::safetensors::load(
        dir.join(format!("{name}.pipeline.latents.safetensors")),
        &Device::Cpu,
    )
    .unwrap()
    .remove("latents")
    .unwrap();
    EditFixture {
        prompt: p["prompt"].as_str().unwrap().to_string(),
        params: fixture_params(p),
        latents,
        input: load_image(&dir.join(format!("{name}.pipeline.input.png"))).unwrap(),
        expected: load_image(&dir.join(format!("{name}.pipeline.output.png"))).unwrap(),
    }
}

/// Mean and largest absolute difference between two images, in 8-bit levels.
pub fn level_diff(a: &image::RgbImage, b: &image::RgbImage) -> (f64, u8) {
    assert_eq!(a.dimensions(), b.dimensions());
    let diffs: Vec<u8> = a
        .as_raw()
        .iter()
        .zip(b.as_raw())
        .map(|(x, y)| x.abs_diff(*y))
        .collect();
    let mean = diffs.iter().map(|&d| d as f64).sum::<f64>() / diffs.len() as f64;
    (mean, diffs.iter().copied().max().unwrap_or(0))
}
