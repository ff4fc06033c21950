//! Adapters in production, over real HTTP with the fixture model: hot replacement under load,
//! refused files, the admin routes' key and path checks, least-recently-used unloading.
//!
//! Every adapter version is a scaled copy of the fixture LoRA with its own `created` stamp; the
//! bytes each version must give are computed in-process, up front, and every served image must
//! equal exactly one of them.

mod common;

use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use image::RgbImage;
use rl4pix_model::adapter::LoraAdapter;
use serde_json::Value;

const KEY: &str = common::ADMIN_KEY;
const INSTRUCTION: &str = "make the red square blue";
const STEPS: usize = 2;
const SEED: u64 = 7;

fn load_reference() -> Reference {
    Reference::load(scene(40, 24, 1), INSTRUCTION, (STEPS, SEED))
}

/// The fixture LoRA scaled by `scale`, named `name`: a distinct version.
fn version(reference: &Reference, name: &str, scale: f64, created: &str) -> LoraAdapter {
    let mut adapter = reference.scaled(scale, created);
    adapter.name = name.to_string();
    adapter
}

fn write_adapter(dir: &Path, name: &str, adapter: &LoraAdapter) {
    adapter
        .save(&dir.join(format!("{name}.safetensors")))
        .unwrap();
}

async fn send_edit(http: &reqwest::Client, url: &str, adapter: Option<&str>) -> reqwest::Response {
    let mut fields = vec![("seed", SEED.to_string()), ("steps", STEPS.to_string())];
    if let Some(adapter) = adapter {
        fields.push(("adapter", adapter.to_string()));
    }
    post_edit(
        http,
        url,
        edit_form(png(&scene(40, 24, 1)), INSTRUCTION, &fields),
    )
    .await
}

/// The served image and its `x-adapter` header; fails the test on any error.
async fn edit_ok(http: &reqwest::Client, url: &str, adapter: Option<&str>) -> (RgbImage, String) {
    let r = send_edit(http, url, adapter).await;
    let status = r.status();
    let served_adapter = header_or_empty(&r, "x-adapter");
    let bytes = r.bytes().await.unwrap();
    assert_eq!(
        status,
        200,
        "adapter {adapter:?}: {}",
        String::from_utf8_lossy(&bytes)
    );
    (decode_png(&bytes), served_adapter)
}

