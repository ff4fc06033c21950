//! Helpers for the server's end-to-end tests: the fixture model, test images, and servers on
//! ephemeral loopback ports (in-process, or the real binary).

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Cursor};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use image::{Rgb, RgbImage};
use rl4pix_server::{Args, RunningServer};

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The tiny diffusers-built InstructPix2Pix fixture (latents are half the image size).
pub fn fixture_model() -> PathBuf {
    repo_root().join("tests/fixtures/pipelines/sd1")
}

pub fn fixture_adapter() -> PathBuf {
    repo_root().join("tests/fixtures/pipelines/sd1.lora.safetensors")
}

/// A small scene: a graded background and a coloured square whose place depends on `variant`.
pub fn scene(width: u32, height: u32, variant: u32) -> RgbImage {
    let (sx, sy) = (
        3 + (variant * 7) % (width - 10),
        2 + (variant * 5) % (height - 8),
    );
    RgbImage::from_fn(width, height, |x, y| {
        if (sx..sx + 8).contains(&x) && (sy..sy + 6).contains(&y) {
            Rgb([220, (40 * variant % 255) as u8, 30])
        } else {
            Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, 160])
        }
    })
}

pub fn png(img: &RgbImage) -> Vec<u8> {
    let mut out = Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn decode_png(bytes: &[u8]) -> RgbImage {
    image::load_from_memory_with_format(bytes, image::ImageFormat::Png)
        .expect("a PNG")
        .to_rgb8()
}

/// Defaults for tests: fixture model, free port, a short batching window.
pub fn test_args() -> Args {
    let mut args = Args::for_model(fixture_model());
    args.default_steps = 4;
    args.max_batch_wait_ms = 2;
    args.request_timeout_s = 60.0;
    args
}

pub async fn start(args: Args) -> RunningServer {
    rl4pix_server::start(&args)
        .await
        .expect("the server starts on the fixture model")
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

pub fn edit_form(
    image_png: Vec<u8>,
    instruction: &str,
    fields: &[(&str, String)],
) -> reqwest::multipart::Form {
    let mut form = reqwest::multipart::Form::new()
        .part(
            "image",
            reqwest::multipart::Part::bytes(image_png)
                .file_name("in.png")
                .mime_str("image/png")
                .unwrap(),
        )
        .text("instruction", instruction.to_string());
    for (name, value) in fields {
        form = form.text(name.to_string(), value.clone());
    }
    form
}

/// A PNG whose header claims `width x height` but holds almost no data.
pub fn png_claiming(width: u32, height: u32) -> Vec<u8> {
    let mut out = vec![0x89, b'P', b'N', b'G', 0x0D, 0x0A, 0x1A, 0x0A];
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}

fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let mut crc_input = kind.to_vec();
    crc_input.extend_from_slice(data);
    out.extend_from_slice(&crc_input);
    out.extend_from_slice(&crc32(&crc_input).to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xFFFF_FFFFu32;
    for &b in bytes {
        crc ^= b as u32;
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// The `rl4pix-server` binary on an ephemeral port; killed on drop if still running.
pub struct BinaryServer {
    pub child: Child,
    pub url: String,
}

impl BinaryServer {
    pub fn spawn(extra: &[&str]) -> Self {
        let model = fixture_model();
        let mut args = vec!["--model", model.to_str().unwrap()];
        args.extend_from_slice(extra);
        Self::spawn_in(&std::env::current_dir().unwrap(), &args)
    }

    /// The binary with `--port 0` and exactly `args`, run from `cwd`, with no `RL4PIX_*`
    /// settings inherited from the environment.
    pub fn spawn_in(cwd: &std::path::Path, args: &[&str]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_rl4pix-server"));
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("RL4PIX_") {
                command.env_remove(key);
            }
        }
        let mut child = command
            .current_dir(cwd)
            .args(["--port", "0"])
            .args(args)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("the binary starts");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("rl4pix-server listening on ") {
                    let _ = tx.send(url.to_string());
                }
            }
        });
        let url = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(url) => url,
            Err(_) => {
                let _ = child.kill();
                panic!("the server did not print its address within 60 s");
            }
        };
        Self { child, url }
    }

    /// Sends SIGTERM (graceful shutdown).
    pub fn terminate(&self) {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Asserts the JSON error shape and returns `error_type`.
pub async fn error_type(response: reqwest::Response, status: u16) -> String {
    assert_eq!(response.status().as_u16(), status, "unexpected status");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    assert!(
        content_type.starts_with("application/json"),
        "{content_type}"
    );
    let body: serde_json::Value = response.json().await.unwrap();
    assert!(
        body["error"].as_str().is_some_and(|s| !s.is_empty()),
        "{body}"
    );
    body["error_type"].as_str().unwrap().to_string()
}

/// The admin key the adapter tests start their servers with.
pub const ADMIN_KEY: &str = "sesame";

/// `GET /adapters` with the admin key.
pub async fn list_adapters(http: &reqwest::Client, url: &str) -> Vec<serde_json::Value> {
    let r = http
        .get(format!("{url}/adapters"))
        .bearer_auth(ADMIN_KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

pub fn adapter_entry<'a>(
    listed: &'a [serde_json::Value],
    name: &str,
) -> Option<&'a serde_json::Value> {
    listed.iter().find(|e| e["name"] == name)
}

/// Polls `GET /adapters` until `done` holds (the watcher works in the background).
pub async fn wait_for_adapters(
    http: &reqwest::Client,
    url: &str,
    what: &str,
    done: impl Fn(&[serde_json::Value]) -> bool,
) -> Vec<serde_json::Value> {
    let started = Instant::now();
    loop {
        let listed = list_adapters(http, url).await;
        if done(&listed) {
            return listed;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "timed out waiting for {what}; GET /adapters: {listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A GET whose answer is JSON.
pub async fn get_json(http: &reqwest::Client, url: &str) -> serde_json::Value {
    http.get(url).send().await.unwrap().json().await.unwrap()
}

/// What the model answers for one request run alone in-process (None: the base), seeded like
/// the server's: the reference the HTTP answers are compared with.
pub fn direct_edit(
    model: &rl4pix_model::pipeline::InstructPix2Pix,
    input: &RgbImage,
    instruction: &str,
    (steps, seed): (usize, u64),
    adapter: Option<&rl4pix_model::adapter::LoraAdapter>,
) -> RgbImage {
    let adapters: Vec<_> = adapter
        .map(|a| std::sync::Arc::new(model.resolve_adapter(a).unwrap()))
        .into_iter()
        .collect();
    let request = rl4pix_model::pipeline::EditRequest {
        image: input,
        instruction,
        params: rl4pix_model::pipeline::EditParams {
            steps,
            seed,
            ..Default::default()
        },
        init_latents: None,
    };
    model
        .edit_batch(&[request], &adapters, &mut |_, _| true)
        .unwrap()
        .remove(0)
        .image
}
