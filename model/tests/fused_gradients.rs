//! The fused CPU kernels (f32) must give the same UNet output and gradients as candle's composed
//! ops, which is what the f64 path runs (the kernels only take f32). Checked on the diffusers
//! fixture UNets for LoRA training (DDPO: base frozen, gradients into A and B only) and for
//! full-parameter training (pretraining: every weight a variable).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use candle_nn::VarBuilder;
use rl4pix_model::attention::ForwardCtx;
use rl4pix_model::lora::{LoraDelta, ResolvedAdapter};
use rl4pix_model::unet::{UNet2DConditionModel, UNetConfig};

fn unet_dir(name: &str) -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/pipelines"
    ))
    .join(name)
    .join("unet")
}

fn checkpoint(name: &str) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        unet_dir(name).join("diffusion_pytorch_model.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

/// max |a - b| / max |b|, in f64.
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap();
    let b = b.to_dtype(DType::F64).unwrap();
    let diff = (&a - &b).unwrap().abs().unwrap().max_all().unwrap();
    let scale = b.abs().unwrap().max_all().unwrap();
    diff.to_scalar::<f64>().unwrap() / scale.to_scalar::<f64>().unwrap().max(1e-30)
}

struct Inputs {
    sample: Tensor,
    timesteps: Tensor,
    context: Tensor,
    target: Tensor,
}

impl Inputs {
    /// Random f32 inputs, generated once so that both precisions see the same values.
    fn new(config: &UNetConfig, cross_dim: usize) -> Self {
        let dev = Device::Cpu;
        let (b, h, w) = (2, 16, 16);
        Inputs {
            sample: Tensor::randn(0f32, 1.0, (b, config.in_channels, h, w), &dev).unwrap(),
            timesteps: Tensor::new(&[10f32, 700.0], &dev).unwrap(),
            context: Tensor::randn(0f32, 1.0, (b, 7, cross_dim), &dev).unwrap(),
            target: Tensor::randn(0f32, 1.0, (b, config.out_channels, h, w), &dev).unwrap(),
        }
    }

    fn to(&self, dtype: DType) -> Self {
        Inputs {
            sample: self.sample.to_dtype(dtype).unwrap(),
            timesteps: self.timesteps.clone(),
            context: self.context.to_dtype(dtype).unwrap(),
            target: self.target.to_dtype(dtype).unwrap(),
        }
    }
}

fn config(name: &str) -> UNetConfig {
    UNetConfig::from_file(&unet_dir(name).join("config.json")).unwrap()
}

fn cross_dim(config: &UNetConfig) -> usize {
    match &config.cross_attention_dim {
        rl4pix_model::unet::PerBlock::One(d) => *d,
        rl4pix_model::unet::PerBlock::Each(v) => v[0],
    }
}

/// LoRA A and B (B non-zero so that both get gradients) for every projection, in both dtypes.
fn lora_vars(unet: &UNet2DConditionModel, seed_scale: f32) -> Vec<(usize, Tensor, Tensor)> {
    unet.projections()
        .entries
        .iter()
        .enumerate()
        .map(|(slot, e)| {
            let a = (Tensor::randn(0f32, 1.0, (4, e.in_features), &Device::Cpu).unwrap() * 0.25)
                .unwrap();
            let b = (Tensor::randn(0f32, 1.0, (e.out_features, 4), &Device::Cpu).unwrap()
                * seed_scale as f64)
                .unwrap();
            (slot, a, b)
        })
        .collect()
}

