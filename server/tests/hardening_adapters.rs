//! Adapters under abuse and faults, over real HTTP with the fixture model: clients rotating
//! through adapter names (single-flight reloads, a reload rate, adapters in recent use kept),
//! files too big to read, hard links into the folder, uploads over a planted symlink.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

const KEY: &str = common::ADMIN_KEY;

/// Every adapter here is the fixture LoRA under another name (content does not matter to
/// these tests, only which names are held).
fn write_adapters(dir: &Path, names: &[&str]) {
    for name in names {
        std::fs::copy(fixture_adapter(), dir.join(format!("{name}.safetensors"))).unwrap();
    }
}

async fn send_edit(http: &reqwest::Client, url: &str, adapter: &str) -> reqwest::Response {
    let fields = [
        ("seed", "7".to_string()),
        ("steps", "1".to_string()),
        ("adapter", adapter.to_string()),
    ];
    post_edit(
        http,
        url,
        edit_form(png(&scene(24, 16, 1)), "make it blue", &fields),
    )
    .await
}

async fn edit_status(http: &reqwest::Client, url: &str, adapter: &str) -> u16 {
    send_edit(http, url, adapter).await.status().as_u16()
}

const NAMES: [&str; 4] = ["a", "b", "c", "d"];

/// A server on a folder of [`NAMES`] that holds two of them, reads at most two again a minute,
/// and keeps adapters requested within `min_resident_s`.
async fn four_adapters_two_held(min_resident_s: f64) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().unwrap();
    write_adapters(dir.path(), &NAMES);
    let mut args = adapter_server_args(dir.path());
    args.max_adapters = 2;
    args.adapter_reloads_per_min = 2;
    args.adapter_min_resident_s = min_resident_s;
    let server = TestServer::with_args(args).await;
    (dir, server)
}

/// The status of each of [`NAMES`].
async fn statuses(http: &reqwest::Client, url: &str) -> Vec<String> {
    adapter_statuses(&list_adapters(http, url).await, &NAMES)
}

