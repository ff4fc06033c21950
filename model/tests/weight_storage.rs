//! How weights are held between uses (`WeightStorage`), on the fixture pipelines of
//! `tests/make_model_fixtures.py`, whose weight files are f16:
//! - kept as stored (f16 in memory, each layer widening its weight as it runs) an edit is
//!   bit-identical to converting everything to f32 at load, on whichever path runs (the fused
//!   kernels, or the composed ops with `RL4PIX_FUSED=0`);
//! - an f32 checkpoint rounded to f16 in memory stays within f16's rounding error of the f32 UNet
//!   (the tolerance of `half_precision_parity.rs`: 11 significant bits per weight, a few dozen
//!   layers).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rl4pix_model::image_io;
use rl4pix_model::pipeline::{EditRequest, InstructPix2Pix};
use rl4pix_model::unet::UNet2DConditionModel;
use rl4pix_model::weights::WeightStorage;

mod common;
use common::{device, fixture_params, max_abs, pipelines_dir, rel_err};

/// Largest relative error of the UNet with f16-rounded weights against the same f32 weights.
const F16_ROUNDING_TOLERANCE: f32 = 5e-3;

fn edit_latents(name: &str, storage: WeightStorage) -> Tensor {
    let dir = pipelines_dir();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join(format!("{name}.reference.json"))).unwrap(),
    )
    .unwrap();
    let p = &json["pipeline"];
    let image = image_io::load_image(&dir.join(format!("{name}.pipeline.input.png"))).unwrap();
    let model = InstructPix2Pix::load_with_storage(&dir.join(name), &device(), DType::F32, storage)
        .unwrap();
    let request = EditRequest {
        image: &image,
        instruction: p["prompt"].as_str().unwrap(),
        params: fixture_params(p),
        init_latents: None,
    };
    let out = model
        .edit_batch(&[request], &[], &mut |_, _| true)
        .unwrap()
        .pop()
        .unwrap();
    out.latents.to_device(&Device::Cpu).unwrap()
}

#[test]
fn f16_weights_kept_half_edit_exactly_as_an_f32_load() {
    for name in ["sd1", "sd2"] {
        let kept = edit_latents(name, WeightStorage::AsStored);
        let widened = edit_latents(name, WeightStorage::Compute);
        let diff = max_abs(&(&kept - &widened).unwrap());
        println!("{name}: max |as-stored - f32 load| = {diff}");
        assert_eq!(diff, 0.0, "{name}: keeping f16 weights changed the edit");
        assert!(max_abs(&kept) > 0.0);
    }
}

/// The sd1 fixture UNet's weights moved off the f16 grid (so rounding them back to f16 is not
/// exact) and written as an f32 checkpoint in a temporary folder.
fn f32_unet_dir() -> tempfile::TempDir {
    let src = pipelines_dir().join("sd1").join("unet");
    let tensors = candle_core::safetensors::load(
        src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let moved: HashMap<String, Tensor> = tensors
        .into_iter()
        .map(|(name, t)| {
            let t = t.to_dtype(DType::F32).unwrap();
            // A relative nudge of 1e-4, below f16's step of 4.9e-4 but above f32's.
            let nudge = (t.ones_like().unwrap() * 1.0001).unwrap();
            (name, (t * nudge).unwrap())
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    candle_core::safetensors::save(
        &moved,
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    dir
}

#[test]
fn f32_weights_rounded_to_f16_stay_within_f16_rounding() {
    let dir = f32_unet_dir();
    let reference = candle_core::safetensors::load(
        pipelines_dir().join("sd1.reference.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    let input = |key: &str| reference[key].to_device(&device()).unwrap();
    let run = |storage| {
        UNet2DConditionModel::load_with_storage(dir.path(), DType::F32, storage, &device())
            .unwrap()
            .forward(
                &input("unet.sample"),
                &input("unet.timesteps"),
                &input("unet.encoder_hidden_states"),
            )
            .unwrap()
    };
    let full = run(WeightStorage::Compute);
    let kept = run(WeightStorage::AsStored);
    let rounded = run(WeightStorage::F16);
    // An f32 file kept as stored is f32: nothing to round.
    assert_eq!(max_abs(&(&kept - &full).unwrap()), 0.0);
    let err = rel_err(&rounded, &full);
    println!("UNet with f16-rounded weights: relative error {err:.2e}");
    assert!(
        err > 0.0,
        "rounding to f16 changed nothing: was it applied?"
    );
    assert!(err <= F16_ROUNDING_TOLERANCE, "relative error {err}");
}
