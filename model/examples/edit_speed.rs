//! Time whole edits (text encoding, VAE encode, guided denoising, VAE decode) of a model, e.g.
//! the embedded default model at its world's size.
//!
//! ```text
//! RAYON_NUM_THREADS=1 cargo run --release -p rl4pix-model --example edit_speed -- \
//!     model/assets/toy model/assets/toy/grid/0-input.png 20 10 32
//! ```
//! Arguments: model folder, input image, steps, timed edits (one untimed warm-up edit first),
//! side the image is resized to first (0: as it is; the grid's pictures are 4x enlargements of
//! the toy world's 32x32 scenes).
//! Prints the median and mean time of one edit; its last line is `ms_per_edit X` (the median).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use rl4pix_model::image_io::load_image;
use rl4pix_model::pipeline::{EditParams, InstructPix2Pix};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_string());
    let model_dir = match args.first() {
        Some(dir) => PathBuf::from(dir),
        None => rl4pix_model::default_model_dir()?,
    };
    let image_path = match args.get(1) {
        Some(path) => PathBuf::from(path),
        None => model_dir.join("grid/0-input.png"),
    };
    let steps: usize = arg(2, "20").parse().context("steps")?;
    let iters: usize = arg(3, "10").parse().context("timed edits")?;
    let side: u32 = arg(4, "32").parse().context("side")?;
    anyhow::ensure!(
        steps > 0 && iters > 0,
        "steps and timed edits must be at least 1"
    );

    let device = Device::Cpu;
    let model = InstructPix2Pix::load(&model_dir, &device)
        .with_context(|| format!("loading {}", model_dir.display()))?;
    let mut image = load_image(&image_path)?;
    if side > 0 {
        image = image::imageops::resize(&image, side, side, image::imageops::FilterType::Nearest);
    }
    let instruction = "make the square blue";
    let mut params = EditParams {
        steps,
        ..EditParams::default()
    };
    model.edit(&image, instruction, &params)?;
    let mut times = Vec::with_capacity(iters);
    for i in 0..iters {
        params.seed = i as u64 + 1;
        let start = Instant::now();
        model.edit(&image, instruction, &params)?;
        times.push(start.elapsed().as_secs_f64() * 1e3);
    }
    let mean = times.iter().sum::<f64>() / times.len() as f64;
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    println!(
        "{} ({}x{}), {steps} steps, {iters} edits: median {median:.1} ms, mean {mean:.1} ms, threads {}",
        model_dir.display(),
        image.width(),
        image.height(),
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "default".into()),
    );
    println!("ms_per_edit {median:.1}");
    Ok(())
}
