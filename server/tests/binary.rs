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
    assert_eq!(
        http.get(format!("{url}/ready"))
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    let info: serde_json::Value = http
        .get(format!("{url}/info"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(info["batching"]["max_queue"], 8);
    assert_eq!(info["batching"]["max_batch_size"], 4);

    let body = png(&scene(40, 24, 5));
    let r = http
        .post(format!("{url}/edit"))
        .multipart(edit_form(
            body.clone(),
            "add a circle",
            &[("seed", "11".into())],
        ))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let first = r.bytes().await.unwrap();

    // An edit of many steps is admitted, then SIGTERM arrives: it still completes.
    let slow = tokio::spawn({
        let (http, url) = (http.clone(), url.clone());
        async move {
            http.post(format!("{url}/edit"))
                .multipart(edit_form(
                    body,
                    "add a circle",
                    &[("seed", "11".into()), ("steps", "40".into())],
                ))
                .send()
                .await
                .unwrap()
        }
    });
    // Wait until the worker has it (or at most 5 s).
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(5) {
        let metrics = http
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
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
fn missing_default_model_fails_with_a_clear_message() {
    let empty = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_rl4pix-server"))
        .current_dir(empty.path())
        .env_remove("RL4PIX_MODEL")
        .args(["--port", "0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("default model `model/assets/toy`"),
        "{stderr}"
    );
    assert!(stderr.contains("--model"), "{stderr}");
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
