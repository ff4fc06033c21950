//! AutoencoderKL against diffusers: the tiny pipelines under `tests/fixtures/pipelines/` (made by
//! `tests/make_model_fixtures.py`), plus config and weight error reporting.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rl4pix_model::vae::{AutoencoderKl, VaeConfig};

mod common;
use common::{device, pipelines_dir};

const MAX_RELATIVE_ERROR: f32 = 1e-4;

/// The reference tensors, on the device the model runs on.
fn load_reference(name: &str) -> HashMap<String, Tensor> {
    let path = pipelines_dir().join(format!("{name}.reference.safetensors"));
    candle_core::safetensors::load(&path, &device())
        .unwrap_or_else(|e| panic!("{}: {e} (run tests/make_model_fixtures.py)", path.display()))
}

fn reference_tensor<'a>(reference: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
    reference
        .get(key)
        .unwrap_or_else(|| panic!("reference has no `{key}`"))
}

/// max |actual - expected| / max |expected|
fn relative_error(actual: &Tensor, expected: &Tensor) -> f32 {
    assert_eq!(actual.dims(), expected.dims(), "shape");
    let diff = (actual - expected)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap();
    let scale = expected.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f32>().unwrap() / scale.to_scalar::<f32>().unwrap()
}

fn check_pipeline_vae(name: &str) {
    let reference = load_reference(name);
    let vae_dir = pipelines_dir().join(name).join("vae");
    let vae = AutoencoderKl::load(&vae_dir, DType::F32, &device()).unwrap();

    let image = reference_tensor(&reference, "vae.image");
    let expected_mode = reference_tensor(&reference, "vae.mode");
    let (_, _, height, width) = image.dims4().unwrap();
    let (_, _, latent_height, latent_width) = expected_mode.dims4().unwrap();
    assert_eq!(
        (height / vae.scale_factor(), width / vae.scale_factor()),
        (latent_height, latent_width)
    );
    let mode = vae.encode_mode(image).unwrap();
    let error = relative_error(&mode, expected_mode);
    assert!(
        error <= MAX_RELATIVE_ERROR,
        "{name} encode: relative error {error}"
    );

    let decoded = vae
        .decode(reference_tensor(&reference, "vae.decode_in"))
        .unwrap();
    let error = relative_error(&decoded, reference_tensor(&reference, "vae.decoded"));
    assert!(
        error <= MAX_RELATIVE_ERROR,
        "{name} decode: relative error {error}"
    );
}

#[test]
fn sd1_vae_matches_diffusers() {
    check_pipeline_vae("sd1");
}

#[test]
fn sd2_vae_matches_diffusers() {
    check_pipeline_vae("sd2");
}

fn tiny_config_json(down_block_types: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": down_block_types,
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"],
        "block_out_channels": [8, 16],
        "layers_per_block": 1,
        "act_fn": "silu",
        "latent_channels": 4,
        "norm_num_groups": 4,
        "sample_size": 16,
        "scaling_factor": 0.18215,
        "shift_factor": null,
        "force_upcast": true,
    })
}

fn write_config(dir: &Path, config: &serde_json::Value) -> PathBuf {
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_string_pretty(config).unwrap()).unwrap();
    path
}

#[test]
fn unsupported_block_type_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &tiny_config_json(&["DownEncoderBlock2D", "AttnDownEncoderBlock2D"]),
    );
    let message = VaeConfig::from_file(&path).unwrap_err().to_string();
    assert!(message.contains("down_block_types"), "{message}");
    assert!(message.contains("AttnDownEncoderBlock2D"), "{message}");
    assert!(message.contains("config.json"), "{message}");
}

