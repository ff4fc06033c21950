//! The bf16 matmul precision (`RL4PIX_MATMUL_PRECISION=bf16`: products of bf16-rounded inputs
//! accumulated in f32 on AMX) against diffusers' f32 references, within the tolerances
//! docs/performance.md states, and against the f32 path run in the same process.
//!
//! The precision is process-wide, so everything runs in one test: the f32 result first, then
//! the bf16 one. On a CPU without AMX the setting stays f32; the test says so and checks only
//! that fallback (CI's machines have AMX).

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use rl4pix_model::ops::amx::{self, MatmulPrecision};
use rl4pix_model::pipeline::{EditRequest, InstructPix2Pix};
use rl4pix_model::unet::UNet2DConditionModel;

mod common;
use common::{device, edit_fixture, level_diff, max_abs, pipelines_dir, rel_err};

fn reference(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        pipelines_dir().join(format!("{name}.reference.safetensors")),
        &Device::Cpu,
    )
    .expect("reference fixture")
}

fn unet_output(name: &str) -> (Tensor, Tensor) {
    let r = reference(name);
    let dev = device();
    let unet =
        UNet2DConditionModel::load(&pipelines_dir().join(name).join("unet"), DType::F32, &dev)
            .expect("load unet");
    let get = |key: &str| r[&format!("unet.{key}")].to_device(&dev).unwrap();
    let timesteps = get("timesteps").to_dtype(DType::F32).unwrap();
    let out = unet
        .forward(&get("sample"), &timesteps, &get("encoder_hidden_states"))
        .unwrap();
    (out, r["unet.out"].clone())
}

fn edit(name: &str) -> (image::RgbImage, image::RgbImage) {
    let fixture = edit_fixture(name);
    let pipeline = InstructPix2Pix::load(&pipelines_dir().join(name), &device()).unwrap();
    let request = EditRequest {
        image: &fixture.input,
        instruction: &fixture.prompt,
        params: fixture.params.clone(),
        init_latents: Some(fixture.latents.clone()),
    };
    let out = pipeline
        .edit_batch(&[request], &[], &mut |_, _| true)
        .unwrap()
        .pop()
        .unwrap()
        .image;
    (out, fixture.expected)
}

/// Layers given their weight as f16 (kept half in memory; the kernels pack it straight to bf16
/// or widen it per call) give exactly what they give with the same weight widened to f32 first:
/// f16 to f32 is exact, so any difference is a packing bug. Odd sizes leave partial strips.
fn f16_weights_match_widened(precision: &str) {
    let dev = Device::Cpu;
    let randn = |shape: &[usize]| Tensor::randn(0f32, 1.0, shape, &dev).unwrap();
    let max_diff = |a: &Tensor, b: &Tensor| max_abs(&(a - b).unwrap());
    let x = randn(&[2, 24, 20, 18]);
    let w16 = randn(&[40, 24, 3, 3]).to_dtype(DType::F16).unwrap();
    let w32 = w16.to_dtype(DType::F32).unwrap();
    let bias = randn(&[40]);
    let half = rl4pix_model::ops::conv::conv2d(&x, &w16, Some(&bias), 1, 1).unwrap();
    let wide = rl4pix_model::ops::conv::conv2d(&x, &w32, Some(&bias), 1, 1).unwrap();
    assert_eq!(
        max_diff(&half, &wide),
        0.0,
        "{precision}: conv with an f16 weight"
    );

    let tokens = randn(&[2, 40, 96]);
    let w16 = randn(&[72, 96]).to_dtype(DType::F16).unwrap();
    let w32 = w16.to_dtype(DType::F32).unwrap();
    let bias = randn(&[72]);
    let half = rl4pix_model::ops::linear::linear(&tokens, &w16, Some(&bias)).unwrap();
    let wide = rl4pix_model::ops::linear::linear(&tokens, &w32, Some(&bias)).unwrap();
    assert_eq!(
        max_diff(&half, &wide),
        0.0,
        "{precision}: linear with an f16 weight"
    );
}

