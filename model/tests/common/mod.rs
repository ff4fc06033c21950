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
