//! Async jobs (`POST /edit` with `Prefer: respond-async`) over real HTTP with the fixture
//! model: status, server-sent progress, result bytes, cancellation (queued, running, and
//! inside a shared batch) and eviction.

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

fn form(variant: u32, seed: u64, steps: usize) -> reqwest::multipart::Form {
    edit_form(
        png(&scene(40, 24, variant)),
        "make the red square blue",
        &[("seed", seed.to_string()), ("steps", steps.to_string())],
    )
}

/// Submits an async edit; checks the 202 answer and returns the job id.
async fn submit(http: &reqwest::Client, url: &str, form: reqwest::multipart::Form) -> String {
    let r = send(
        http.post(format!("{url}/edit"))
            .header("prefer", "wait=5, respond-async")
            .multipart(form),
    )
    .await;
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    assert_eq!(header(&r, "preference-applied"), "respond-async");
    let location = header(&r, "location").to_string();
    let body: Value = r.json().await.unwrap();
    let id = body["id"].as_str().unwrap().to_string();
    assert_eq!(id.len(), 32, "128 random bits in hex: {id}");
    assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(body["status_url"], format!("/jobs/{id}"));
    assert_eq!(location, format!("/jobs/{id}"));
    id
}

/// Reads a whole event stream: (event name, data) pairs, until the server ends it.
async fn events(http: &reqwest::Client, url: &str, id: &str) -> Vec<(String, Value)> {
    read_events(get(http, &format!("{url}/jobs/{id}/events")).await).await
}

