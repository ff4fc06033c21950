//! Times the Candle UNet with random weights: forward only, or forward + backward into rank-4
//! LoRA on every attention projection with the base frozen (what DDPO trains).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use rl4pix_model::attention::ForwardCtx;
use rl4pix_model::lora::{LoraDelta, ResolvedAdapter};
use rl4pix_model::unet::{PerBlock, UNet2DConditionModel, UNetConfig};

/// The projections DDPO adapts (PEFT's `target_modules`).
const LORA_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];
const LORA_RANK: usize = 4;
const LORA_ALPHA: f64 = 4.0;

#[derive(Debug, Clone, clap::Args)]
pub struct UnetArgs {
    /// A diffusers `unet/config.json`.
    #[arg(long)]
    pub config: PathBuf,
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Latent height (the UNet's input), not image pixels.
    #[arg(long)]
    pub height: usize,
    /// Latent width (the UNet's input), not image pixels.
    #[arg(long)]
    pub width: usize,
    /// Text tokens in the cross-attention context.
    #[arg(long, default_value_t = 77)]
    pub tokens: usize,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Time forward + backward into rank-4 LoRA (base frozen) instead of forward alone.
    #[arg(long)]
    pub backward: bool,
    /// `cpu` or `cuda:N` (CUDA needs a build with `--features cuda`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Weights' and activations' dtype: f32, f16 or bf16 (the fused CPU kernels take f32 only).
    #[arg(long, default_value = "f32")]
    pub dtype: String,
}

pub fn parse_dtype(spec: &str) -> Result<DType> {
    match spec {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => anyhow::bail!("--dtype must be f32, f16 or bf16, got `{other}`"),
    }
}

/// Random weights of `config`: built through a `VarMap` for candle's initialisers, then turned
/// into plain tensors so that the forward pass sees a frozen model, as inference does.
pub fn random_unet(
    config_path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<UNet2DConditionModel> {
    let config = UNetConfig::from_file(config_path)
        .with_context(|| format!("reading {}", config_path.display()))?;
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, device);
    UNet2DConditionModel::new(vb, config.clone(), config_path)?;
    let frozen: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(name, var)| (name.clone(), var.as_detached_tensor()))
        .collect();
    drop(varmap);
    let vb = VarBuilder::from_tensors(frozen, dtype, device);
    Ok(UNet2DConditionModel::new(vb, config, config_path)?)
}

/// Rank-4 LoRA on the targeted projections: A ~ N(0, 1/rank^2), B = 0 (PEFT's Gaussian init).
struct TrainableLora {
    /// (slot, A, B)
    layers: Vec<(usize, Var, Var)>,
    slots: usize,
}

impl TrainableLora {
    fn new(unet: &UNet2DConditionModel, dtype: DType, device: &Device) -> Result<Self> {
        let table = unet.projections();
        let mut layers = Vec::new();
        for (slot, entry) in table.entries.iter().enumerate() {
            if !LORA_TARGETS
                .iter()
                .any(|t| entry.path.ends_with(&format!(".{t}")))
            {
                continue;
            }
            let down = (Tensor::randn(0f32, 1.0, (LORA_RANK, entry.in_features), device)?
                / LORA_RANK as f64)?
                .to_dtype(dtype)?;
            let up = Tensor::zeros((entry.out_features, LORA_RANK), dtype, device)?;
            layers.push((slot, Var::from_tensor(&down)?, Var::from_tensor(&up)?));
        }
        Ok(Self {
            layers,
            slots: table.entries.len(),
        })
    }

    /// Rebuilt every step, as the DDPO trainer does, so the graph reaches the Vars.
    fn resolved(&self) -> Result<Arc<ResolvedAdapter>> {
        let mut deltas = vec![None; self.slots];
        for (slot, down, up) in &self.layers {
            deltas[*slot] = Some(LoraDelta::new(
                down.as_tensor(),
                up.as_tensor(),
                LORA_ALPHA / LORA_RANK as f64,
            )?);
        }
        Ok(Arc::new(ResolvedAdapter {
            name: "bench".into(),
            deltas,
        }))
    }
}

fn cross_attention_dim(config: &UNetConfig) -> usize {
    match &config.cross_attention_dim {
        PerBlock::One(d) => *d,
        PerBlock::Each(v) => v.first().copied().unwrap_or(768),
    }
}

