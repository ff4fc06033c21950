//! rl4pix-bench: times the Candle UNet (random weights of a diffusers config) and compares it
//! with diffusers' UNet2DConditionModel on the same config, batch and thread count.
//!
//! `rl4pix-bench unet ...` prints its last line as `ms_per_iter X`; `bench/diffusers_bench.py`
//! is its Python twin; `rl4pix-bench compare` runs both over the standard rows and prints a
//! markdown table.

mod compare;
mod dot_throughput;
mod edit_bench;
mod random_pipeline;
mod unet_bench;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "rl4pix-bench",
    about = "Times the Candle UNet against diffusers"
)]
struct Cli {
    /// Worker threads (sets RAYON_NUM_THREADS, which both rayon and candle's matmul read); 0
    /// keeps the environment's setting.
    #[arg(long, global = true, default_value_t = 0)]
    threads: usize,
    /// Matrix products in `f32` (diffusers' numerics) or `bf16` (inputs rounded to bf16, f32
    /// accumulation, on AMX). Unset: RL4PIX_MATMUL_PRECISION, else f32. Sets that variable, so
    /// the runs `compare` and `compare-edit` start inherit it.
    #[arg(long, global = true)]
    matmul_precision: Option<rl4pix_model::ops::amx::MatmulPrecision>,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Time one UNet forward (or forward + LoRA backward) with random weights.
    Unet(unet_bench::UnetArgs),
    /// One core's f32 FMA against bf16 dot-product (VDPBF16PS) throughput, register-bound.
    DotThroughput {
        #[arg(long, default_value_t = 20_000_000)]
        iters: usize,
    },
    /// Candle's f32 matmul rate on a square product (`--fused`: the fused ops' product, which
    /// follows --matmul-precision).
    Sgemm {
        #[arg(long, default_value_t = 2048)]
        size: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
        #[arg(long)]
        fused: bool,
    },
    /// One fused 3x3 convolution, for tuning.
    Conv {
        #[arg(long, default_value_t = 1)]
        batch: usize,
        #[arg(long)]
        c_in: usize,
        #[arg(long)]
        c_out: usize,
        #[arg(long)]
        hw: usize,
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
    /// The fused multi-head attention, forward or forward + backward, for tuning.
    Attention(unet_bench::AttentionArgs),
    /// Run Candle and diffusers over the standard rows and print a markdown table.
    Compare(compare::CompareArgs),
    /// Time one whole edit (load, text encoder, VAE, every step) and its peak memory.
    Edit(edit_bench::EditArgs),
    /// Alternate `edit` with diffusers' pipeline on the same folder and print both sides' best.
    CompareEdit(edit_bench::CompareEditArgs),
    /// Write a model folder with random weights of given architectures (default: SD-1.5's).
    RandomPipeline(random_pipeline::RandomPipelineArgs),
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Thread policy, set before any thread exists: every parallel loop runs on rayon's pool
    // (rayon reads RAYON_NUM_THREADS once, candle's matmul on every call). candle's separate
    // spin-barrier pool for large element-wise ops is switched off unless asked for
    // (CANDLE_NUM_THREADS): two pools on the same cores wait on each other, badly so when a
    // core is busy with another process (small fwd+bwd at 2 threads: 2.8 s with it, 0.64 s
    // without, on this 2-core machine next to a training job).
    if cli.threads > 0 {
        std::env::set_var("RAYON_NUM_THREADS", cli.threads.to_string());
    }
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
    use rl4pix_model::ops::amx::{self, MatmulPrecision};
    if let Some(asked) = cli.matmul_precision {
        let name = match asked {
            MatmulPrecision::F32 => "f32",
            MatmulPrecision::Bf16 => "bf16",
        };
        std::env::set_var(amx::PRECISION_ENV, name);
        if amx::set_matmul_precision(asked) != asked {
            anyhow::bail!(
                "--matmul-precision bf16 needs AMX (amx-tile, amx-bf16), which this CPU lacks"
            );
        }
    }
    eprintln!("matmul precision: {:?}", amx::matmul_precision());
    match cli.command {
        Cmd::Unet(args) => {
            let ms = unet_bench::run(&args)?;
            println!("ms_per_iter {ms:.3}");
        }
        Cmd::DotThroughput { iters } => match dot_throughput::measure(iters) {
            Some((fma, bf16)) => {
                println!("f32_fma_gflops {fma:.1}");
                println!("bf16_dot_gflops {bf16:.1}");
            }
            None => anyhow::bail!("this CPU has no AVX-512 BF16"),
        },
        Cmd::Sgemm { size, iters, fused } => {
            let gflops = unet_bench::sgemm(size, iters, fused)?;
            println!("gflops {gflops:.1}");
        }
        Cmd::Conv {
            batch,
            c_in,
            c_out,
            hw,
            iters,
        } => {
            let (ms, gflops) = unet_bench::conv(batch, c_in, c_out, hw, iters)?;
            println!("gflops {gflops:.1}");
            println!("ms_per_iter {ms:.3}");
        }
        Cmd::Attention(args) => {
            let ms = unet_bench::attention(&args)?;
            println!("ms_per_iter {ms:.3}");
        }
        Cmd::Compare(args) => compare::run(&args)?,
        Cmd::Edit(args) => edit_bench::run(&args)?,
        Cmd::CompareEdit(args) => edit_bench::compare(&args)?,
        Cmd::RandomPipeline(args) => random_pipeline::run(&args)?,
    }
    Ok(())
}
