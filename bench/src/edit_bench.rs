//! The whole edit at real size: `rl4pix-bench edit` times one InstructPix2Pix edit (load, text
//! encoder, VAE encode, every denoising step, VAE decode) and reports its peak resident memory;
//! `rl4pix-bench compare-edit` alternates it with diffusers' pipeline (`bench/diffusers_bench.py
//! edit`) on the same model folder, each side in a fresh process, and prints both sides' best.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use rl4pix_model::pipeline::{EditParams, EditRequest, InstructPix2Pix};
use rl4pix_model::weights::WeightStorage;

use crate::compare::{parse_value, run_child};

const INSTRUCTION: &str = "turn the sky into a starry night";

#[derive(Debug, Clone, clap::Args)]
pub struct EditArgs {
    /// A diffusers InstructPix2Pix folder (see bench/make_sd15_pipeline.py).
    #[arg(long)]
    pub model: PathBuf,
    /// The input image; written as a test pattern of `--size` when missing.
    #[arg(long)]
    pub image: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub size: u32,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// How weights are held between uses: as-stored (f16 files stay f16), compute (all f32) or
    /// f16.
    #[arg(long, default_value = "as-stored")]
    pub weights: WeightStorage,
    /// Write the edited image here.
    #[arg(long)]
    pub save: Option<PathBuf>,
}

