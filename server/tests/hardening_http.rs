//! The server under hostile clients and faults, at the connection and HTTP level: timeouts,
//! the connection cap, the shutdown deadline, admission before the body is read, the headers
//! every answer carries, bearer keys, bounded metric labels, error bodies without internals,
//! and what happens when the worker thread dies. Every test starts a real server on the fixture
//! model and talks to it over TCP (raw sockets where a well-behaved client cannot misbehave).

mod common;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use common::*;
use rl4pix_server::backend::{Backend, BackendError, Batch, ItemOutput, ModelBackend};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Reads until the server closes the connection (or `limit` passes: then None).
async fn read_to_close(stream: &mut TcpStream, limit: Duration) -> Option<Vec<u8>> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    let read_all = async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    };
    tokio::time::timeout(limit, read_all).await.ok()?;
    Some(received)
}

/// One raw request on its own connection (`Connection: close`); the whole answer as text.
async fn raw(addr: std::net::SocketAddr, request: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let answer = read_to_close(&mut stream, Duration::from_secs(30))
        .await
        .expect("the server answers and closes");
    String::from_utf8_lossy(&answer).into_owned()
}

/// A request with no body that asks the server to close the connection after answering.
fn closing(method: &str, path: &str, host: &str) -> String {
    format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
}