/// The fused attention's gradients of q, k and v for fixed inputs (two heads of 16, 160 queries:
/// a block of 128 and a block of 32 in the backward).
fn attention_grads() -> Vec<Tensor> {
    let dev = Device::Cpu;
    let make = |seed: u64, shape: &[usize]| {
        let n: usize = shape.iter().product();
        let mut state = seed;
        let data: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect();
        candle_core::Var::from_tensor(&Tensor::from_vec(data, shape, &dev).unwrap()).unwrap()
    };
    let (q, k, v) = (
        make(1, &[2, 160, 32]),
        make(2, &[2, 96, 32]),
        make(3, &[2, 96, 32]),
    );
    let target = make(4, &[2, 160, 32]);
    let out = rl4pix_model::ops::attention::attention(&q, &k, &v, 2, 0.25).unwrap();
    let grads = (out * target.as_tensor())
        .unwrap()
        .sum_all()
        .unwrap()
        .backward()
        .unwrap();
    [&q, &k, &v]
        .iter()
        .map(|x| grads.get(x.as_tensor()).unwrap().clone())
        .collect()
}

#[test]
fn bf16_products_stay_within_the_stated_tolerance_of_diffusers() {
    assert_eq!(
        amx::set_matmul_precision(MatmulPrecision::F32),
        MatmulPrecision::F32
    );
    let (unet_f32, unet_ref) = unet_output("sd1");
    let (edit_f32, edit_ref) = edit("sd1");
    f16_weights_match_widened("f32");
    let attention_f32 = attention_grads();

    let effective = amx::set_matmul_precision(MatmulPrecision::Bf16);
    if effective != MatmulPrecision::Bf16 {
        assert!(!amx::available());
        eprintln!("this CPU has no AMX: bf16 falls back to f32, nothing else to check");
        return;
    }
    let (unet_bf16, _) = unet_output("sd1");
    let (edit_bf16, _) = edit("sd1");
    f16_weights_match_widened("bf16");
    let attention_bf16 = attention_grads();
    amx::set_matmul_precision(MatmulPrecision::F32);

    // The attention backward's five products on the tiles, against the f32 kernels.
    for (name, (bf16, f32)) in ["dq", "dk", "dv"]
        .iter()
        .zip(attention_bf16.iter().zip(&attention_f32))
    {
        let err = rel_err(bf16, f32);
        println!("attention {name}: bf16 against f32, relative error {err:.2e}");
        assert!(err <= 2e-2 && err > 1e-5, "attention {name}: {err}");
    }

    let err_f32 = rel_err(&unet_f32, &unet_ref);
    let err_bf16 = rel_err(&unet_bf16, &unet_ref);
    println!("UNet relative error against diffusers: f32 {err_f32:.2e}, bf16 {err_bf16:.2e}");
    // bf16 keeps 8 significant bits: about 4e-3 relative per operand.
    assert!(err_bf16 <= 2e-2, "bf16 UNet relative error {err_bf16}");
    // The tile path ran: bf16 rounding shows, far above f32's agreement.
    assert!(
        err_bf16 > 10.0 * err_f32,
        "bf16 {err_bf16} vs f32 {err_f32}"
    );

    let (mean_f32, max_f32) = level_diff(&edit_f32, &edit_ref);
    let (mean_bf16, max_bf16) = level_diff(&edit_bf16, &edit_ref);
    println!(
        "edit against diffusers, levels: f32 mean {mean_f32:.3} max {max_f32}, \
         bf16 mean {mean_bf16:.3} max {max_bf16}"
    );
    assert!(max_f32 <= 2);
    assert!(
        mean_bf16 <= 2.0 && max_bf16 <= 16,
        "bf16 edit: mean {mean_bf16}, max {max_bf16}"
    );
}