fn index_of(expected: &[RgbImage], image: &RgbImage) -> Option<usize> {
    expected.iter().position(|e| e == image)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replacing_and_deleting_adapters_under_load_never_changes_an_admitted_request() {
    const REPLACEMENTS: usize = 20;
    const HOT_CLIENTS: usize = 6;
    const MIN_REQUESTS: usize = 100;
    const UPLOADED_REQUESTS: usize = 8;

    let reference = load_reference();
    // Versions 0..=20 of `hot`, one uploaded adapter, and the base.
    let hot: Vec<LoraAdapter> = (0..=REPLACEMENTS)
        .map(|k| {
            version(
                &reference,
                "hot",
                1.0 + 0.25 * k as f64,
                &format!("hot-v{k}"),
            )
        })
        .collect();
    let uploaded = version(&reference, "up", -3.0, "up-v0");
    let mut expected: Vec<RgbImage> = hot.iter().map(|a| reference.expected(Some(a))).collect();
    expected.push(reference.expected(Some(&uploaded)));
    expected.push(reference.expected(None));
    let (uploaded_index, base_index) = (REPLACEMENTS + 1, REPLACEMENTS + 2);
    for i in 0..expected.len() {
        for j in 0..i {
            assert_ne!(
                expected[i], expected[j],
                "versions {i} and {j} give the same image: the test could not tell them apart"
            );
        }
    }
    let expected = Arc::new(expected);

    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "hot", &hot[0]);
    let mut args = adapter_server_args(dir.path());
    // One edit per batch: the expected bytes are runs alone, and today a batch's UNet time
    // embedding goes through small-M matmuls whose rounding depends on the batch size (up to
    // 1 u8 level on a pixel now and then). Pinning and swapping are what this test checks.
    args.max_batch_size = 1;
    let TestServer { server, url, http } = TestServer::with_args(args).await;

    // `written`: the newest version put in the folder; `live`: the newest seen served by
    // GET /adapters. A request sent when `live` was k and answered when `written` was m ran
    // with one of the versions k..=m, whole.
    let written = Arc::new(AtomicUsize::new(0));
    let live = Arc::new(AtomicUsize::new(0));
    let replaced = Arc::new(AtomicUsize::new(0));
    let sent = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for client_index in 0..HOT_CLIENTS {
        let (http, url) = (http.clone(), url.clone());
        let (written, live, replaced, sent, expected) = (
            written.clone(),
            live.clone(),
            replaced.clone(),
            sent.clone(),
            expected.clone(),
        );
        clients.push(tokio::spawn(async move {
            let mut served = 0;
            for round in 0.. {
                let done = replaced.load(Ordering::SeqCst) == REPLACEMENTS;
                if done && sent.load(Ordering::SeqCst) >= MIN_REQUESTS {
                    break;
                }
                sent.fetch_add(1, Ordering::SeqCst);
                // One request in six asks for the base while `hot` changes.
                let base = (client_index + round) % 6 == 0;
                let lo = live.load(Ordering::SeqCst);
                let (image, header) = edit_ok(&http, &url, (!base).then_some("hot")).await;
                let hi = written.load(Ordering::SeqCst);
                let got = index_of(&expected, &image);
                if base {
                    assert_eq!(header, "none");
                    assert_eq!(got, Some(base_index), "the base request got other weights");
                } else {
                    assert_eq!(header, "hot");
                    let k = got.unwrap_or_else(|| {
                        panic!("a `hot` request's image equals no version run alone (mixed or half-loaded weights)")
                    });
                    assert!(
                        (lo..=hi).contains(&k),
                        "a `hot` request sent while version {lo} served and answered by version {hi} got version {k}"
                    );
                }
                served += 1;
            }
            served
        }));
    }

    // Replace `hot` 20 times, alternating an atomic rename (what `rl4pix-train` does) with an
    // in-place rewrite in two halves (what `cp` does), each time until it is seen serving.
    let replacer = {
        let (http, url, dir) = (http.clone(), url.clone(), dir.path().to_path_buf());
        let (written, live, replaced) = (written.clone(), live.clone(), replaced.clone());
        let hot = hot.clone();
        tokio::spawn(async move {
            for (k, version) in hot.iter().enumerate().skip(1) {
                written.store(k, Ordering::SeqCst);
                if k % 2 == 0 {
                    write_adapter(&dir, "hot", version);
                } else {
                    let bytes = version.to_bytes().unwrap();
                    let path = dir.join("hot.safetensors");
                    let half = bytes.len() / 2;
                    std::fs::write(&path, &bytes[..half]).unwrap();
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    let mut file = std::fs::OpenOptions::new()
                        .append(true)
                        .open(&path)
                        .unwrap();
                    std::io::Write::write_all(&mut file, &bytes[half..]).unwrap();
                }
                let created = format!("hot-v{k}");
                wait_for_adapters(&http, &url, &created, |listed| {
                    adapter_entry(listed, "hot").is_some_and(|e| e["created"] == created.as_str())
                })
                .await;
                live.store(k, Ordering::SeqCst);
                replaced.store(k, Ordering::SeqCst);
            }
        })
    };

    // Meanwhile: upload `up`, edit with it, delete it while those edits are admitted.
    let form = reqwest::multipart::Form::new().text("name", "up").part(
        "file",
        reqwest::multipart::Part::bytes(uploaded.to_bytes().unwrap()).file_name("up.safetensors"),
    );
    let r = send(post_adapters(&http, &url, KEY).multipart(form)).await;
    assert_eq!(r.status(), 201);
    let info: Value = r.json().await.unwrap();
    assert_eq!(
        (info["name"].as_str(), info["status"].as_str()),
        (Some("up"), Some("loaded"))
    );
    assert!(
        dir.path().join("up.safetensors").is_file(),
        "written into the folder"
    );
    let finished = Arc::new(AtomicUsize::new(0));
    let uploaded_requests: Vec<_> = (0..UPLOADED_REQUESTS)
        .map(|_| {
            let (http, url, finished) = (http.clone(), url.clone(), finished.clone());
            tokio::spawn(async move {
                let result = edit_ok(&http, &url, Some("up")).await;
                finished.fetch_add(1, Ordering::SeqCst);
                result
            })
        })
        .collect();
    // Every one of them admitted (pinned, or already done) before the delete.
    let started = Instant::now();
    loop {
        let done = finished.load(Ordering::SeqCst);
        let listed = list_adapters(&http, &url).await;
        let in_flight =
            adapter_entry(&listed, "up").map_or(0, |e| e["requests_in_flight"].as_u64().unwrap());
        if done + in_flight as usize >= UPLOADED_REQUESTS {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "uploaded-adapter requests never admitted"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let r = delete_adapter(&http, &url, KEY, "up").await;
    assert_eq!(r.status(), 200);
    assert!(
        !dir.path().join("up.safetensors").exists(),
        "deleted from the folder"
    );
    for request in uploaded_requests {
        let (image, header) = request.await.unwrap();
        assert_eq!(header, "up");
        assert_eq!(
            index_of(&expected, &image),
            Some(uploaded_index),
            "a request admitted before the delete must run with the uploaded version"
        );
    }
    let r = send_edit(&http, &url, Some("up")).await;
    assert_eq!(error_type(r, 404).await, "adapter_not_found");

    replacer.await.unwrap();
    let mut total = UPLOADED_REQUESTS;
    for c in clients {
        total += c.await.unwrap();
    }
    assert!(
        total >= MIN_REQUESTS + UPLOADED_REQUESTS,
        "{total} requests"
    );
    let listed = list_adapters(&http, &url).await;
    let hot_entry = adapter_entry(&listed, "hot").unwrap();
    assert_eq!(hot_entry["created"], format!("hot-v{REPLACEMENTS}"));
    assert!(hot_entry["error"].is_null(), "{hot_entry}");
    assert!(adapter_entry(&listed, "up").is_none());
    let (image, _) = edit_ok(&http, &url, Some("hot")).await;
    assert_eq!(index_of(&expected, &image), Some(REPLACEMENTS));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_file_is_listed_with_its_reason_and_the_good_version_keeps_serving() {
    let reference = load_reference();
    let good = version(&reference, "mine", 1.0, "good");
    let newer = version(&reference, "mine", 2.0, "newer");
    let (expected_good, expected_newer) = (
        reference.expected(Some(&good)),
        reference.expected(Some(&newer)),
    );
    assert_ne!(expected_good, expected_newer);
    let dir = tempfile::tempdir().unwrap();
    write_adapter(dir.path(), "mine", &good);
    let TestServer { server, url, http } =
        TestServer::with_args(adapter_server_args(dir.path())).await;
    assert_eq!(edit_ok(&http, &url, Some("mine")).await.0, expected_good);
    let generation =
        adapter_entry(&list_adapters(&http, &url).await, "mine").unwrap()["generation"].clone();

    // A truncated copy lands over it (a copy cut short): refused, the good version serves.
    let bytes = newer.to_bytes().unwrap();
    std::fs::write(
        dir.path().join("mine.safetensors"),
        &bytes[..bytes.len() / 3],
    )
    .unwrap();
    let listed = wait_for_adapters(&http, &url, "the truncated file's refusal", |listed| {
        adapter_entry(listed, "mine").is_some_and(|e| e["error"].is_string())
    })
    .await;
    let mine = adapter_entry(&listed, "mine").unwrap();
    assert_eq!(mine["status"], "loaded");
    assert_eq!(mine["generation"], generation);
    assert!(mine["error"].as_str().unwrap().contains("mine"), "{mine}");
    assert_eq!(edit_ok(&http, &url, Some("mine")).await.0, expected_good);

    // New files that never loaded: truncated, and one made for another base model.
    std::fs::write(
        dir.path().join("cut.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    std::fs::copy(
        repo_root().join("tests/fixtures/pipelines/sd2.lora.safetensors"),
        dir.path().join("other.safetensors"),
    )
    .unwrap();
    let listed = wait_for_adapters(&http, &url, "two refusals", |listed| {
        ["cut", "other"]
            .iter()
            .all(|n| adapter_entry(listed, n).is_some_and(|e| e["status"] == "refused"))
    })
    .await;
    for name in ["cut", "other"] {
        let reason = adapter_entry(&listed, name).unwrap()["error"]
            .as_str()
            .unwrap()
            .to_string();
        assert!(!reason.is_empty());
        let r = send_edit(&http, &url, Some(name)).await;
        assert_eq!(r.status(), 404);
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error_type"], "adapter_not_found");
        let message = body["error"].as_str().unwrap();
        // The reason (it may name files) is for admins only.
        assert!(
            message.contains("was refused") && !message.contains(&reason),
            "{message}"
        );
    }

    // An upload that fails validation changes nothing.
    let form = reqwest::multipart::Form::new().text("name", "mine").part(
        "file",
        reqwest::multipart::Part::bytes(bytes[..bytes.len() / 2].to_vec()).file_name("x"),
    );
    let r = send(post_adapters(&http, &url, KEY).multipart(form)).await;
    assert_eq!(error_type(r, 422).await, "adapter_refused");
    assert_eq!(edit_ok(&http, &url, Some("mine")).await.0, expected_good);

    // The whole file arrives: it replaces the good version and the refusal is gone.
    write_adapter(dir.path(), "mine", &newer);
    let listed = wait_for_adapters(&http, &url, "the repaired file", |listed| {
        adapter_entry(listed, "mine").is_some_and(|e| e["created"] == "newer")
    })
    .await;
    let mine = adapter_entry(&listed, "mine").unwrap();
    assert!(mine["error"].is_null(), "{mine}");
    assert!(mine["generation"].as_u64() > generation.as_u64());
    assert_eq!(edit_ok(&http, &url, Some("mine")).await.0, expected_newer);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_routes_need_the_key_and_never_reach_outside_the_folder() {
    let reference = load_reference();
    let adapter = version(&reference, "x", 1.0, "x");
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    write_adapter(outside.path(), "secret", &adapter);
    std::fs::create_dir(dir.path().join("incoming")).unwrap();
    write_adapter(&dir.path().join("incoming"), "run-42", &adapter);
    std::os::unix::fs::symlink(
        outside.path().join("secret.safetensors"),
        dir.path().join("incoming/link.safetensors"),
    )
    .unwrap();
    let TestServer { server, url, http } =
        TestServer::with_args(adapter_server_args(dir.path())).await;

    let routes = || {
        [
            http.get(format!("{url}/adapters")),
            http.post(format!("{url}/adapters"))
                .json(&serde_json::json!({"name": "x", "path": "incoming/run-42.safetensors"})),
            http.delete(format!("{url}/adapters/x")),
            http.put(format!("{url}/adapters/default"))
                .json(&serde_json::json!({"name": null})),
        ]
    };
    for request in routes() {
        assert_eq!(
            error_type(request.send().await.unwrap(), 401).await,
            "unauthorized"
        );
    }
    for request in routes() {
        let r = request.bearer_auth("sesame2").send().await.unwrap();
        assert_eq!(error_type(r, 401).await, "unauthorized");
    }
    for request in routes() {
        let r = request.header("authorization", KEY).send().await.unwrap();
        assert_eq!(error_type(r, 401).await, "unauthorized", "no `Bearer `");
    }
    assert!(
        !dir.path().join("x.safetensors").exists(),
        "nothing happened"
    );

    let add = |name: &str, path: String| {
        let body = serde_json::json!({"name": name, "path": path});
        send(post_adapters(&http, &url, KEY).json(&body))
    };
    let escapes = [
        "../secret.safetensors".to_string(),
        "incoming/../../secret.safetensors".into(),
        outside
            .path()
            .join("secret.safetensors")
            .display()
            .to_string(),
        "incoming/link.safetensors".into(),
    ];
    for path in escapes {
        let r = add("x", path.clone()).await;
        assert_eq!(
            error_type(r, 403).await,
            "path_outside_adapters_folder",
            "{path}"
        );
    }
    let r = add("x", "incoming/nope.safetensors".into()).await;
    assert_eq!(error_type(r, 404).await, "file_not_found");
    for bad_name in ["../x", "default", "none", ""] {
        let r = add(bad_name, "incoming/run-42.safetensors".into()).await;
        assert_eq!(
            error_type(r, 422).await,
            "invalid_parameter",
            "{bad_name:?}"
        );
    }
    assert!(!dir.path().join("x.safetensors").exists());

    // A file inside the folder, added under a name; then made the default, then deleted.
    let r = add("x", "incoming/run-42.safetensors".into()).await;
    assert_eq!(r.status(), 201);
    let info: Value = r.json().await.unwrap();
    assert_eq!(
        (info["status"].as_str(), info["rank"].as_u64()),
        (Some("loaded"), Some(4))
    );
    assert!(dir.path().join("x.safetensors").is_file());
    let put_default = |name: Value| {
        http.put(format!("{url}/adapters/default"))
            .bearer_auth(KEY)
            .json(&serde_json::json!({ "name": name }))
            .send()
    };
    let r = put_default("nope".into()).await.unwrap();
    assert_eq!(error_type(r, 404).await, "adapter_not_found");
    let r = put_default("x".into()).await.unwrap();
    assert_eq!(r.json::<Value>().await.unwrap()["name"], "x");
    let expected = reference.expected(Some(&adapter));
    let base = reference.expected(None);
    assert_eq!(
        edit_ok(&http, &url, None).await,
        (expected.clone(), "x".into())
    );
    assert_eq!(
        edit_ok(&http, &url, Some("none")).await,
        (base.clone(), "none".into())
    );
    let info: Value = get_json(&http, &format!("{url}/info")).await;
    assert_eq!(info["default_adapter"], "x");
    assert!(
        adapter_entry(&list_adapters(&http, &url).await, "x").unwrap()["default"]
            .as_bool()
            .unwrap()
    );

    let r = delete_adapter(&http, &url, KEY, "x").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["default_cleared"], true);
    assert!(!dir.path().join("x.safetensors").exists());
    assert_eq!(edit_ok(&http, &url, None).await, (base, "none".into()));
    let r = delete_adapter(&http, &url, KEY, "x").await;
    assert_eq!(error_type(r, 404).await, "adapter_not_found");
    let r = send(post_adapters(&http, &url, KEY).body("x")).await;
    assert_eq!(error_type(r, 415).await, "unsupported_media_type");
    server.shutdown().await.unwrap();

    // Without --api-key the admin routes are closed, and say how to open them.
    let mut args = adapter_server_args(dir.path());
    args.api_key = None;
    let server = start(args).await;
    let r = send(
        http.get(format!("{}/adapters", server.url()))
            .bearer_auth(KEY),
    )
    .await;
    assert_eq!(r.status(), 401);
    let body: Value = r.json().await.unwrap();
    assert!(
        body["error"].as_str().unwrap().contains("--api-key"),
        "{body}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_least_recently_used_adapter_is_unloaded_and_read_again_when_requested() {
    let reference = load_reference();
    let names = ["a", "b", "c"];
    let adapters: Vec<LoraAdapter> = names
        .iter()
        .enumerate()
        .map(|(i, n)| version(&reference, n, 1.0 + i as f64, n))
        .collect();
    let expected: Vec<RgbImage> = adapters
        .iter()
        .map(|a| reference.expected(Some(a)))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    for (name, adapter) in names.iter().zip(&adapters) {
        write_adapter(dir.path(), name, adapter);
    }
    let mut args = adapter_server_args(dir.path());
    args.max_adapters = 2;
    // Plain least-recently-used: no protection of recently requested adapters here (that
    // policy is tested in hardening_adapters.rs).
    args.adapter_min_resident_s = 0.0;
    let TestServer { server, url, http } = TestServer::with_args(args).await;
    let statuses = |listed: &[Value]| adapter_statuses(listed, &names);

    // Read in name order; the third pushed out the first.
    let listed = list_adapters(&http, &url).await;
    assert_eq!(statuses(&listed), ["unloaded", "loaded", "loaded"]);
    let a_generation = adapter_entry(&listed, "a").unwrap()["generation"].clone();
    let (image, _) = edit_ok(&http, &url, Some("a")).await;
    assert_eq!(image, expected[0], "read again from its file");
    let listed = list_adapters(&http, &url).await;
    assert_eq!(statuses(&listed), ["loaded", "unloaded", "loaded"]);
    assert_eq!(
        adapter_entry(&listed, "a").unwrap()["generation"],
        a_generation,
        "same file, same version"
    );
    assert_eq!(edit_ok(&http, &url, Some("c")).await.0, expected[2]);
    assert_eq!(edit_ok(&http, &url, Some("b")).await.0, expected[1]);
    assert_eq!(
        statuses(&list_adapters(&http, &url).await),
        ["unloaded", "loaded", "loaded"],
        "`a` was the least recently used"
    );
    let info: Value = get_json(&http, &format!("{url}/info")).await;
    assert_eq!(info["adapter_memory"]["loaded"], 2);
    assert_eq!(
        info["adapters"],
        serde_json::json!(["a", "b", "c"]),
        "all requestable"
    );
    let memory = adapter_entry(&listed, "a").unwrap()["memory_bytes"]
        .as_u64()
        .unwrap();
    server.shutdown().await.unwrap();

    // The byte bound: room for two and a half.
    let mut args = adapter_server_args(dir.path());
    args.max_adapter_bytes = memory * 5 / 2;
    let server = start(args).await;
    let url = server.url();
    assert_eq!(
        statuses(&list_adapters(&http, &url).await),
        ["unloaded", "loaded", "loaded"]
    );
    assert_eq!(edit_ok(&http, &url, Some("a")).await.0, expected[0]);
    let info: Value = get_json(&http, &format!("{url}/info")).await;
    assert_eq!(info["adapter_memory"]["loaded_bytes"], memory * 2);
    server.shutdown().await.unwrap();
}