fn status_of(answer: &str) -> u16 {
    answer
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_sent_request_head_and_an_idle_kept_alive_connection_are_closed_in_time() {
    let server = start_with(|args| args.header_timeout_s = 1.0).await;

    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(b"POST /edit HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let closed = read_to_close(&mut half, Duration::from_secs(15)).await;
    assert!(
        closed.is_some(),
        "a half-sent head still holds its connection after 15 s"
    );
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(700) && waited < Duration::from_secs(6),
        "closed after {waited:?} with --header-timeout-s 1"
    );

    // A kept-alive connection that sends nothing after its answer is closed by the same timer.
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        .await
        .unwrap();
    let answer = read_to_close(&mut idle, Duration::from_secs(15))
        .await
        .expect("an idle kept-alive connection is closed");
    assert_eq!(status_of(&String::from_utf8_lossy(&answer)), 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_slower_than_its_timeout_gets_408() {
    let server = start_with(|args| args.body_timeout_s = 1.0).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(
            b"POST /edit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
              Content-Length: 1000\r\n\r\n{\"instruction\":",
        )
        .await
        .unwrap();
    let started = Instant::now();
    let answer = read_to_close(&mut stream, Duration::from_secs(15))
        .await
        .expect("the server answers a stalled body");
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 408, "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(6));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_refused_at_once_and_a_freed_slot_is_reused() {
    let server = start_with(|args| {
        args.max_connections = 2;
        args.header_timeout_s = 60.0;
    })
    .await;
    let first = TcpStream::connect(server.addr).await.unwrap();
    let _second = TcpStream::connect(server.addr).await.unwrap();
    // Both are accepted before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let over = raw(server.addr, &closing("GET", "/health", "127.0.0.1")).await;
    assert!(
        over.is_empty() || status_of(&over) == 503,
        "over the cap: {over:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5), "refused fast");
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = raw(server.addr, &closing("GET", "/health", "127.0.0.1")).await;
        if !answer.is_empty() && status_of(&answer) == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slot is not reused");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_within_its_deadline_with_a_half_open_client_connected() {
    let server = start_with(|args| {
        args.header_timeout_s = 120.0;
        args.shutdown_deadline_s = 1.0;
    })
    .await;
    let mut half = TcpStream::connect(server.addr).await.unwrap();
    half.write_all(b"POST /edit HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(20), server.shutdown())
        .await
        .expect("shutdown waits on the half-open client past 20 s")
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    assert!(
        read_to_close(&mut half, Duration::from_secs(5))
            .await
            .is_some(),
        "the client's connection was dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_admission_permit_a_20_mib_body_is_refused_unread() {
    let server = start_with(|args| {
        // Permits: the queue (1) and a running batch (1).
        args.max_queue = 1;
        args.max_batch_size = 1;
    })
    .await;
    let length = 20 * 1024 * 1024;
    let head = format!(
        "POST /edit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    );
    // Two slow uploads hold both permits.
    let mut holders = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(server.addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(b"{\"instruction\":\"").await.unwrap();
        holders.push(s);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The third sends its head only: an answer can come only from a refusal without reading.
    let mut third = TcpStream::connect(server.addr).await.unwrap();
    third.write_all(head.as_bytes()).await.unwrap();
    let answer = read_to_close(&mut third, Duration::from_secs(10))
        .await
        .expect("refused at once, without waiting for 20 MiB");
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 429, "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("retry-after:"),
        "{answer}"
    );
    drop(holders);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edit_deadline_counts_from_the_request_head_not_from_the_decoded_body() {
    let server = start_with(|args| args.request_timeout_s = 1.5).await;
    let body = serde_json::json!({
        "image": base64_png(&scene(24, 24, 1)),
        "instruction": "make it red",
        "steps": 1,
    })
    .to_string();
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    let head = format!(
        "POST /edit HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).await.unwrap();
    stream.write_all(&body.as_bytes()[..10]).await.unwrap();
    // The body takes longer than the whole request may.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    stream.write_all(&body.as_bytes()[10..]).await.unwrap();
    let answer = read_to_close(&mut stream, Duration::from_secs(30))
        .await
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert_eq!(status_of(&answer), 504, "{answer}");
    server.shutdown().await.unwrap();
}

fn base64_png(image: &image::RgbImage) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(png(image))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_answer_says_nosniff_and_user_images_are_never_stored() {
    let TestServer { server, url, http } = TestServer::start(|_| {}).await;
    for path in ["/health", "/info", "/nowhere", "/jobs/unknown"] {
        let r = get(&http, &format!("{url}{path}")).await;
        assert_eq!(header(&r, "x-content-type-options"), "nosniff", "{path}");
    }
    let edited = post_edit(
        &http,
        &url,
        edit_form(png(&scene(24, 24, 2)), "make it red", &[]),
    )
    .await;
    assert_eq!(edited.status(), 200);
    assert_eq!(header(&edited, "cache-control"), "no-store");
    assert_eq!(header(&edited, "x-content-type-options"), "nosniff");
    let edit_id = header(&edited, "x-edit-id").to_string();
    let overlay = get(&http, &format!("{url}/attention/{edit_id}")).await;
    assert_eq!(overlay.status(), 200);
    assert_eq!(header(&overlay, "cache-control"), "no-store");

    let accepted = post_edit_async(
        &http,
        &url,
        edit_form(png(&scene(24, 24, 3)), "make it blue", &[]),
    )
    .await;
    assert_eq!(accepted.status(), 202);
    let job: serde_json::Value = accepted.json().await.unwrap();
    let result_url = format!("{url}{}", job["result_url"].as_str().unwrap());
    let started = Instant::now();
    let result = loop {
        let r = get(&http, &result_url).await;
        if r.status() == 200 {
            break r;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "job not done");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(header(&result, "cache-control"), "no-store");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_server_answers_only_loopback_host_names() {
    let server = start_with(|_| {}).await;
    let health_at = |host: &str| closing("GET", "/health", host);
    for ok in ["localhost:8080", "127.0.0.1", "[::1]:1"] {
        assert_eq!(
            status_of(&raw(server.addr, &health_at(ok)).await),
            200,
            "{ok}"
        );
    }
    // What a page on another site reaches after rebinding its name to 127.0.0.1.
    let rebound = raw(server.addr, &health_at("attacker.example:8080")).await;
    assert_eq!(status_of(&rebound), 421, "{rebound}");
    server.shutdown().await.unwrap();

    let server = start_with(|args| args.allowed_hosts = Some(vec!["edit.example".into()])).await;
    assert_eq!(
        status_of(&raw(server.addr, &health_at("edit.example:443")).await),
        200
    );
    assert_eq!(
        status_of(&raw(server.addr, &health_at("localhost")).await),
        421
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_keys_any_scheme_case_a_challenge_on_401_and_no_empty_key() {
    let TestServer { server, url, http } = TestServer::start(|args| {
        args.api_key = Some(ADMIN_KEY.into());
        args.openai_api_key = Some("open-sesame".into());
    })
    .await;
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let r = send(
            http.put(format!("{url}/adapters/default"))
                .header("authorization", format!("{scheme} {ADMIN_KEY}"))
                .json(&serde_json::json!({"name": null})),
        )
        .await;
        assert_ne!(r.status(), 401, "{scheme}");
        let r = send(
            http.get(format!("{url}/v1/models"))
                .header("authorization", format!("{scheme} open-sesame")),
        )
        .await;
        assert_eq!(r.status(), 200, "{scheme}");
    }
    for wrong in ["", "sesam", "sesame-and-more"] {
        let r = send(
            http.put(format!("{url}/adapters/default"))
                .header("authorization", format!("Bearer {wrong}"))
                .json(&serde_json::json!({"name": null})),
        )
        .await;
        assert_eq!(r.status(), 401, "{wrong:?}");
        assert!(header(&r, "www-authenticate").starts_with("Bearer"));
    }
    let r = get(&http, &format!("{url}/v1/models")).await;
    assert_eq!(r.status(), 401);
    assert!(header(&r, "www-authenticate").starts_with("Bearer"));
    server.shutdown().await.unwrap();

    for (admin, openai) in [(Some(""), None), (None, Some("  "))] {
        let mut args = test_args();
        args.api_key = admin.map(String::from);
        args.openai_api_key = openai.map(String::from);
        let refused = rl4pix_server::start(&args)
            .await
            .err()
            .expect("an empty key is a configuration error");
        assert!(refused.to_string().contains("empty"), "{refused}");
    }
}

fn request_series(metrics: &str) -> Vec<String> {
    metrics
        .lines()
        .filter(|l| l.starts_with("rl4pix_http_requests_total{"))
        .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invented_methods_add_no_metric_series_and_405s_are_counted() {
    let TestServer { server, url, http } = TestServer::start(|_| {}).await;
    // One of each kind first, so the series they need exist.
    for path in ["/nowhere", "/health", "/jobs/x"] {
        let _ = raw(server.addr, &closing("INVENTED0", path, "127.0.0.1")).await;
    }
    let _ = metrics(&http, &url).await;
    let before = request_series(&metrics(&http, &url).await);
    for i in 1..=50 {
        for path in ["/nowhere", "/health", "/jobs/x"] {
            let answer = raw(server.addr, &closing(&format!("M{i}X"), path, "127.0.0.1")).await;
            assert!(status_of(&answer) >= 400, "{answer}");
        }
    }
    let after_text = metrics(&http, &url).await;
    let after = request_series(&after_text);
    let new: Vec<_> = after.iter().filter(|s| !before.contains(s)).collect();
    assert!(
        new.is_empty(),
        "150 requests with invented methods added series {new:?}"
    );
    assert!(!after_text.contains("M7X"), "a raw method became a label");
    // A known method on a route without it: counted, under the route's template.
    let r = delete(&http, &format!("{url}/health")).await;
    assert_eq!(r.status(), 405);
    let text = metrics(&http, &url).await;
    assert!(
        text.lines().any(|l| l.starts_with(
            "rl4pix_http_requests_total{method=\"DELETE\",route=\"/health\",status=\"405\"}"
        )),
        "{text}"
    );
    server.shutdown().await.unwrap();
}

/// The real model, with a fault switch: an instruction containing `PANIC` makes the batch
/// panic with a message full of internals (as a bug deep in a library might).
struct PanicOnDemand(ModelBackend);

impl Backend for PanicOnDemand {
    fn info(&self) -> rl4pix_server::backend::BackendInfo {
        self.0.info()
    }

    fn run_batch(
        &self,
        batch: &Batch,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<ItemOutput>, BackendError> {
        if batch.items.iter().any(|i| i.instruction.contains("PANIC")) {
            panic!("index out of bounds in /srv/secret/models/unet.safetensors");
        }
        self.0.run_batch(batch, on_step)
    }
}

/// Everything the server logs in this test binary, from the first call on.
fn captured_log() -> Arc<Mutex<Vec<u8>>> {
    static LOG: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let log = Arc::new(Mutex::new(Vec::new()));
        let sink = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || SharedWriter(sink.clone()))
            .finish();
        tracing::subscriber::set_global_default(subscriber).expect("one subscriber");
        log
    })
    .clone()
}

struct SharedWriter(Arc<Mutex<Vec<u8>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn error_bodies_and_logs_keep_internals_and_job_ids_to_the_server() {
    let log = captured_log();
    let args = test_args();
    let model = fixture_model();
    let server = rl4pix_server::start_with_backend(&args, move || {
        ModelBackend::load(&model, "cpu", "f32", true).map(PanicOnDemand)
    })
    .await
    .unwrap();
    let http = client();
    let url = server.url();
    let root = repo_root().canonicalize().unwrap();

    let r = post_edit(
        &http,
        &url,
        edit_form(png(&scene(24, 24, 4)), "PANIC now", &[]),
    )
    .await;
    assert_eq!(r.status(), 500);
    let body = r.text().await.unwrap();
    assert!(!body.contains("/srv/secret"), "{body}");
    assert!(!body.contains("out of bounds"), "{body}");
    let error_id = body
        .split("error id ")
        .nth(1)
        .map(|rest| rest.chars().take(16).collect::<String>())
        .unwrap_or_else(|| panic!("no error id in {body}"));
    let logged = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(
        logged.contains(&error_id) && logged.contains("/srv/secret"),
        "the details are logged with the id"
    );

    let info = get(&http, &format!("{url}/info")).await;
    let info = info.text().await.unwrap();
    assert!(!info.contains("model_dir"), "{info}");
    assert!(!info.contains(&*root.to_string_lossy()), "{info}");
    assert!(!info.contains("/work/"), "{info}");

    // An async job, cancelled while queued: its id must not reach the log.
    let hold = &server.service.faults().hold;
    hold.store(true, std::sync::atomic::Ordering::SeqCst);
    let accepted: serde_json::Value = post_edit_async(
        &http,
        &url,
        edit_form(png(&scene(24, 24, 5)), "make it red", &[]),
    )
    .await
    .json()
    .await
    .unwrap();
    let id = accepted["id"].as_str().unwrap().to_string();
    let r = delete(&http, &format!("{url}/jobs/{id}")).await;
    assert_eq!(r.status(), 200);
    let logged = String::from_utf8_lossy(&log.lock().unwrap()).into_owned();
    assert!(logged.contains("job cancelled"), "the cancel is logged");
    assert!(!logged.contains(&id), "a job id reached the log");
    hold.store(false, std::sync::atomic::Ordering::SeqCst);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_worker_dies_every_waiting_edit_fails_at_once_and_health_turns_red() {
    let TestServer { server, url, http } =
        TestServer::start(|args| args.request_timeout_s = 120.0).await;
    let faults = server.service.faults();
    faults.hold.store(true, std::sync::atomic::Ordering::SeqCst);

    let mut job_ids = Vec::new();
    for variant in 0..2 {
        let accepted: serde_json::Value = post_edit_async(
            &http,
            &url,
            edit_form(png(&scene(24, 24, variant)), "make it red", &[]),
        )
        .await
        .json()
        .await
        .unwrap();
        job_ids.push(accepted["id"].as_str().unwrap().to_string());
    }
    let mut waiting = Vec::new();
    for variant in 2..4 {
        let http = http.clone();
        let url = url.clone();
        waiting.push(tokio::spawn(async move {
            let r = post_edit(
                &http,
                &url,
                edit_form(png(&scene(24, 24, variant)), "make it red", &[]),
            )
            .await;
            let status = r.status().as_u16();
            (status, r.text().await.unwrap())
        }));
    }
    let started = Instant::now();
    while get_json(&http, &format!("{url}/info")).await["queue_depth"] != 4 {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "4 edits queued"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&http, &format!("{url}/health")).await.status(), 200);

    faults.kill.store(true, std::sync::atomic::Ordering::SeqCst);
    let killed = Instant::now();
    for task in waiting {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("worker stopped"), "{body}");
    }
    assert!(
        killed.elapsed() < Duration::from_secs(10),
        "the waiting edits heard after {:?}",
        killed.elapsed()
    );
    for id in &job_ids {
        let status = get_json(&http, &format!("{url}/jobs/{id}")).await;
        assert_eq!(status["status"], "failed", "{status}");
        assert!(status.to_string().contains("worker stopped"), "{status}");
    }
    assert_eq!(get(&http, &format!("{url}/health")).await.status(), 503);
    assert_eq!(get(&http, &format!("{url}/ready")).await.status(), 503);
    let refused = post_edit(
        &http,
        &url,
        edit_form(png(&scene(24, 24, 9)), "make it red", &[]),
    )
    .await;
    assert_eq!(refused.status(), 503);
    // The worker is gone: shutting down must not wait for it (it was joined already).
    let _ = server.shutdown().await;
}

#[test]
fn the_model_backend_health_check_runs_on_its_device() {
    let backend = ModelBackend::load(&fixture_model(), "cpu", "f32", false).unwrap();
    backend.health().expect("a working CPU device passes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_naming_a_refused_adapter_is_not_told_paths_or_link_targets() {
    let folder = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let target = outside.path().join("private-weights.safetensors");
    std::fs::copy(fixture_adapter(), &target).unwrap();
    std::os::unix::fs::symlink(&target, folder.path().join("sneaky.safetensors")).unwrap();
    let server = start_with(|args| args.adapters = Some(folder.path().to_path_buf())).await;
    let r = post_edit(
        &client(),
        &server.url(),
        edit_form(
            png(&scene(24, 24, 6)),
            "make it red",
            &[("adapter", "sneaky".into())],
        ),
    )
    .await;
    assert_eq!(r.status(), 404);
    let body = r.text().await.unwrap();
    assert!(body.contains("was refused"), "{body}");
    for secret in [
        "private-weights",
        &*outside.path().to_string_lossy(),
        &*folder.path().to_string_lossy(),
    ] {
        assert!(!body.contains(secret), "{secret} in {body}");
    }
    server.shutdown().await.unwrap();
}
