//! Serving benchmark: throughput and p50/p99 latency at concurrency 1, 4 and 16 over HTTP,
//! against the same model called in-process at the same batch sizes.
//!
//! `cargo run --release -p rl4pix-server --example bench -- --model tests/fixtures/pipelines/sd1`
//! (`RL4PIX_DEVICE=cuda:0 RL4PIX_DTYPE=f16` for a GPU, in a build with `--features cuda`)

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use image::{Rgb, RgbImage};
use rl4pix_model::pipeline::{EditParams, EditRequest, InstructPix2Pix};

#[derive(Parser)]
struct Opts {
    #[arg(long, default_value = "tests/fixtures/pipelines/sd1")]
    model: PathBuf,
    /// Square input side in pixels.
    #[arg(long, default_value_t = 32)]
    size: u32,
    #[arg(long, default_value_t = 10)]
    steps: usize,
    /// Requests per concurrency level (rounded up to a multiple of the level).
    #[arg(long, default_value_t = 48)]
    requests: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    concurrency: Vec<usize>,
    #[arg(long, default_value_t = 5)]
    max_batch_wait_ms: u64,
    /// Rounds per level (alternating in-process and HTTP); the best of each is reported.
    #[arg(long, default_value_t = 2)]
    rounds: usize,
}

struct Figures {
    throughput: f64,
    p50_ms: f64,
    p99_ms: f64,
    mean_batch: f64,
    /// Mean of (client latency - the server's x-inference-ms): HTTP, parsing, decoding,
    /// batching window, queueing and encoding. 0 in-process.
    mean_outside_model_ms: f64,
}

fn percentile(sorted_ms: &[f64], p: f64) -> f64 {
    let i = ((sorted_ms.len() as f64 - 1.0) * p).round() as usize;
    sorted_ms[i.min(sorted_ms.len() - 1)]
}

fn figures(
    mut latencies_ms: Vec<f64>,
    wall: Duration,
    mean_batch: f64,
    mean_outside_model_ms: f64,
) -> Figures {
    latencies_ms.sort_by(|a, b| a.total_cmp(b));
    Figures {
        throughput: latencies_ms.len() as f64 / wall.as_secs_f64(),
        p50_ms: percentile(&latencies_ms, 0.5),
        p99_ms: percentile(&latencies_ms, 0.99),
        mean_batch,
        mean_outside_model_ms,
    }
}

fn scene(size: u32, variant: u32) -> RgbImage {
    RgbImage::from_fn(size, size, |x, y| {
        let inside = (x + variant * 3) % size < size / 3 && y > size / 4 && y < size / 2;
        if inside {
            Rgb([230, 40, 40])
        } else {
            Rgb([(x * 255 / size) as u8, (y * 255 / size) as u8, 150])
        }
    })
}

fn in_process(model: &InstructPix2Pix, opts: &Opts, batch: usize, images: &[RgbImage]) -> Figures {
    let batches = opts.requests.div_ceil(batch);
    let run = |seed0: u64| {
        let requests: Vec<EditRequest> = (0..batch)
            .map(|i| EditRequest {
                image: &images[i % images.len()],
                instruction: "make the red bar blue",
                params: EditParams {
                    steps: opts.steps,
                    seed: seed0 + i as u64,
                    // The server captures attention for /attention; do the same work here.
                    capture_attention: true,
                    ..EditParams::default()
                },
                init_latents: None,
            })
            .collect();
        model
            .edit_batch(&requests, &[], &mut |_, _| true)
            .expect("in-process edit");
    };
    run(0); // warm-up
    let mut latencies = Vec::new();
    let started = Instant::now();
    for b in 0..batches {
        let t = Instant::now();
        run(1000 + (b * batch) as u64);
        let ms = t.elapsed().as_secs_f64() * 1e3;
        latencies.extend(std::iter::repeat_n(ms, batch));
    }
    figures(latencies, started.elapsed(), batch as f64, 0.0)
}

async fn over_http(url: &str, opts: &Opts, concurrency: usize, pngs: Arc<Vec<Vec<u8>>>) -> Figures {
    let http = reqwest::Client::new();
    let per_client = opts.requests.div_ceil(concurrency);
    send(
        http.clone(),
        url.to_string(),
        pngs[0].clone(),
        0,
        opts.steps,
    )
    .await; // warm-up
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..concurrency {
        let (http, pngs) = (http.clone(), pngs.clone());
        let (url, steps) = (url.to_string(), opts.steps);
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in 0..per_client {
                let seed = 1000 + (c * per_client + i) as u64;
                out.push(
                    send(
                        http.clone(),
                        url.clone(),
                        pngs[(c + i) % pngs.len()].clone(),
                        seed,
                        steps,
                    )
                    .await,
                );
            }
            out
        }));
    }
    let mut latencies = Vec::new();
    let mut batch_sum = 0.0;
    let mut outside_sum = 0.0;
    for t in tasks {
        for (ms, batch, inference_ms) in t.await.expect("client task") {
            latencies.push(ms);
            batch_sum += batch;
            outside_sum += ms - inference_ms;
        }
    }
    let wall = started.elapsed();
    let n = latencies.len() as f64;
    figures(latencies, wall, batch_sum / n, outside_sum / n)
}

