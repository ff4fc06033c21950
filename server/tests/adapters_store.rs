//! `--adapters s3://...` against a real S3-compatible server (moto in server mode, started
//! here on loopback), and `--adapters file:///...`: publish, replace, refuse, survive an outage
//! of the store, remove.
//!
//! moto comes from PyPI (`pip install 'moto[server]==5.2.1'`). Without it the S3 test says so and
//! passes on a developer's machine, and fails under CI (`CI` set), where it must be installed.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload};
use rl4pix_model::adapter::LoraAdapter;
use serde_json::Value;
use tokio::sync::watch;

const KEY: &str = common::ADMIN_KEY;
const BUCKET: &str = "rl4pix-adapters";
const INSTRUCTION: &str = "make the red square blue";
const STEPS: usize = 2;
const SEED: u64 = 11;
const POLL_S: f64 = 0.2;

/// A moto S3 server on a loopback port; killed when dropped.
struct Moto {
    child: Child,
    port: u16,
}

impl Moto {
    /// None when `moto_server` is not installed (or cannot start).
    fn start(port: u16) -> Option<Self> {
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        let mut moto = Self { child, port };
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(30) {
            if let Ok(Some(_)) = moto.child.try_wait() {
                return None;
            }
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Some(moto);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        None
    }

    fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        self.stop();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A TCP relay on loopback to `target`; while closed (false) it drops new and open
/// connections, counting the ones it drops.
async fn gate_to(target: u16) -> (watch::Sender<bool>, Arc<AtomicUsize>, u16) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let (gate, open) = watch::channel(true);
    let refused = Arc::new(AtomicUsize::new(0));
    let counter = refused.clone();
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = listener.accept().await {
            if !*open.borrow() {
                counter.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            let mut open = open.clone();
            tokio::spawn(async move {
                let Ok(mut outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                else {
                    return;
                };
                tokio::select! {
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                    _ = open.wait_for(|open| !*open) => {}
                }
            });
        }
    });
    (gate, refused, port)
}

fn moto_or_skip() -> Option<Moto> {
    if let Some(moto) = Moto::start(free_port()) {
        return Some(moto);
    }
    let help = "moto_server is not installed: pip install 'moto[server]==5.2.1'";
    if std::env::var_os("CI").is_some() {
        panic!("{help} (CI must install it; see .ci/run)");
    }
    eprintln!("SKIPPED the S3 adapters test: {help}");
    None
}

async fn create_bucket(http: &reqwest::Client, endpoint: &str) {
    let r = send(http.put(format!("{endpoint}/{BUCKET}"))).await;
    assert!(r.status().is_success(), "create bucket: {}", r.status());
}

fn load_reference() -> Reference {
    Reference::load(scene(40, 24, 2), INSTRUCTION, (STEPS, SEED))
}

/// A scaled fixture LoRA (told apart by its `created` stamp) and its file's bytes.
fn version_bytes(reference: &Reference, scale: f64, created: &str) -> (LoraAdapter, Vec<u8>) {
    let adapter = reference.scaled(scale, created);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v.safetensors");
    adapter.save(&path).unwrap();
    (adapter, std::fs::read(&path).unwrap())
}

async fn edit(http: &reqwest::Client, url: &str, adapter: &str) -> (u16, Vec<u8>) {
    let fields = vec![
        ("seed", SEED.to_string()),
        ("steps", STEPS.to_string()),
        ("adapter", adapter.to_string()),
    ];
    let r = post_edit(
        http,
        url,
        edit_form(png(&scene(40, 24, 2)), INSTRUCTION, &fields),
    )
    .await;
    let status = r.status().as_u16();
    (status, r.bytes().await.unwrap().to_vec())
}

fn created_is(listed: &[Value], name: &str, created: &str) -> bool {
    adapter_entry(listed, name).is_some_and(|e| e["created"] == created && e["status"] == "loaded")
}

fn server_args(adapters: &str, max_adapter_bytes: u64) -> rl4pix_server::Args {
    let mut args = test_args();
    args.adapters = Some(adapters.into());
    args.adapter_poll_s = POLL_S;
    args.api_key = Some(KEY.into());
    args.max_adapter_bytes = max_adapter_bytes;
    args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapters_published_to_s3_are_validated_swapped_and_removed_like_files() {
    let Some(mut moto) = moto_or_skip() else {
        return;
    };
    let http = client();
    create_bucket(&http, &moto.endpoint()).await;
    // The server reaches moto through a gate this test can close (an outage of the store).
    let (gate, refused, gate_port) = gate_to(moto.port).await;
    // The server and this test both reach the store through the usual AWS variables.
    std::env::set_var("AWS_ENDPOINT", format!("http://127.0.0.1:{gate_port}"));
    std::env::set_var("AWS_ALLOW_HTTP", "true");
    std::env::set_var("AWS_ACCESS_KEY_ID", "test");
    std::env::set_var("AWS_SECRET_ACCESS_KEY", "test");
    std::env::set_var("AWS_REGION", "us-east-1");
    let (store, prefix) =
        rl4pix_server::adapter_store::open_store(&format!("s3://{BUCKET}/prod")).unwrap();
    assert_eq!(prefix.as_ref(), "prod");
    let key = |name: &str| StorePath::from(format!("prod/{name}.safetensors"));
    let put = |name: &str, bytes: Vec<u8>| {
        let store = store.clone();
        let key = key(name);
        async move { store.put(&key, PutPayload::from(bytes)).await.unwrap() }
    };

    let reference = load_reference();
    let (v1, v1_bytes) = version_bytes(&reference, 1.0, "v1");
    let (v2, v2_bytes) = version_bytes(&reference, 2.5, "v2");
    let limit = 4 * v1_bytes.len() as u64;
    put("style", v1_bytes.clone()).await;
    put("broken", b"not a safetensors file".to_vec()).await;
    put("huge", vec![0u8; limit as usize + 1]).await;
    // Not adapters: another extension, and a deeper prefix.
    put("notes", b"x".to_vec()).await;
    store
        .put(
            &StorePath::from("prod/notes.txt"),
            PutPayload::from_static(b"x"),
        )
        .await
        .unwrap();
    store
        .put(
            &StorePath::from("prod/old/style.safetensors"),
            PutPayload::from(v2_bytes.clone()),
        )
        .await
        .unwrap();
    store.delete(&key("notes")).await.unwrap();

    let server = start(server_args(&format!("s3://{BUCKET}/prod"), limit)).await;
    let url = server.url();

    // Copied before /ready: no waiting for the first poll.
    let listed = list_adapters(&http, &url).await;
    assert!(created_is(&listed, "style", "v1"), "{listed:?}");
    let broken = adapter_entry(&listed, "broken").expect("refused, and listed with its reason");
    assert_eq!(broken["status"], "refused");
    let huge = adapter_entry(&listed, "huge").expect("refused by size");
    assert_eq!(huge["status"], "refused");
    assert!(
        huge["error"].as_str().unwrap().contains("not downloaded"),
        "{huge:?}"
    );
    assert_eq!(
        listed.len(),
        3,
        "only direct *.safetensors objects: {listed:?}"
    );
    let (status, body) = edit(&http, &url, "style").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    assert_eq!(decode_png(&body), reference.expected(Some(&v1)));
    // Publishing goes through the store: this replica's admin routes do not write its cache.
    let upload = send(
        post_adapters(&http, &url, KEY)
            .json(&serde_json::json!({"name": "other", "path": "style.safetensors"})),
    )
    .await;
    assert_eq!(error_type(upload, 409).await, "adapters_in_object_store");
    let delete = delete_adapter(&http, &url, KEY, "style").await;
    assert_eq!(error_type(delete, 409).await, "adapters_in_object_store");

    // Published once: replaced in the store, swapped in by the next poll.
    let generation_v1 = adapter_entry(&listed, "style").unwrap()["generation"]
        .as_u64()
        .unwrap();
    put("style", v2_bytes.clone()).await;
    let listed =
        wait_for_adapters(&http, &url, "v2 of style", |l| created_is(l, "style", "v2")).await;
    assert!(
        adapter_entry(&listed, "style").unwrap()["generation"]
            .as_u64()
            .unwrap()
            > generation_v1
    );
    let (status, body) = edit(&http, &url, "style").await;
    assert_eq!(status, 200);
    assert_eq!(decode_png(&body), reference.expected(Some(&v2)));
    assert_ne!(reference.expected(Some(&v2)), reference.expected(Some(&v1)));

    // The store becomes unreachable: polls fail, nothing is refused or removed, v2 serves.
    gate.send_replace(false);
    let refused_before = refused.load(Ordering::SeqCst);
    let started = Instant::now();
    while refused.load(Ordering::SeqCst) < refused_before + 3 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the server stopped polling"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let listed = list_adapters(&http, &url).await;
    let style = adapter_entry(&listed, "style").unwrap();
    assert!(created_is(&listed, "style", "v2"), "{listed:?}");
    assert!(
        style["error"].is_null(),
        "a failed poll is no refusal: {style:?}"
    );
    assert_eq!(listed.len(), 3, "a failed poll removes nothing: {listed:?}");
    assert_eq!(edit(&http, &url, "style").await.0, 200);
    gate.send_replace(true);

    // A broken style is refused; v2 keeps serving.
    put("style", b"garbage".to_vec()).await;
    let listed = wait_for_adapters(&http, &url, "the refusal of the broken style", |l| {
        adapter_entry(l, "style").is_some_and(|e| !e["error"].is_null())
    })
    .await;
    assert!(created_is(&listed, "style", "v2"), "{listed:?}");
    let (status, body) = edit(&http, &url, "style").await;
    assert_eq!(status, 200);
    assert_eq!(decode_png(&body), reference.expected(Some(&v2)));

    // A good version again clears the refusal.
    put("style", v1_bytes.clone()).await;
    let listed = wait_for_adapters(&http, &url, "v1 again", |l| {
        created_is(l, "style", "v1") && adapter_entry(l, "style").unwrap()["error"].is_null()
    })
    .await;
    assert!(adapter_entry(&listed, "huge").is_some());

    // Deleted from the store: gone from the server.
    store.delete(&key("style")).await.unwrap();
    store.delete(&key("huge")).await.unwrap();
    wait_for_adapters(&http, &url, "style and huge removed", |l| {
        adapter_entry(l, "style").is_none() && adapter_entry(l, "huge").is_none()
    })
    .await;
    let (status, _) = edit(&http, &url, "style").await;
    assert_eq!(status, 404);

    server.shutdown().await.unwrap();
    moto.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_url_is_an_object_store_too() {
    let reference = load_reference();
    let (v1, v1_bytes) = version_bytes(&reference, 1.0, "file-v1");
    let bucket = tempfile::tempdir().unwrap();
    std::fs::write(bucket.path().join("style.safetensors"), &v1_bytes).unwrap();
    let cache = tempfile::tempdir().unwrap();
    // A stale file in the cache is not trusted: it is cleared and the store copied anew.
    std::fs::write(cache.path().join("stale.safetensors"), b"old").unwrap();
    let mut args = server_args(&format!("file://{}", bucket.path().display()), 1 << 30);
    args.adapter_cache = Some(cache.path().to_path_buf());
    let TestServer { server, url, http } = TestServer::with_args(args).await;
    let listed = list_adapters(&http, &url).await;
    assert!(created_is(&listed, "style", "file-v1"), "{listed:?}");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let (status, body) = edit(&http, &url, "style").await;
    assert_eq!(status, 200);
    assert_eq!(decode_png(&body), reference.expected(Some(&v1)));
    assert!(cache.path().join("style.safetensors").is_file());
    assert!(!cache.path().join("stale.safetensors").exists());
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unusable_adapters_url_fails_the_start_with_a_clear_message() {
    let args = server_args("ftp://host/adapters", 1 << 30);
    let err = rl4pix_server::start(&args)
        .await
        .err()
        .expect("an ftp URL is refused")
        .to_string();
    assert!(err.contains("unsupported scheme `ftp`"), "{err}");
}
