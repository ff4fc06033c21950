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

/// [`test_args`] adjusted by `adjust`.
pub fn args_with(adjust: impl FnOnce(&mut Args)) -> Args {
    let mut args = test_args();
    adjust(&mut args);
    args
}

/// A server on [`test_args`] adjusted by `adjust`.
pub async fn start_with(adjust: impl FnOnce(&mut Args)) -> RunningServer {
    start(args_with(adjust)).await
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

/// An in-process server with its base URL and a client for it; destructure it to keep the
/// three names tests use (`let TestServer { server, url, http } = ...`).
pub struct TestServer {
    pub server: RunningServer,
    pub url: String,
    pub http: reqwest::Client,
}

impl TestServer {
    /// [`test_args`] adjusted by `adjust`.
    pub async fn start(adjust: impl FnOnce(&mut Args)) -> Self {
        Self::with_args(args_with(adjust)).await
    }

    pub async fn with_args(args: Args) -> Self {
        let server = start(args).await;
        let url = server.url();
        Self {
            server,
            url,
            http: client(),
        }
    }
}

/// Sends a request; panics when no answer comes.
pub async fn send(request: reqwest::RequestBuilder) -> reqwest::Response {
    request.send().await.unwrap()
}

/// A header's value; panics when it is missing.
pub fn header<'a>(r: &'a reqwest::Response, name: &str) -> &'a str {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_else(|| panic!("missing header {name}"))
}

