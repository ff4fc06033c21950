//! `rl4pix-train synth`: writes the synthetic world in MagicBrush's folder layout.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use indicatif::{ProgressBar, ProgressStyle};

use crate::synth::{write_folder, SynthWorld, DEFAULT_SIZE};

#[derive(clap::Args, Debug)]
pub struct SynthArgs {
    /// Output folder (created; existing files of the same names are overwritten).
    #[arg(long)]
    pub out: PathBuf,
    /// Number of sessions (each 1-3 turns).
    #[arg(long, default_value_t = 1000)]
    pub count: u64,
    /// Seed; the same seed, count and size give the same files on every machine.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Image side in pixels.
    #[arg(long, default_value_t = DEFAULT_SIZE)]
    pub size: u32,
    /// Worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

pub fn run(args: SynthArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.size >= 12,
        "--size must be at least 12 pixels (got {})",
        args.size
    );
    let world = SynthWorld::new(args.size, args.seed);
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let bar = ProgressBar::new(args.count).with_style(
        ProgressStyle::with_template(
            "{msg} {wide_bar} {pos}/{len} sessions ({per_sec}, eta {eta})",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message("synth");
    let started = Instant::now();
    let summary = write_folder(&world, &args.out, args.count, threads, &|| bar.inc(1))
        .with_context(|| format!("writing the synthetic world to {}", args.out.display()))?;
    bar.finish_and_clear();
    tracing::info!(
        sessions = summary.sessions,
        turns = summary.turns,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        out = %args.out.display(),
        "synthetic world written"
    );
    Ok(())
}
