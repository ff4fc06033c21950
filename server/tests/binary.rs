//! The real `rl4pix-server` binary: flags, startup errors, serving, graceful SIGTERM.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn binary_serves_and_finishes_admitted_work_on_sigterm() {
    let mut server = BinaryServer::spawn(&[
        "--max-queue",
        "8",
        "--max-batch-size",
        "4",
        "--default-steps",
        "4",
    ]);
    let url = server.url.clone();
    let http = client();
    assert_eq!(get(&http, &format!("{url}/ready")).await.status(), 200);
    let info: serde_json::Value = get_json(&http, &format!("{url}/info")).await;
    assert_eq!(info["batching"]["max_queue"], 8);
    assert_eq!(info["batching"]["max_batch_size"], 4);

    let body = png(&scene(40, 24, 5));
    let r = post_edit(
        &http,
        &url,
        edit_form(body.clone(), "add a circle", &[("seed", "11".into())]),
    )
    .await;
    assert_eq!(r.status(), 200);
    let first = r.bytes().await.unwrap();

    // An edit of many steps is admitted, then SIGTERM arrives: it still completes.
    let slow = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            post_edit(
                &http,
                &url,
                edit_form(
                    body,
                    "add a circle",
                    &[("seed", "11".into()), ("steps", "40".into())],
                ),
            )
            .await
        }
    });
    // Wait until the worker has it (or at most 5 s).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let metrics = metrics(&http, &url).await;
        if metrics.contains("rl4pix_running_edits 1") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.terminate();
    let slow = slow.await.unwrap();
    assert_eq!(slow.status(), 200, "admitted work finishes during shutdown");
    assert_ne!(slow.bytes().await.unwrap(), first);
    let status = server
        .wait_exit(Duration::from_secs(30))
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status:?}");
}

#[test]
fn a_folder_that_is_not_a_model_fails_with_a_clear_message() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rl4pix-server"))
        .env_remove("RL4PIX_MODEL")
        .args(["--port", "0", "--model"])
        .arg(empty.path())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not a diffusers pipeline folder (no model_index.json there)"),
        "{stderr}"
    );
}

async fn edit_of_grid_7(
    http: &reqwest::Client,
    url: &str,
    adapter: Option<&str>,
) -> (String, Vec<u8>) {
    let input = std::fs::read(repo_root().join("model/assets/toy/grid/7-input.png")).unwrap();
    let mut fields = vec![("seed", "7".to_string()), ("steps", "4".to_string())];
    if let Some(adapter) = adapter {
        fields.push(("adapter", adapter.to_string()));
    }
    let r = post_edit(http, url, edit_form(input, "make the square blue", &fields)).await;
    assert_eq!(r.status(), 200);
    let adapter = r.headers()["x-adapter"].to_str().unwrap().to_string();
    (adapter, r.bytes().await.unwrap().to_vec())
}

/// What a newcomer gets from `rl4pix-server` with no flags, from any directory: the embedded
/// model with its RL-fine-tuned adapter applied, the base one request field away, and the
/// shipped folder safe from the admin routes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_flags_serve_the_rl_adapter_on_the_default_model() {
    let anywhere = tempfile::tempdir().unwrap();
    let server = BinaryServer::spawn_in(anywhere.path(), &["--api-key", "k"]);
    let http = client();
    let info = get_json(&http, &format!("{}/info", server.url)).await;
    assert_eq!(info["default_adapter"], "toy-rl", "{info}");
    let (applied, tuned) = edit_of_grid_7(&http, &server.url, None).await;
    assert_eq!(applied, "toy-rl");
    let (applied, base) = edit_of_grid_7(&http, &server.url, Some("none")).await;
    assert_eq!(applied, "none");
    assert_ne!(tuned, base, "the adapter changes the edit");

    let upload = send(
        post_adapters(&http, &server.url, "k")
            .json(&serde_json::json!({"name": "other", "path": "toy-rl.safetensors"})),
    )
    .await;
    assert_eq!(error_type(upload, 409).await, "shipped_adapters");
    let delete = delete_adapter(&http, &server.url, "k", "toy-rl").await;
    assert_eq!(error_type(delete, 409).await, "shipped_adapters");
    drop(server);

    // `--default-adapter none` serves the base by default, as the old default did.
    let server = BinaryServer::spawn_in(anywhere.path(), &["--default-adapter", "none"]);
    let (applied, plain) = edit_of_grid_7(&http, &server.url, None).await;
    assert_eq!(applied, "none");
    assert_eq!(plain, base);
}

#[test]
fn flags_come_from_the_environment_and_bad_values_are_refused() {
    let out = Command::new(env!("CARGO_BIN_EXE_rl4pix-server"))
        .env("RL4PIX_MAX_BATCH_SIZE", "0")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--max-batch-size must be at least 1"));

    let out = Command::new(env!("CARGO_BIN_EXE_rl4pix-server"))
        .args(["--print-openapi"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let spec: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
}