fn check_lora_gradients(name: &str) {
    let dir = unet_dir(name);
    let cfg = config(name);
    let unets: Vec<UNet2DConditionModel> = [DType::F32, DType::F64]
        .iter()
        .map(|&dt| UNet2DConditionModel::load(&dir, dt, &Device::Cpu).unwrap())
        .collect();
    let lora = lora_vars(&unets[0], 0.1);
    let base_inputs = Inputs::new(&cfg, cross_dim(&cfg));
    let mut results = Vec::new();
    for (unet, dtype) in unets.iter().zip([DType::F32, DType::F64]) {
        let vars: Vec<(usize, Var, Var)> = lora
            .iter()
            .map(|(slot, a, b)| {
                (
                    *slot,
                    Var::from_tensor(&a.to_dtype(dtype).unwrap()).unwrap(),
                    Var::from_tensor(&b.to_dtype(dtype).unwrap()).unwrap(),
                )
            })
            .collect();
        let mut deltas = vec![None; unet.projections().entries.len()];
        for (slot, a, b) in &vars {
            deltas[*slot] = Some(LoraDelta::new(a.as_tensor(), b.as_tensor(), 0.5).unwrap());
        }
        let adapter = [Arc::new(ResolvedAdapter {
            name: "test".into(),
            deltas,
        })];
        let x = base_inputs.to(dtype);
        let ctx = ForwardCtx {
            adapters: &adapter,
            capture: None,
        };
        let out = unet
            .forward_with(&x.sample, &x.timesteps, &x.context, ctx)
            .unwrap();
        let loss = (&out * &x.target).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let per_var: Vec<(Tensor, Tensor)> = vars
            .iter()
            .map(|(_, a, b)| {
                (
                    grads.get(a.as_tensor()).unwrap().clone(),
                    grads.get(b.as_tensor()).unwrap().clone(),
                )
            })
            .collect();
        results.push((out, per_var));
    }
    let (fused, composed) = (&results[0], &results[1]);
    let out_err = rel_err(&fused.0, &composed.0);
    assert!(out_err < 1e-4, "{name}: output relative error {out_err}");
    let mut worst = 0f64;
    for ((fa, fb), (ca, cb)) in fused.1.iter().zip(&composed.1) {
        worst = worst.max(rel_err(fa, ca)).max(rel_err(fb, cb));
    }
    println!("{name}: LoRA gradient relative error {worst:.2e}");
    assert!(worst < 2e-4, "{name}: LoRA gradient relative error {worst}");
}

#[test]
fn sd1_lora_gradients_match_the_composed_ops() {
    check_lora_gradients("sd1");
}

#[test]
fn sd2_lora_gradients_match_the_composed_ops() {
    check_lora_gradients("sd2");
}

#[test]
fn full_parameter_gradients_match_the_composed_ops() {
    for name in ["sd1", "sd2"] {
        let cfg = config(name);
        let weights = checkpoint(name);
        let base_inputs = Inputs::new(&cfg, cross_dim(&cfg));
        let mut results = Vec::new();
        for dtype in [DType::F32, DType::F64] {
            let vars: HashMap<String, Var> = weights
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        Var::from_tensor(&v.to_dtype(dtype).unwrap()).unwrap(),
                    )
                })
                .collect();
            let tensors: HashMap<String, Tensor> = vars
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let vb = VarBuilder::from_tensors(tensors, dtype, &Device::Cpu);
            let unet = UNet2DConditionModel::new(vb, cfg.clone(), &unet_dir(name)).unwrap();
            let x = base_inputs.to(dtype);
            let sample = Var::from_tensor(&x.sample).unwrap();
            let out = unet
                .forward_with(
                    sample.as_tensor(),
                    &x.timesteps,
                    &x.context,
                    ForwardCtx::plain(),
                )
                .unwrap();
            let loss = (&out * &x.target).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let mut by_name: HashMap<String, Tensor> = vars
                .iter()
                .filter_map(|(k, v)| grads.get(v.as_tensor()).map(|g| (k.clone(), g.clone())))
                .collect();
            by_name.insert(
                "<sample>".into(),
                grads.get(sample.as_tensor()).unwrap().clone(),
            );
            results.push(by_name);
        }
        let (fused, composed) = (&results[0], &results[1]);
        assert_eq!(
            fused.len(),
            composed.len(),
            "{name}: the same weights receive gradients"
        );
        let mut worst = (0f64, String::new());
        for (k, want) in composed {
            let got = fused
                .get(k)
                .unwrap_or_else(|| panic!("{name}: no gradient for {k}"));
            // Gradients that are zero in exact arithmetic are rounding noise in both.
            if want
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
                < 1e-9
            {
                continue;
            }
            let err = rel_err(got, want);
            if err > worst.0 {
                worst = (err, k.clone());
            }
        }
        println!(
            "{name}: worst full-parameter gradient relative error {:.2e} ({})",
            worst.0, worst.1
        );
        assert!(
            worst.0 < 2e-4,
            "{name}: {} gradient relative error {}",
            worst.1,
            worst.0
        );
    }
}