/// A 503 for a throttled reload: JSON error, Retry-After in whole seconds within `max_s`.
async fn assert_throttled(r: reqwest::Response, max_s: u64, mentions: &str) {
    let retry_after: u64 = r
        .headers()
        .get("retry-after")
        .expect("Retry-After on a throttled reload")
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        (1..=max_s).contains(&retry_after),
        "Retry-After {retry_after}"
    );
    assert_eq!(r.status(), 503);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error_type"], "unavailable", "{body}");
    assert!(body["error"].as_str().unwrap().contains(mentions), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rotation_through_adapter_names_cannot_unload_adapters_in_recent_use() {
    let (_dir, TestServer { server, url, http }) = four_adapters_two_held(120.0).await;
    // Read in name order at start; the bound keeps the last two.
    assert_eq!(
        statuses(&http, &url).await,
        ["unloaded", "unloaded", "loaded", "loaded"]
    );
    // Real traffic uses `c`.
    assert_eq!(edit_status(&http, &url, "c").await, 200);

    // Eight requests at once for the unloaded `a`: one read between them (a rate of two
    // reloads a minute would refuse the third otherwise), `d` (never requested) makes room.
    let burst: Vec<_> = (0..8)
        .map(|_| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move { edit_status(&http, &url, "a").await })
        })
        .collect();
    for request in burst {
        assert_eq!(request.await.unwrap(), 200, "all share one reload");
    }
    assert_eq!(
        statuses(&http, &url).await,
        ["loaded", "unloaded", "loaded", "unloaded"]
    );

    // `b` would need `a` or `c` unloaded, both requested within --adapter-min-resident-s:
    // refused with Retry-After, nothing unloaded.
    assert_throttled(send_edit(&http, &url, "b").await, 121, "recent use").await;
    assert_eq!(
        statuses(&http, &url).await,
        ["loaded", "unloaded", "loaded", "unloaded"]
    );
    // The held ones still serve without any read.
    assert_eq!(edit_status(&http, &url, "c").await, 200);
    assert_eq!(edit_status(&http, &url, "a").await, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_caused_by_requests_are_rate_limited() {
    let (_dir, TestServer { server, url, http }) = four_adapters_two_held(0.0).await;
    // Two reloads are within the rate (each unloads the least recently used).
    assert_eq!(edit_status(&http, &url, "a").await, 200);
    assert_eq!(edit_status(&http, &url, "b").await, 200);
    assert_eq!(
        statuses(&http, &url).await,
        ["loaded", "loaded", "unloaded", "unloaded"]
    );
    // The third is not: 503, Retry-After about when the bucket has one again (30 s at 2 a
    // minute), and nothing was read or unloaded.
    assert_throttled(
        send_edit(&http, &url, "c").await,
        31,
        "--adapter-reloads-per-min",
    )
    .await;
    assert_eq!(
        statuses(&http, &url).await,
        ["loaded", "loaded", "unloaded", "unloaded"]
    );
    // Held adapters are not reloads: they keep serving.
    assert_eq!(edit_status(&http, &url, "a").await, 200);
    server.shutdown().await.unwrap();
}

/// The peak resident memory of this process (the in-process servers included), in bytes.
fn peak_rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_multi_gigabyte_file_in_the_folder_is_refused_by_size_without_being_read() {
    let dir = tempfile::tempdir().unwrap();
    write_adapters(dir.path(), &["good"]);
    // Sparse: 6 GiB to `stat`, nothing on disk; reading it whole would need 6 GiB of memory.
    let huge = std::fs::File::create(dir.path().join("huge.safetensors")).unwrap();
    huge.set_len(6 << 30).unwrap();
    let mut args = adapter_server_args(dir.path());
    args.max_adapter_bytes = 64 << 20;
    let TestServer { server, url, http } = TestServer::with_args(args).await;
    let listed = list_adapters(&http, &url).await;
    let entry = adapter_entry(&listed, "huge").expect("listed");
    assert_eq!(entry["status"], "refused");
    let reason = entry["error"].as_str().unwrap();
    assert!(
        reason.contains("6442450944 bytes")
            && reason.contains("--max-adapter-bytes 67108864")
            && reason.contains("not read"),
        "{reason}"
    );
    assert!(
        !reason.contains(&dir.path().display().to_string()),
        "no absolute path in what clients see: {reason}"
    );
    assert!(
        peak_rss_bytes() < 2 << 30,
        "peak RSS {} bytes: the file was read",
        peak_rss_bytes()
    );
    assert_eq!(edit_status(&http, &url, "good").await, 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hard_link_into_the_folder_is_refused_and_uploads_never_follow_a_planted_symlink() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    write_adapters(outside.path(), &["secret"]);
    let secret = outside.path().join("secret.safetensors");
    // A hard link names the outside file from inside the folder: canonical paths cannot tell.
    std::fs::hard_link(&secret, dir.path().join("linked.safetensors")).unwrap();
    std::fs::create_dir(dir.path().join("incoming")).unwrap();
    std::fs::hard_link(&secret, dir.path().join("incoming/linked.safetensors")).unwrap();
    // A symlink planted where an upload will write: the upload must replace the link, not
    // write through it.
    let target = outside.path().join("target.safetensors");
    std::fs::write(&target, b"untouched").unwrap();
    std::os::unix::fs::symlink(&target, dir.path().join("up.safetensors")).unwrap();

    let TestServer { server, url, http } =
        TestServer::with_args(adapter_server_args(dir.path())).await;
    let listed = list_adapters(&http, &url).await;
    let entry = adapter_entry(&listed, "linked").expect("listed");
    assert_eq!(entry["status"], "refused", "{entry}");
    assert!(
        entry["error"].as_str().unwrap().contains("hard links"),
        "{entry}"
    );
    let r = send(
        post_adapters(&http, &url, KEY)
            .json(&serde_json::json!({"name": "x", "path": "incoming/linked.safetensors"})),
    )
    .await;
    assert_eq!(error_type(r, 422).await, "adapter_refused");
    assert!(
        !dir.path().join("x.safetensors").exists(),
        "nothing written"
    );

    let upload = reqwest::multipart::Form::new().text("name", "up").part(
        "file",
        reqwest::multipart::Part::bytes(std::fs::read(fixture_adapter()).unwrap())
            .file_name("up.safetensors"),
    );
    let r = send(post_adapters(&http, &url, KEY).multipart(upload)).await;
    assert_eq!(r.status(), 201, "{}", r.text().await.unwrap());
    assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
    let written = std::fs::symlink_metadata(dir.path().join("up.safetensors")).unwrap();
    assert!(written.file_type().is_file(), "the link was replaced");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    assert_eq!(edit_status(&http, &url, "up").await, 200);
    server.shutdown().await.unwrap();
}