/// Median of the timed iterations, in milliseconds (the fastest one is printed too).
pub fn run(args: &UnetArgs) -> Result<f64> {
    let device = rl4pix_model::device::parse_device(&args.device)?;
    let dtype = parse_dtype(&args.dtype)?;
    let unet = random_unet(&args.config, dtype, &device)?;
    let config = &unet.config;
    let sample = Tensor::randn(
        0f32,
        1.0,
        (args.batch, config.in_channels, args.height, args.width),
        &device,
    )?
    .to_dtype(dtype)?;
    let timesteps: Vec<f32> = (0..args.batch).map(|i| (97 * i % 1000) as f32).collect();
    // Timesteps stay f32, as the pipeline passes them (bf16 cannot hold 999).
    let timesteps = Tensor::from_vec(timesteps, args.batch, &device)?;
    let context = Tensor::randn(
        0f32,
        1.0,
        (args.batch, args.tokens, cross_attention_dim(config)),
        &device,
    )?
    .to_dtype(dtype)?;

    let lora = if args.backward {
        Some(TrainableLora::new(&unet, dtype, &device)?)
    } else {
        None
    };
    let step = || -> Result<()> {
        match &lora {
            None => {
                let out = unet.forward_with(&sample, &timesteps, &context, ForwardCtx::plain())?;
                // Waits for the result, as a caller reading it would (GPU work is queued).
                out.dims4()?;
                device.synchronize()?;
            }
            Some(lora) => {
                let adapter = [lora.resolved()?];
                let ctx = ForwardCtx {
                    adapters: &adapter,
                    capture: None,
                };
                let out = unet.forward_with(&sample, &timesteps, &context, ctx)?;
                let loss = out.sqr()?.mean_all()?;
                let grads = loss.backward()?;
                let (_, down, _) = lora.layers.first().context("no LoRA target in this UNet")?;
                grads
                    .get(down.as_tensor())
                    .context("no gradient reached the LoRA weights")?;
                device.synchronize()?;
            }
        }
        Ok(())
    };
    for _ in 0..args.warmup {
        step()?;
    }
    let mut times = Vec::with_capacity(args.iters);
    let cpu_start = process_cpu_seconds();
    for _ in 0..args.iters.max(1) {
        let start = Instant::now();
        step()?;
        times.push(start.elapsed().as_secs_f64() * 1000.0);
    }
    if let (Some(a), Some(b)) = (cpu_start, process_cpu_seconds()) {
        // CPU time of the whole process per iteration: steadier than wall time on a busy
        // machine (it leaves out time spent descheduled).
        println!(
            "cpu_ms_per_iter {:.3}",
            (b - a) * 1000.0 / times.len() as f64
        );
    }
    let fastest = times.iter().copied().fold(f64::INFINITY, f64::min);
    println!("min_ms {fastest:.3}");
    Ok(median(&mut times))
}

/// User + system CPU time of this process from /proc (Linux only; 10 ms ticks).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let rest = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

pub fn median(times: &mut [f64]) -> f64 {
    times.sort_by(|a, b| a.total_cmp(b));
    let n = times.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    }
}

/// Candle's own f32 matmul rate on an n^3 product, in GFLOP/s (best of `iters`).
pub fn sgemm(size: usize, iters: usize, fused: bool) -> Result<f64> {
    let device = Device::Cpu;
    let a = Tensor::randn(0f32, 1.0, (size, size), &device)?;
    let b = Tensor::randn(0f32, 1.0, (size, size), &device)?;
    // The fused linear op runs the project's own product (f32, or bf16 on AMX under
    // --matmul-precision bf16); candle's matmul is always f32.
    let product = || -> Result<Tensor> {
        Ok(if fused {
            rl4pix_model::ops::linear::linear(&a.unsqueeze(0)?, &b, None)?
        } else {
            a.matmul(&b)?
        })
    };
    product()?;
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) {
        let start = Instant::now();
        product()?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(2.0 * (size as f64).powi(3) / best / 1e9)
}

/// One fused 3x3 convolution (padding 1) of (batch, c_in, hw, hw) to c_out channels, in ms,
/// best of `iters`, with the achieved GFLOP/s: for tuning the lowering.
pub fn conv(
    batch: usize,
    c_in: usize,
    c_out: usize,
    hw: usize,
    iters: usize,
) -> Result<(f64, f64)> {
    let device = Device::Cpu;
    let x = Tensor::randn(0f32, 1.0, (batch, c_in, hw, hw), &device)?;
    let w = Tensor::randn(0f32, 1.0, (c_out, c_in, 3, 3), &device)?;
    let b = Tensor::randn(0f32, 1.0, c_out, &device)?;
    let mut best = f64::INFINITY;
    for _ in 0..iters.max(1) + 1 {
        let start = Instant::now();
        rl4pix_model::ops::conv::conv2d(&x, &w, Some(&b), 1, 1)?;
        best = best.min(start.elapsed().as_secs_f64());
    }
    let flop = 2.0 * (batch * c_out * hw * hw * c_in * 9) as f64;
    Ok((best * 1000.0, flop / best / 1e9))
}

#[derive(Debug, Clone, clap::Args)]
pub struct AttentionArgs {
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Query tokens (latent height x width for self-attention).
    #[arg(long, default_value_t = 1024)]
    pub q_len: usize,
    /// Key/value tokens (77 for cross-attention on CLIP's text).
    #[arg(long, default_value_t = 1024)]
    pub kv_len: usize,
    #[arg(long, default_value_t = 4)]
    pub heads: usize,
    #[arg(long, default_value_t = 16)]
    pub head_dim: usize,
    #[arg(long, default_value_t = 5)]
    pub iters: usize,
    /// Also run the backward pass into q, k and v.
    #[arg(long)]
    pub backward: bool,
}

/// Best milliseconds of one fused attention call (and its backward when asked).
pub fn attention(args: &AttentionArgs) -> Result<f64> {
    let device = Device::Cpu;
    let channels = args.heads * args.head_dim;
    let var = |len: usize| Var::randn(0f32, 1.0, (args.batch, len, channels), &device);
    let (q, k, v) = (var(args.q_len)?, var(args.kv_len)?, var(args.kv_len)?);
    let scale = 1.0 / (args.head_dim as f64).sqrt();
    let mut best = f64::INFINITY;
    for _ in 0..args.iters.max(1) + 1 {
        let start = Instant::now();
        let out = rl4pix_model::ops::attention::attention(&q, &k, &v, args.heads, scale)?;
        if args.backward {
            out.sum_all()?.backward()?;
        }
        best = best.min(start.elapsed().as_secs_f64());
    }
    Ok(best * 1000.0)
}