/// Writes the weights of a randomly initialised tiny VAE, with `corrupt` replaced by a tensor
/// of shape `bad_shape`, next to a matching config.
fn write_tiny_vae(dir: &Path, corrupt: Option<(&str, &[usize])>) {
    let config_path = write_config(dir, &tiny_config_json(&["DownEncoderBlock2D"; 2]));
    let config = VaeConfig::from_file(&config_path).unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    AutoencoderKl::new(vb, config).unwrap();

    let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, var) in varmap.data().lock().unwrap().iter() {
        let mut shape = var.dims().to_vec();
        if let Some((corrupt_name, bad_shape)) = corrupt {
            if name == corrupt_name {
                shape = bad_shape.to_vec();
            }
        }
        let count: usize = shape.iter().product();
        let bytes = vec![0.01f32; count]
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        tensors.push((name.clone(), shape, bytes));
    }
    if let Some((corrupt_name, _)) = corrupt {
        assert!(tensors.iter().any(|(name, _, _)| name == corrupt_name));
    }
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(name, shape, bytes)| {
            let view =
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                    .unwrap();
            (name.clone(), view)
        })
        .collect();
    safetensors::serialize_to_file(
        views,
        None,
        &dir.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
}

#[test]
fn tiny_vae_round_trips_shapes() {
    let dir = tempfile::tempdir().unwrap();
    write_tiny_vae(dir.path(), None);
    let vae = AutoencoderKl::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!(vae.scale_factor(), 2);
    assert_eq!(vae.scaling_factor(), 0.18215);
    let image = Tensor::zeros((2, 3, 6, 10), DType::F32, &Device::Cpu).unwrap();
    let latents = vae.encode_mode(&image).unwrap();
    assert_eq!(latents.dims(), &[2, 4, 3, 5]);
    assert_eq!(vae.decode(&latents).unwrap().dims(), &[2, 3, 6, 10]);
}

#[test]
fn wrong_tensor_shape_names_the_tensor() {
    let dir = tempfile::tempdir().unwrap();
    let tensor = "decoder.up_blocks.0.resnets.1.conv1.weight";
    write_tiny_vae(dir.path(), Some((tensor, &[16, 16, 3, 2])));
    let message = AutoencoderKl::load(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(message.contains(tensor), "{message}");
    assert!(
        message.contains("diffusion_pytorch_model.safetensors"),
        "{message}"
    );
}

#[test]
fn decode_gradient_matches_finite_difference() {
    // f64 so a central difference is accurate enough to catch a wrong backward pass.
    let dir = tempfile::tempdir().unwrap();
    let config = VaeConfig::from_file(&write_config(
        dir.path(),
        &tiny_config_json(&["DownEncoderBlock2D"; 2]),
    ))
    .unwrap();
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let vae = AutoencoderKl::new(vb, config).unwrap();

    let initial = Tensor::randn(0f64, 1.0, (1, 4, 3, 2), &Device::Cpu).unwrap();
    let latents = candle_core::Var::from_tensor(&initial).unwrap();
    // A non-uniform weighting so the gradient is not the same for every pixel.
    let weights = Tensor::randn(0f64, 1.0, (1, 3, 6, 4), &Device::Cpu).unwrap();
    let objective = |z: &Tensor| {
        (vae.decode(z).unwrap() * &weights)
            .unwrap()
            .sum_all()
            .unwrap()
    };
    let grads = objective(latents.as_tensor()).backward().unwrap();
    let gradient: Vec<f64> = grads
        .get(latents.as_tensor())
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();

    let step = 1e-5;
    let values: Vec<f64> = initial.flatten_all().unwrap().to_vec1().unwrap();
    for index in [0, 7, 23] {
        let shifted = |delta: f64| {
            let mut v = values.clone();
            v[index] += delta;
            let z = Tensor::from_vec(v, initial.shape(), &Device::Cpu).unwrap();
            objective(&z).to_scalar::<f64>().unwrap()
        };
        let numeric = (shifted(step) - shifted(-step)) / (2.0 * step);
        let tolerance = 1e-6 * (1.0 + numeric.abs());
        assert!(
            (gradient[index] - numeric).abs() <= tolerance,
            "latent {index}: autograd {} vs finite difference {numeric}",
            gradient[index]
        );
    }
}
