//! `rl4pix-bench compare`: the rows, Candle and diffusers each in a fresh process with
//! the same thread count, printed as a markdown table.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Python with torch, diffusers and peft.
    #[arg(long, env = "RL4PIX_BENCH_PYTHON", default_value = "python3")]
    pub python: PathBuf,
    /// The repository root (configs and the Python script are found from here).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/.."))]
    pub root: PathBuf,
    /// Thread counts to run every row at, e.g. `1,2`.
    #[arg(long, value_delimiter = ',', default_value = "2")]
    pub threads: Vec<usize>,
    /// Rows to run (default: all): tiny, small, sd15, tiny-train, small-train.
    #[arg(long, value_delimiter = ',')]
    pub rows: Vec<String>,
    /// Multiplies every row's iteration count (at least one iteration each).
    #[arg(long, default_value_t = 1.0)]
    pub iters_scale: f64,
    /// OMP_WAIT_POLICY for PyTorch (`default` leaves it unset). PASSIVE is the counterpart of
    /// rl4pix-bench switching off candle's spinning pool: on a machine where another process
    /// holds a core, OpenMP's spin-waiting made the small forward at 2 threads 3.7 s instead
    /// of 0.32 s here.
    #[arg(long, default_value = "PASSIVE")]
    pub omp_wait_policy: String,
    /// diffusers' dtype: `f32`, or `bf16` (the whole UNet in bfloat16 on the CPU, oneDNN on AMX
    /// where there is one: the reference for `--matmul-precision bf16`).
    #[arg(long, default_value = "f32")]
    pub diffusers_dtype: String,
    /// Each row runs rl4pix then diffusers this many times, alternating, and keeps each side's
    /// best: a shared machine's slow spells then hit both sides alike.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub rounds: u32,
}

struct Row {
    name: &'static str,
    label: &'static str,
    config: &'static str,
    batch: usize,
    latent: usize,
    iters: usize,
    backward: bool,
}

const ROWS: [Row; 5] = [
    Row {
        name: "tiny",
        label: "tiny 32-64-64, 16x16, batch 8, forward",
        config: "bench/configs/tiny.json",
        batch: 8,
        latent: 16,
        iters: 10,
        backward: false,
    },
    Row {
        name: "small",
        label: "small 64-128-128, 32x32, batch 4, forward",
        config: "bench/configs/small.json",
        batch: 4,
        latent: 32,
        iters: 5,
        backward: false,
    },
    Row {
        name: "sd15",
        label: "SD-1.5 (instruct-pix2pix), 64x64, batch 1, forward",
        config: "model/configs/instruct-pix2pix/unet_config.json",
        batch: 1,
        latent: 64,
        iters: 2,
        backward: false,
    },
    Row {
        name: "tiny-train",
        label: "tiny, forward+backward (LoRA r4)",
        config: "bench/configs/tiny.json",
        batch: 8,
        latent: 16,
        iters: 6,
        backward: true,
    },
    Row {
        name: "small-train",
        label: "small, forward+backward (LoRA r4)",
        config: "bench/configs/small.json",
        batch: 4,
        latent: 32,
        iters: 3,
        backward: true,
    },
];

const TOKENS: usize = 77;

struct Measured {
    rust_ms: f64,
    python_ms: f64,
    gflop: Option<f64>,
}

/// The last line `key X` of a child's stdout.
pub(crate) fn parse_value(stdout: &str, key: &str) -> Option<f64> {
    stdout
        .lines()
        .rev()
        .find_map(|line| line.strip_prefix(key)?.trim().parse().ok())
}

