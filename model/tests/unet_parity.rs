//! UNet parity with diffusers' UNet2DConditionModel on the fixtures of `tests/make_model_fixtures.py`.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rl4pix_model::attention::{CapturedAttention, ForwardCtx};
use rl4pix_model::unet::UNet2DConditionModel;

mod common;
use common::{device, pipelines_dir, rel_err};

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        pipelines_dir().join(format!("{name}.reference.safetensors")),
        &Device::Cpu,
    )
    .expect("reference fixture")
}

fn check_unet(name: &str, prefix: &str, check_attention: bool) {
    let r = reference(name);
    let dev = device();
    let unet =
        UNet2DConditionModel::load(&pipelines_dir().join(name).join("unet"), DType::F32, &dev)
            .expect("load unet");
    let sample = &r[&format!("{prefix}.sample")].to_device(&dev).unwrap();
    let timesteps = r[&format!("{prefix}.timesteps")]
        .to_dtype(DType::F32)
        .unwrap()
        .to_device(&dev)
        .unwrap();
    let context = &r[&format!("{prefix}.encoder_hidden_states")]
        .to_device(&dev)
        .unwrap();
    let captured = RefCell::new(Vec::<CapturedAttention>::new());
    let ctx = ForwardCtx {
        adapters: &[],
        capture: Some(&captured),
    };
    let out = unet.forward_with(sample, &timesteps, context, ctx).unwrap();
    let err = rel_err(&out, &r[&format!("{prefix}.out")]);
    println!("{name} {prefix}: relative error {err:.2e}");
    assert!(err <= 1e-4, "{name} {prefix}: relative error {err}");

    // Capture must not change the output.
    let plain = unet.forward(sample, &timesteps, context).unwrap();
    assert_eq!(rel_err(&plain, &out), 0.0);

    if check_attention {
        let expected: Vec<&String> = {
            let mut keys: Vec<&String> = r.keys().filter(|k| k.starts_with("attn.")).collect();
            keys.sort();
            keys
        };
        let captured = captured.into_inner();
        assert_eq!(
            captured.len(),
            expected.len(),
            "{name}: number of attn2 layers"
        );
        for c in &captured {
            let key = format!("attn.{}", c.module);
            let want = r
                .get(&key)
                .unwrap_or_else(|| panic!("{name}: unexpected module {key}"));
            let err = rel_err(&c.probs, want);
            assert!(err <= 1e-4, "{name} {key}: relative error {err}");
            assert_eq!(c.height * c.width, want.dim(1).unwrap());
        }
    }
}

#[test]
fn sd1_unet_matches_diffusers_with_per_sample_timesteps() {
    check_unet("sd1", "unet", true);
}

#[test]
fn sd2_unet_matches_diffusers_with_per_sample_timesteps() {
    check_unet("sd2", "unet", true);
}

#[test]
fn sd1_unet_handles_sizes_not_a_multiple_of_the_downsampling() {
    check_unet("sd1", "unet_odd", false);
}

#[test]
fn sd2_unet_handles_sizes_not_a_multiple_of_the_downsampling() {
    check_unet("sd2", "unet_odd", false);
}

#[test]
fn unsupported_config_value_names_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let src = pipelines_dir().join("sd1").join("unet");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(src.join("config.json")).unwrap()).unwrap();
    cfg["down_block_types"][1] = "SimpleCrossAttnDownBlock2D".into();
    std::fs::write(dir.path().join("config.json"), cfg.to_string()).unwrap();
    std::fs::copy(
        src.join("diffusion_pytorch_model.safetensors"),
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = UNet2DConditionModel::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("down_block_types") && err.contains("SimpleCrossAttnDownBlock2D"),
        "{err}"
    );
}

#[test]
fn wrong_tensor_shape_names_the_tensor_and_both_shapes() {
    let dir = tempfile::tempdir().unwrap();
    let src = pipelines_dir().join("sd1").join("unet");
    std::fs::copy(src.join("config.json"), dir.path().join("config.json")).unwrap();
    let mut tensors = candle_core::safetensors::load(
        src.join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap();
    tensors.insert(
        "conv_in.bias".into(),
        Tensor::zeros(17, DType::F32, &Device::Cpu).unwrap(),
    );
    candle_core::safetensors::save(
        &tensors,
        dir.path().join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let err = UNet2DConditionModel::load(dir.path(), DType::F32, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("conv_in.bias") && err.contains("17") && err.contains("16"),
        "{err}"
    );
}