/// One edit over HTTP: (latency in ms, batch size it ran in, server-side inference ms).
async fn send(
    http: reqwest::Client,
    url: String,
    png: Vec<u8>,
    seed: u64,
    steps: usize,
) -> (f64, f64, f64) {
    let form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(png).file_name("in.png"),
        )
        .text("instruction", "make the red bar blue")
        .text("steps", steps.to_string())
        .text("seed", seed.to_string());
    let t = Instant::now();
    let r = http
        .post(format!("{url}/edit"))
        .multipart(form)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 200, "edit failed");
    let header = |name: &str| -> f64 { r.headers()[name].to_str().unwrap().parse().unwrap() };
    let (batch, inference_ms) = (header("x-batch-size"), header("x-inference-ms"));
    r.bytes().await.expect("body");
    (t.elapsed().as_secs_f64() * 1e3, batch, inference_ms)
}

fn main() -> anyhow::Result<()> {
    let opts = Opts::parse();
    let images: Vec<RgbImage> = (0..4).map(|v| scene(opts.size, v)).collect();
    let pngs: Arc<Vec<Vec<u8>>> = Arc::new(
        images
            .iter()
            .map(|img| {
                let mut out = Cursor::new(Vec::new());
                img.write_to(&mut out, image::ImageFormat::Png).unwrap();
                out.into_inner()
            })
            .collect(),
    );
    let max_concurrency = opts.concurrency.iter().copied().max().unwrap_or(1);
    println!(
        "model {} | {}x{} input | {} steps | {} requests per level | max batch {} | max wait {} ms",
        opts.model.display(),
        opts.size,
        opts.size,
        opts.steps,
        opts.requests,
        max_concurrency,
        opts.max_batch_wait_ms
    );

    // The server reads RL4PIX_DEVICE and RL4PIX_DTYPE; the in-process side runs the same.
    let mut args = rl4pix_server::Args::for_model(&opts.model);
    let dtype = match args.dtype.to_ascii_lowercase().as_str() {
        "f16" => candle_core::DType::F16,
        "bf16" => candle_core::DType::BF16,
        _ => candle_core::DType::F32,
    };
    let device = rl4pix_model::device::parse_device(&args.device)?;
    println!("device {} | dtype {:?}", args.device, dtype);
    let model = InstructPix2Pix::load_with_dtype(&opts.model, &device, dtype)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (local, remote) = runtime.block_on(async {
        args.max_batch_size = max_concurrency;
        args.max_batch_wait_ms = opts.max_batch_wait_ms;
        args.max_queue = 4 * max_concurrency;
        let server = rl4pix_server::start(&args).await?;
        let url = server.url();
        let (mut local, mut remote) = (Vec::new(), Vec::new());
        for &c in &opts.concurrency {
            // Alternate the two sides and keep each side's best round: other processes share
            // this machine, and the best round is the least disturbed one.
            let mut best: Option<(Figures, Figures)> = None;
            for _ in 0..opts.rounds {
                let l = tokio::task::block_in_place(|| in_process(&model, &opts, c, &images));
                let h = over_http(&url, &opts, c, pngs.clone()).await;
                best = Some(match best {
                    None => (l, h),
                    Some((bl, bh)) => (
                        if l.throughput > bl.throughput { l } else { bl },
                        if h.throughput > bh.throughput { h } else { bh },
                    ),
                });
            }
            let (l, h) = best.expect("at least one round");
            local.push(l);
            remote.push(h);
        }
        server.shutdown().await?;
        anyhow::Ok((local, remote))
    })?;

    println!();
    println!("| concurrency | HTTP edits/s | HTTP p50 ms | HTTP p99 ms | mean batch | HTTP time outside the model, ms/request | in-process edits/s (batch = concurrency) | in-process p50 ms | throughput overhead |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for ((c, h), l) in opts.concurrency.iter().zip(&remote).zip(&local) {
        println!(
            "| {c} | {:.2} | {:.1} | {:.1} | {:.1} | {:.1} | {:.2} | {:.1} | {:+.1}% |",
            h.throughput,
            h.p50_ms,
            h.p99_ms,
            h.mean_batch,
            h.mean_outside_model_ms,
            l.throughput,
            l.p50_ms,
            (1.0 - h.throughput / l.throughput) * 100.0
        );
    }
    if let (Some(first), Some(last)) = (remote.first(), remote.last()) {
        println!(
            "\nbatching gain over HTTP (concurrency {} vs {}): {:.2}x throughput",
            opts.concurrency.last().unwrap(),
            opts.concurrency[0],
            last.throughput / first.throughput
        );
    }
    Ok(())
}