/// A smooth colour pattern with edges, the same bytes on every run.
pub fn write_test_image(path: &Path, size: u32) -> Result<()> {
    let image = image::RgbImage::from_fn(size, size, |x, y| {
        let (fx, fy) = (x as f32 / size as f32, y as f32 / size as f32);
        let disc = ((fx - 0.5).powi(2) + (fy - 0.6).powi(2)).sqrt() < 0.25;
        if disc {
            image::Rgb([230, 200, 40])
        } else {
            image::Rgb([(255.0 * fx) as u8, (120.0 + 100.0 * fy) as u8, 200])
        }
    });
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    image
        .save(path)
        .with_context(|| format!("writing {}", path.display()))
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

pub fn run(args: &EditArgs) -> Result<()> {
    if !args.image.is_file() {
        write_test_image(&args.image, args.size)?;
    }
    let start = Instant::now();
    let model =
        InstructPix2Pix::load_with_storage(&args.model, &Device::Cpu, DType::F32, args.weights)?;
    let image = image::open(&args.image)
        .with_context(|| format!("reading {}", args.image.display()))?
        .to_rgb8();
    let loaded = start.elapsed().as_secs_f64();
    let params = EditParams {
        steps: args.steps,
        guidance_scale: 7.5,
        image_guidance_scale: 1.5,
        ..EditParams::default()
    };
    let request = EditRequest {
        image: &image,
        instruction: INSTRUCTION,
        params,
        init_latents: None,
    };
    let mut marks = Vec::with_capacity(args.steps);
    let out = model.edit_batch(&[request], &[], &mut |_, _| {
        marks.push(Instant::now());
        true
    })?;
    let total = start.elapsed().as_secs_f64();
    if let Some(path) = &args.save {
        out[0].image.save(path)?;
    }
    report(total, loaded, &marks, peak_rss_mib());
    Ok(())
}

/// Prints the `key value` lines `compare-edit` reads. The step time is the mean between the
/// first and the last step's end (the steady state); the fixed part is everything else.
fn report(total_s: f64, load_s: f64, marks: &[Instant], peak: Option<f64>) {
    let steps = marks.len();
    let per_step = match (marks.first(), marks.last()) {
        (Some(first), Some(last)) if steps > 1 => {
            last.duration_since(*first).as_secs_f64() / (steps - 1) as f64
        }
        _ => f64::NAN,
    };
    println!("load_ms {:.1}", load_s * 1000.0);
    println!("per_step_ms {:.1}", per_step * 1000.0);
    println!(
        "fixed_ms {:.1}",
        (total_s - steps as f64 * per_step) * 1000.0
    );
    println!("peak_rss_mib {:.1}", peak.unwrap_or(f64::NAN));
    println!("total_ms {:.1}", total_s * 1000.0);
}

#[derive(Debug, Clone, clap::Args)]
pub struct CompareEditArgs {
    /// Python with torch and diffusers.
    #[arg(long, env = "RL4PIX_BENCH_PYTHON", default_value = "python3")]
    pub python: PathBuf,
    /// The repository root (the Python script is found from here).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.."))]
    pub root: PathBuf,
    #[arg(long)]
    pub model: PathBuf,
    #[arg(long, default_value = "target/bench/edit-input.png")]
    pub image: PathBuf,
    #[arg(long, default_value_t = 512)]
    pub size: u32,
    #[arg(long, default_value_t = 20)]
    pub steps: usize,
    /// Threads for both sides.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Runs of each side, alternating; each metric keeps its best.
    #[arg(long, default_value_t = 2)]
    pub rounds: usize,
    #[arg(long, default_value = "as-stored")]
    pub weights: String,
    /// OMP_WAIT_POLICY for PyTorch, as in `compare`.
    #[arg(long, default_value = "PASSIVE")]
    pub omp_wait_policy: String,
    /// Run diffusers under torch's CPU autocast to bfloat16 (the reference for
    /// `--matmul-precision bf16`); its default is float32 throughout.
    #[arg(long)]
    pub diffusers_autocast_bf16: bool,
}

const KEYS: [&str; 4] = ["total_ms", "per_step_ms", "fixed_ms", "peak_rss_mib"];

pub fn compare(args: &CompareEditArgs) -> Result<()> {
    if !args.image.is_file() {
        write_test_image(&args.image, args.size)?;
    }
    let common = |cmd: &mut Command| {
        cmd.arg("edit")
            .arg("--model")
            .arg(&args.model)
            .arg("--image")
            .arg(&args.image)
            .arg("--steps")
            .arg(args.steps.to_string());
    };
    let mut best = [[f64::INFINITY; KEYS.len()]; 2];
    for round in 0..args.rounds {
        for (side, name) in ["rl4pix", "diffusers"].into_iter().enumerate() {
            let cmd = if side == 0 {
                let mut cmd = Command::new(std::env::current_exe()?);
                common(&mut cmd);
                cmd.arg("--weights")
                    .arg(&args.weights)
                    .env("RAYON_NUM_THREADS", args.threads.to_string());
                cmd
            } else {
                let mut cmd = Command::new(&args.python);
                cmd.arg(args.root.join("bench/diffusers_bench.py"));
                common(&mut cmd);
                cmd.arg("--threads")
                    .arg(args.threads.to_string())
                    .env("OMP_NUM_THREADS", args.threads.to_string());
                if args.diffusers_autocast_bf16 {
                    cmd.arg("--autocast-bf16");
                }
                if args.omp_wait_policy != "default" {
                    cmd.env("OMP_WAIT_POLICY", &args.omp_wait_policy);
                }
                cmd
            };
            eprintln!("round {} of {}: {name}...", round + 1, args.rounds);
            let out = run_child(cmd, name)?;
            for (k, key) in KEYS.iter().enumerate() {
                let v = parse_value(&out, key)
                    .with_context(|| format!("no `{key}` line from {name}:\n{out}"))?;
                eprintln!("  {key} {v:.1}");
                best[side][k] = best[side][k].min(v);
            }
        }
    }
    println!(
        "| {}x{} edit, {} steps, {} thread(s) | rl4pix | diffusers | rl4pix / diffusers |",
        args.size, args.size, args.steps, args.threads
    );
    println!("| --- | ---: | ---: | ---: |");
    let labels = [
        "whole edit (load included), s",
        "per denoising step, s",
        "fixed part (load, text encoder, VAE encode + decode), s",
        "peak RSS, GiB",
    ];
    for (k, label) in labels.iter().enumerate() {
        let scale = if k == 3 { 1024.0 } else { 1000.0 };
        let (r, p) = (best[0][k] / scale, best[1][k] / scale);
        println!("| {label} | {r:.2} | {p:.2} | {:.2} |", r / p);
    }
    println!(
        "\n- best of {} alternating runs per side; rl4pix weights: {}, matmul precision: {:?}; \
         diffusers: {}",
        args.rounds,
        args.weights,
        rl4pix_model::ops::amx::matmul_precision(),
        if args.diffusers_autocast_bf16 {
            "float32 weights, bf16 autocast"
        } else {
            "float32"
        }
    );
    Ok(())
}