/// The events of a stream already opened.
async fn read_events(mut r: reqwest::Response) -> Vec<(String, Value)> {
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "text/event-stream");
    let mut text = String::new();
    while let Some(chunk) = r.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = None;
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event: ") {
                    name = Some(v.to_string());
                } else if let Some(v) = line.strip_prefix("data: ") {
                    data = Some(serde_json::from_str(v).unwrap());
                }
            }
            Some((name?, data?))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_streams_its_progress_and_ends_with_the_synchronous_bytes() {
    let TestServer { server, url, http } = TestServer::start(|args| args.max_batch_size = 1).await;

    // The submitting connection closes at once; an async job does not depend on it.
    let submitter = client();
    let id = submit(&submitter, &url, form(1, 7, 20)).await;
    drop(submitter);
    let stream = events(&http, &url, &id).await;

    let (last_name, last) = stream.last().unwrap();
    assert_eq!(last_name, "done", "{stream:?}");
    assert_eq!(last["status"], "done");
    let rank = |name: &str| match name {
        "queued" => 0,
        "running" => 1,
        _ => 2,
    };
    let mut previous_step = -1i64;
    for pair in stream.windows(2) {
        assert!(rank(&pair[0].0) <= rank(&pair[1].0), "{stream:?}");
    }
    for (name, data) in &stream {
        assert_eq!(data["status"], name.as_str());
        if name == "running" {
            assert_eq!(data["total_steps"], 20);
            let step = data["step"].as_i64().unwrap();
            assert!(step > previous_step, "steps go forward: {stream:?}");
            previous_step = step;
        }
    }
    assert!(
        stream
            .iter()
            .any(|(name, d)| name == "running" && d["step"].as_i64() < Some(20)),
        "progress is streamed while the job runs: {stream:?}"
    );
    assert_eq!(
        (last["step"].as_u64(), last["total_steps"].as_u64()),
        (Some(20), Some(20))
    );

    let s = job_status(&http, &url, &id).await;
    assert_eq!(s["status"], "done");
    assert_eq!(s["seed"], 7);
    for stamp in ["created_at", "started_at", "finished_at"] {
        assert!(s[stamp].as_str().is_some_and(|t| t.ends_with('Z')), "{s}");
    }
    assert!(s["error"].is_null() && s["position"].is_null());

    // A client joining late gets the current (final) state, and the stream ends.
    let late = events(&http, &url, &id).await;
    assert_eq!(late.len(), 1, "{late:?}");
    assert_eq!(late[0].0, "done");

    // The result: the same bytes and headers as the synchronous answer to the same request.
    let r = get(&http, &format!("{url}/jobs/{id}/result")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "image/png");
    assert_eq!(header(&r, "x-edit-id"), id);
    assert_eq!(header(&r, "x-seed"), "7");
    let job_bytes = r.bytes().await.unwrap();
    let r = post_edit(&http, &url, form(1, 7, 20)).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "image/png");
    let sync_bytes = r.bytes().await.unwrap();
    assert_eq!(job_bytes, sync_bytes, "async and sync results differ");
    // Fetching again, as JSON, gives the same image.
    let json: Value = send_json(
        http.get(format!("{url}/jobs/{id}/result"))
            .header("accept", "application/json"),
    )
    .await;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    assert_eq!(
        b64.decode(json["image"].as_str().unwrap()).unwrap(),
        job_bytes
    );
    assert_eq!(json["edit_id"], id.as_str());

    // Bad input is refused at once with its 4xx, as without the preference; no job is made.
    let r = post_edit_async(&http, &url, form(1, 7, 500)).await;
    assert!(r.headers().get("location").is_none());
    assert_eq!(error_type(r, 422).await, "invalid_parameter");

    // Unknown ids: 404 on every job route.
    let unknown = "0123456789abcdef0123456789abcdef";
    for (method, path) in [
        (reqwest::Method::GET, format!("/jobs/{unknown}")),
        (reqwest::Method::GET, format!("/jobs/{unknown}/events")),
        (reqwest::Method::GET, format!("/jobs/{unknown}/result")),
        (reqwest::Method::DELETE, format!("/jobs/{unknown}")),
    ] {
        let r = send(http.request(method, format!("{url}{path}"))).await;
        assert_eq!(error_type(r, 404).await, "job_not_found", "{path}");
    }
    let m = metrics(&http, &url).await;
    assert!(m.contains("rl4pix_jobs_total{status=\"done\"} 1"), "{m}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_job_cancelled_stops_within_a_step_and_the_worker_moves_on() {
    let TestServer { server, url, http } = TestServer::start(|args| {
        args.max_batch_size = 1;
        args.max_steps = 900;
    })
    .await;

    // 900 steps would keep the worker busy for tens of seconds.
    let id = submit(&http, &url, form(2, 1, 900)).await;
    let running = wait_for_job(&http, &url, &id, Duration::from_secs(30), "running", |s| {
        s["status"] == "running" && s["step"].as_u64() >= Some(1)
    })
    .await;
    assert_eq!(running["total_steps"], 900);
    // A client following the job sees it to its end, the cancel included.
    let follower = get(&http, &format!("{url}/jobs/{id}/events")).await;
    assert_eq!(follower.status(), 200);
    let r = delete(&http, &format!("{url}/jobs/{id}")).await;
    assert_eq!(r.status(), 200);
    let at_cancel: Value = r.json().await.unwrap();
    assert_eq!(at_cancel["status"], "cancelled", "marked cancelled at once");
    assert!(at_cancel["finished_at"].is_string());
    assert!(at_cancel["step"].as_u64() >= Some(1));

    // The worker is free again: a short edit is answered long before 900 steps could run.
    let started = Instant::now();
    let r = post_edit(&http, &url, form(3, 2, 2)).await;
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the cancelled job kept the worker busy: {:?}",
        started.elapsed()
    );
    let followed = read_events(follower).await;
    let (last, _) = followed.last().unwrap();
    assert_eq!(last, "cancelled", "{followed:?}");

    // Deleted means gone (RFC 9110): every route of the job answers 404 from now on.
    for path in ["", "/events", "/result"] {
        let r = get(&http, &format!("{url}/jobs/{id}{path}")).await;
        assert_eq!(error_type(r, 404).await, "job_not_found", "{path}");
    }
    let m = metrics(&http, &url).await;
    assert!(
        m.contains("rl4pix_edits_total{outcome=\"cancelled\"} 1"),
        "the worker cancelled the batch: {m}"
    );
    assert!(
        m.contains("rl4pix_jobs_total{status=\"cancelled\"} 1"),
        "{m}"
    );
    let r = delete(&http, &format!("{url}/jobs/{id}")).await;
    assert_eq!(error_type(r, 404).await, "job_not_found");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_cancelled_leaves_the_queue_and_frees_its_slot() {
    let TestServer { server, url, http } = TestServer::start(|args| {
        args.max_batch_size = 1;
        args.max_queue = 2;
        args.max_steps = 900;
    })
    .await;

    let blocker = submit(&http, &url, form(1, 1, 900)).await;
    wait_for_status(&http, &url, &blocker, "running", Duration::from_secs(30)).await;
    let first = submit(&http, &url, form(2, 2, 2)).await;
    let second = submit(&http, &url, form(3, 3, 2)).await;
    assert_eq!(job_status(&http, &url, &first).await["position"], 0);
    assert_eq!(job_status(&http, &url, &second).await["position"], 1);

    // The queue is full: an async request is refused at once, like a synchronous one.
    let r = post_edit_async(&http, &url, form(4, 4, 2)).await;
    assert!(r.headers().get("retry-after").is_some());
    assert_eq!(error_type(r, 429).await, "overloaded");

    let r = delete(&http, &format!("{url}/jobs/{first}")).await;
    let cancelled: Value = r.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    assert!(
        cancelled["started_at"].is_null() && cancelled["step"].is_null(),
        "it never ran: {cancelled}"
    );
    let info: Value = get_json(&http, &format!("{url}/info")).await;
    assert_eq!(info["queue_depth"], 1, "it left the queue at once");
    assert_eq!(job_status(&http, &url, &second).await["position"], 0);
    let third = submit(&http, &url, form(4, 4, 2)).await;

    // Cancelling the blocker lets the others run.
    let r = delete(&http, &format!("{url}/jobs/{blocker}")).await;
    assert_eq!(r.status(), 200);
    for id in [&second, &third] {
        wait_for_status(&http, &url, id, "done", Duration::from_secs(30)).await;
    }
    let r = get(&http, &format!("{url}/jobs/{first}")).await;
    assert_eq!(error_type(r, 404).await, "job_not_found", "deleted");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_cancelled_inside_a_shared_batch_does_not_stop_the_others() {
    let TestServer { server, url, http } = TestServer::start(|args| {
        args.max_batch_size = 2;
        // Long enough for both jobs to gather into one batch.
        args.max_batch_wait_ms = 1000;
    })
    .await;

    let leaving = submit(&http, &url, form(1, 11, 30)).await;
    let staying = submit(&http, &url, form(2, 12, 30)).await;
    wait_for_job(
        &http,
        &url,
        &leaving,
        Duration::from_secs(30),
        "running",
        |s| s["status"] == "running" && s["step"].as_u64() >= Some(1),
    )
    .await;
    let r = delete(&http, &format!("{url}/jobs/{leaving}")).await;
    let cancelled: Value = r.json().await.unwrap();
    assert_eq!(cancelled["status"], "cancelled");
    let done = wait_for_job(
        &http,
        &url,
        &staying,
        Duration::from_secs(60),
        "done",
        |s| s["status"] != "queued" && s["status"] != "running",
    )
    .await;
    assert_eq!(done["status"], "done", "{done}");
    let r = get(&http, &format!("{url}/jobs/{staying}/result")).await;
    assert_eq!(
        header(&r, "x-batch-size"),
        "2",
        "the two jobs shared a batch"
    );
    let shared = r.bytes().await.unwrap();
    let alone = post_edit(&http, &url, form(2, 12, 30))
        .await
        .bytes()
        .await
        .unwrap();
    assert_eq!(shared, alone, "the cancel changed its batch-mate's result");
    // The deleted job stays gone though its batch ran to the end.
    let r = get(&http, &format!("{url}/jobs/{leaving}")).await;
    assert_eq!(error_type(r, 404).await, "job_not_found");
    let m = metrics(&http, &url).await;
    assert!(
        !m.contains("rl4pix_edits_total{outcome=\"cancelled\"}"),
        "{m}"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_jobs_are_evicted_by_count_and_by_age() {
    let TestServer { server, url, http } = TestServer::start(|args| {
        args.max_jobs = 2;
        args.job_ttl_s = 2.0;
    })
    .await;

    let mut ids = Vec::new();
    for variant in 0..3 {
        let id = submit(&http, &url, form(variant, 5, 2)).await;
        wait_for_status(&http, &url, &id, "done", Duration::from_secs(30)).await;
        ids.push(id);
    }
    let r = get(&http, &format!("{url}/jobs/{}", ids[0])).await;
    assert_eq!(
        error_type(r, 404).await,
        "job_not_found",
        "the oldest finished job is evicted past --max-jobs"
    );
    for id in &ids[1..] {
        let r = get(&http, &format!("{url}/jobs/{id}/result")).await;
        assert_eq!(r.status(), 200);
    }
    tokio::time::sleep(Duration::from_millis(2100)).await;
    for id in &ids[1..] {
        let r = get(&http, &format!("{url}/jobs/{id}/result")).await;
        assert_eq!(
            error_type(r, 404).await,
            "job_not_found",
            "evicted past --job-ttl-s"
        );
    }
    server.shutdown().await.unwrap();
}
