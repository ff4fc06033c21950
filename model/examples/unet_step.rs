//! Time one UNet step (and its peak memory) with random weights of a given config.
//!
//! ```text
//! cargo run --release -p rl4pix-model --example unet_step -- \
//!     model/configs/instruct-pix2pix/unet_config.json 512 512 3 2
//! ```
//! Arguments: config, image height, image width, batch (3 = one guided InstructPix2Pix step
//! for one image), iterations. The VAE factor is taken as 8, as in Stable Diffusion.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rl4pix_model::unet::{UNet2DConditionModel, UNetConfig};

fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let config_path = PathBuf::from(arg(0, "model/configs/instruct-pix2pix/unet_config.json"));
    let height: usize = arg(1, "512").parse()?;
    let width: usize = arg(2, "512").parse()?;
    let batch: usize = arg(3, "3").parse()?;
    let iters: usize = arg(4, "2").parse()?;

    let device = Device::Cpu;
    let config = UNetConfig::from_file(&config_path)?;
    let started = Instant::now();
    // Random weights come from a VarMap, then are detached: variables would make every op of
    // the forward pass record an autograd graph, as in training, and keep it alive.
    let weights: HashMap<String, Tensor> = {
        let varmap = VarMap::new();
        let vb = VarBuilder::from_varmap(&varmap, DType::F32, &device);
        UNet2DConditionModel::new(vb, config.clone(), &config_path)?;
        let data = varmap
            .data()
            .lock()
            .map_err(|_| anyhow::anyhow!("poisoned"))?;
        data.iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
            .collect()
    };
    let params: usize = weights.values().map(|t| t.elem_count()).sum();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &device);
    let unet = UNet2DConditionModel::new(vb, config.clone(), &config_path)?;
    println!(
        "built {:.1}M parameters in {:.1}s",
        params as f64 / 1e6,
        started.elapsed().as_secs_f64()
    );

    let cross = match &config.cross_attention_dim {
        rl4pix_model::unet::PerBlock::One(d) => *d,
        rl4pix_model::unet::PerBlock::Each(v) => v[0],
    };
    let (lh, lw) = (height / 8, width / 8);
    let sample = Tensor::randn(0f32, 1.0, (batch, config.in_channels, lh, lw), &device)?;
    let context = Tensor::randn(0f32, 1.0, (batch, 77, cross), &device)?;
    let timesteps = Tensor::full(500f32, batch, &device)?;
    let rss_before = peak_rss_mib().unwrap_or(0.0);
    let mut times = Vec::new();
    for _ in 0..iters {
        let t = Instant::now();
        let out = unet.forward(&sample, &timesteps, &context)?;
        out.sum_all()?.to_scalar::<f32>()?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(|a, b| a.total_cmp(b));
    println!(
        "latents {lh}x{lw}, batch {batch}: median {:.2}s per UNet step over {iters} runs; peak RSS {:.0} MiB (weights alone {:.0} MiB)",
        times[times.len() / 2],
        peak_rss_mib().unwrap_or(0.0),
        rss_before
    );
    Ok(())
}