/// A header's value, or "" when it is missing.
pub fn header_or_empty(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

/// `POST {url}/edit` with a form.
pub async fn post_edit(
    http: &reqwest::Client,
    url: &str,
    form: reqwest::multipart::Form,
) -> reqwest::Response {
    send(http.post(format!("{url}/edit")).multipart(form)).await
}

/// `POST {url}/edit` with a form and `Prefer: respond-async`.
pub async fn post_edit_async(
    http: &reqwest::Client,
    url: &str,
    form: reqwest::multipart::Form,
) -> reqwest::Response {
    send(
        http.post(format!("{url}/edit"))
            .header("prefer", "respond-async")
            .multipart(form),
    )
    .await
}

/// A GET of a full address.
pub async fn get(http: &reqwest::Client, address: &str) -> reqwest::Response {
    send(http.get(address)).await
}

/// A DELETE of a full address.
pub async fn delete(http: &reqwest::Client, address: &str) -> reqwest::Response {
    send(http.delete(address)).await
}

/// The text of `GET {url}/metrics`.
pub async fn metrics(http: &reqwest::Client, url: &str) -> String {
    get(http, &format!("{url}/metrics"))
        .await
        .text()
        .await
        .unwrap()
}

/// `GET {url}/jobs/{id}`: checks the 200 and returns the status JSON.
pub async fn job_status(http: &reqwest::Client, url: &str, id: &str) -> serde_json::Value {
    let r = get(http, &format!("{url}/jobs/{id}")).await;
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

/// Polls the job until `done(status)` holds; panics after `limit`.
pub async fn wait_for_job(
    http: &reqwest::Client,
    url: &str,
    id: &str,
    limit: Duration,
    what: &str,
    done: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let started = Instant::now();
    loop {
        let s = job_status(http, url, id).await;
        if done(&s) {
            return s;
        }
        assert!(
            started.elapsed() < limit,
            "job {id}: not {what} within {limit:?}; last status {s}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Polls the job until its status is `status`; panics after `limit`.
pub async fn wait_for_status(
    http: &reqwest::Client,
    url: &str,
    id: &str,
    status: &str,
    limit: Duration,
) -> serde_json::Value {
    wait_for_job(http, url, id, limit, status, is(status)).await
}

/// A job-status predicate: the status is `status`.
pub fn is(status: &str) -> impl Fn(&serde_json::Value) -> bool + '_ {
    move |s: &serde_json::Value| s["status"] == status
}

pub fn edit_form(
    image_png: Vec<u8>,
    instruction: &str,
    fields: &[(&str, String)],
) -> reqwest::multipart::Form {
    with_fields(
        image_form(image_png, ("in.png", "image/png"), instruction),
        fields,
    )
}

/// A form with the `image` part (named and typed by `(file_name, mime)`) and `instruction`.
pub fn image_form(
    bytes: Vec<u8>,
    (file_name, mime): (&str, &str),
    instruction: &str,
) -> reqwest::multipart::Form {
    let image = reqwest::multipart::Part::bytes(bytes)
        .file_name(file_name.to_string())
        .mime_str(mime)
        .unwrap();
    reqwest::multipart::Form::new()
        .part("image", image)
        .text("instruction", instruction.to_string())
}

/// `form` with `fields` added as text parts, in order.
pub fn with_fields(
    mut form: reqwest::multipart::Form,
    fields: &[(&str, String)],
) -> reqwest::multipart::Form {
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
    let content_type = header_or_empty(&response, "content-type");
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
    let r = send(http.get(format!("{url}/adapters")).bearer_auth(ADMIN_KEY)).await;
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
    send_json(http.get(url)).await
}

/// The arguments the adapter tests start with: `dir` as the adapters folder, [`ADMIN_KEY`],
/// a short debounce and a deep queue.
pub fn adapter_server_args(dir: &std::path::Path) -> Args {
    let mut args = test_args();
    args.adapters = Some(dir.to_path_buf());
    args.api_key = Some(ADMIN_KEY.into());
    args.adapter_debounce_ms = 50;
    args.max_queue = 256;
    args
}

/// `DELETE {url}/adapters/{name}` with the bearer `key`.
pub async fn delete_adapter(
    http: &reqwest::Client,
    url: &str,
    key: &str,
    name: &str,
) -> reqwest::Response {
    send(
        http.delete(format!("{url}/adapters/{name}"))
            .bearer_auth(key),
    )
    .await
}

/// `POST {url}/adapters` with the bearer `key`; the body is the caller's.
pub fn post_adapters(http: &reqwest::Client, url: &str, key: &str) -> reqwest::RequestBuilder {
    http.post(format!("{url}/adapters")).bearer_auth(key)
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

/// The fixture model in-process, the fixture LoRA, and the one edit the adapter tests send:
/// what the images they are served are compared with.
pub struct Reference {
    pub model: rl4pix_model::pipeline::InstructPix2Pix,
    pub lora: rl4pix_model::adapter::LoraAdapter,
    pub input: RgbImage,
    pub instruction: &'static str,
    pub steps_seed: (usize, u64),
}

impl Reference {
    pub fn load(input: RgbImage, instruction: &'static str, steps_seed: (usize, u64)) -> Self {
        let device = candle_core::Device::Cpu;
        let model =
            rl4pix_model::pipeline::InstructPix2Pix::load(&fixture_model(), &device).unwrap();
        let lora = rl4pix_model::adapter::LoraAdapter::load(
            &fixture_adapter(),
            &model.lora_targets(),
            &device,
        )
        .expect("the fixture LoRA fits the fixture model");
        Self {
            model,
            lora,
            input,
            instruction,
            steps_seed,
        }
    }

    /// The fixture LoRA with its B matrices scaled by `scale` and stamped `created`: a
    /// distinct version.
    pub fn scaled(&self, scale: f64, created: &str) -> rl4pix_model::adapter::LoraAdapter {
        let mut adapter = self.lora.clone();
        adapter.metadata.created = Some(created.to_string());
        for layer in adapter.layers.values_mut() {
            layer.up = (&layer.up * scale).unwrap();
        }
        adapter
    }

    /// What the server must answer for this adapter (None: the base), run alone.
    pub fn expected(&self, adapter: Option<&rl4pix_model::adapter::LoraAdapter>) -> RgbImage {
        direct_edit(
            &self.model,
            &self.input,
            self.instruction,
            self.steps_seed,
            adapter,
        )
    }
}

/// The `status` of each of `names` in a `GET /adapters` listing.
pub fn adapter_statuses(listed: &[serde_json::Value], names: &[&str]) -> Vec<String> {
    names
        .iter()
        .map(|n| {
            adapter_entry(listed, n).unwrap()["status"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect()
}

/// Sends a request whose answer is JSON.
pub async fn send_json(request: reqwest::RequestBuilder) -> serde_json::Value {
    request.send().await.unwrap().json().await.unwrap()
}