pub(crate) fn run_child(mut cmd: Command, what: &str) -> Result<String> {
    let output = cmd
        .output()
        .with_context(|| format!("starting {what}: {cmd:?}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed ({}):\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

fn unet_args(row: &Row, root: &Path, iters: usize, threads: usize) -> Vec<String> {
    let mut args = vec![
        "unet".to_string(),
        "--config".into(),
        root.join(row.config).display().to_string(),
        "--batch".into(),
        row.batch.to_string(),
        "--height".into(),
        row.latent.to_string(),
        "--width".into(),
        row.latent.to_string(),
        "--tokens".into(),
        TOKENS.to_string(),
        "--iters".into(),
        iters.to_string(),
        "--warmup".into(),
        "1".into(),
        "--threads".into(),
        threads.to_string(),
    ];
    if row.backward {
        args.push("--backward".into());
    }
    args
}

fn measure(row: &Row, args: &CompareArgs, threads: usize) -> Result<Measured> {
    let iters = ((row.iters as f64 * args.iters_scale).round() as usize).max(1);
    let script = args.root.join("bench/diffusers_bench.py");
    let common = unet_args(row, &args.root, iters, threads);

    let value = |out: &str, key: &str, who: &str| {
        parse_value(out, key).with_context(|| format!("no `{key}` line from {who}:\n{out}"))
    };
    let mut best = Measured {
        rust_ms: f64::INFINITY,
        python_ms: f64::INFINITY,
        gflop: None,
    };
    for _ in 0..args.rounds {
        let mut rust = Command::new(std::env::current_exe()?);
        rust.args(&common)
            .env("RAYON_NUM_THREADS", threads.to_string());
        let rust_out = run_child(rust, &format!("rl4pix-bench {}", row.name))?;
        best.rust_ms = best
            .rust_ms
            .min(value(&rust_out, "ms_per_iter", "rl4pix-bench")?);

        let mut python = Command::new(&args.python);
        python
            .arg(&script)
            .args(&common)
            .args(["--dtype", &args.diffusers_dtype]);
        if !row.backward {
            python.arg("--flops");
        }
        python.env("OMP_NUM_THREADS", threads.to_string());
        if args.omp_wait_policy != "default" {
            python.env("OMP_WAIT_POLICY", &args.omp_wait_policy);
        }
        let python_out = run_child(python, &format!("diffusers_bench.py {}", row.name))?;
        best.python_ms =
            best.python_ms
                .min(value(&python_out, "ms_per_iter", "diffusers_bench.py")?);
        best.gflop = parse_value(&python_out, "gflop");
    }
    Ok(best)
}

fn sgemm_ceilings(args: &CompareArgs, threads: usize) -> Result<(f64, f64)> {
    let mut python = Command::new(&args.python);
    python
        .arg(args.root.join("bench/diffusers_bench.py"))
        .args(["sgemm", "--size", "2048", "--threads", &threads.to_string()])
        .env("OMP_NUM_THREADS", threads.to_string());
    if args.omp_wait_policy != "default" {
        python.env("OMP_WAIT_POLICY", &args.omp_wait_policy);
    }
    let torch = parse_value(&run_child(python, "torch sgemm")?, "gflops")
        .context("no `gflops` line from the torch sgemm")?;
    let mut rust = Command::new(std::env::current_exe()?);
    rust.args(["sgemm", "--size", "2048", "--threads", &threads.to_string()])
        .env("RAYON_NUM_THREADS", threads.to_string());
    let candle = parse_value(&run_child(rust, "candle sgemm")?, "gflops")
        .context("no `gflops` line from the candle sgemm")?;
    Ok((torch, candle))
}

pub fn run(args: &CompareArgs) -> Result<()> {
    let rows: Vec<&Row> = ROWS
        .iter()
        .filter(|r| args.rows.is_empty() || args.rows.iter().any(|n| n == r.name))
        .collect();
    if rows.is_empty() {
        bail!(
            "--rows matches none of {:?}",
            ROWS.iter().map(|r| r.name).collect::<Vec<_>>()
        );
    }
    let mut table = String::from(
        "| row | threads | rl4pix ms | diffusers ms | rl4pix / diffusers | rl4pix GFLOP/s | diffusers GFLOP/s |\n\
         | --- | ---: | ---: | ---: | ---: | ---: | ---: |\n",
    );
    let mut notes = Vec::new();
    for &threads in &args.threads {
        let (torch_ceiling, candle_ceiling) = sgemm_ceilings(args, threads)?;
        notes.push(format!(
            "sgemm ceiling at {threads} thread(s), 2048^3 f32: torch (MKL) {torch_ceiling:.0} GFLOP/s, \
             candle (gemm crate) {candle_ceiling:.0} GFLOP/s"
        ));
        for row in &rows {
            eprintln!("running {} at {threads} thread(s)...", row.name);
            let m = measure(row, args, threads)?;
            let rate = |ms: f64| match m.gflop {
                Some(g) => format!("{:.0}", g / (ms / 1000.0)),
                None => "-".into(),
            };
            table.push_str(&format!(
                "| {} | {threads} | {:.1} | {:.1} | {:.2} | {} | {} |\n",
                row.label,
                m.rust_ms,
                m.python_ms,
                m.rust_ms / m.python_ms,
                rate(m.rust_ms),
                rate(m.python_ms),
            ));
            if let (Some(g), "small") = (m.gflop, row.name) {
                let achieved = g / (m.rust_ms / 1000.0);
                notes.push(format!(
                    "small forward ({g:.1} GFLOP) at {threads} thread(s): rl4pix {achieved:.0} GFLOP/s = \
                     {:.0}% of the torch sgemm ceiling",
                    100.0 * achieved / torch_ceiling
                ));
            }
        }
    }
    notes.insert(
        0,
        format!(
            "threads: RAYON_NUM_THREADS for rl4pix (CANDLE_NUM_THREADS={}), torch.set_num_threads and \
             OMP_NUM_THREADS for PyTorch (OMP_WAIT_POLICY={})",
            std::env::var("CANDLE_NUM_THREADS").unwrap_or_default(),
            args.omp_wait_policy
        ),
    );
    notes.insert(
        0,
        format!(
            "each side's best of {} alternating runs per row",
            args.rounds
        ),
    );
    notes.insert(
        0,
        format!(
            "precision: rl4pix matmuls {:?}, diffusers {}",
            rl4pix_model::ops::amx::matmul_precision(),
            args.diffusers_dtype
        ),
    );
    if let Some(cpu) = cpu_model() {
        notes.insert(
            0,
            format!(
                "CPU: {cpu}, {} logical CPUs",
                std::thread::available_parallelism()
                    .map(|n| n.get())
                    .unwrap_or(0)
            ),
        );
    }
    println!("{table}");
    for note in notes {
        println!("- {note}");
    }
    Ok(())
}

fn cpu_model() -> Option<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").ok()?;
    info.lines().find_map(|l| {
        l.strip_prefix("model name")?
            .split_once(':')
            .map(|(_, v)| v.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::parse_value;

    #[test]
    fn takes_the_last_matching_line() {
        let out = "gflop 1.5\nms_per_iter 3.0\nms_per_iter 4.25\n";
        assert_eq!(parse_value(out, "ms_per_iter"), Some(4.25));
        assert_eq!(parse_value(out, "gflop"), Some(1.5));
        assert_eq!(parse_value(out, "missing"), None);
    }
}
