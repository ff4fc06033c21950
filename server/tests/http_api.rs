//! The edit server over real HTTP on an ephemeral loopback port, with the real (fixture) model.

mod common;

use std::time::{Duration, Instant};

use base64::Engine;
use common::*;
use rl4pix_model::pipeline::{EditParams, EditRequest, InstructPix2Pix};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_matches_the_model_and_serves_its_attention() {
    let TestServer { server, url, http } = TestServer::start(|_| {}).await;
    let input = scene(40, 24, 1);
    let instruction = "make the red square blue";
    let edit = |fields: &[(&str, String)]| {
        post_edit(&http, &url, edit_form(png(&input), instruction, fields))
    };

    let r = edit(&[("seed", "7".into()), ("steps", "4".into())]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "image/png");
    assert_eq!(header(&r, "x-seed"), "7");
    assert_eq!(header(&r, "x-adapter"), "none");
    assert_eq!(header(&r, "x-batch-size"), "1");
    header(&r, "x-queue-ms").parse::<u64>().unwrap();
    header(&r, "x-inference-ms").parse::<u64>().unwrap();
    let edit_id = header(&r, "x-edit-id").to_string();
    let served = decode_png(&r.bytes().await.unwrap());
    assert_eq!(
        served.dimensions(),
        (40, 24),
        "the output has the input's size"
    );

    // The same edit called in-process gives the same pixels.
    let model = InstructPix2Pix::load(&fixture_model(), &candle_core::Device::Cpu).unwrap();
    let params = EditParams {
        steps: 4,
        seed: 7,
        ..EditParams::default()
    };
    let direct = model
        .edit_batch(
            &[EditRequest {
                image: &input,
                instruction,
                params,
                init_latents: None,
            }],
            &[],
            &mut |_, _| true,
        )
        .unwrap();
    assert_eq!(
        served, direct[0].image,
        "served bytes differ from the model's"
    );

    // JSON in, JSON out: the same image in base64.
    let b64 = base64::engine::general_purpose::STANDARD;
    let r = send(
        http.post(format!("{url}/edit"))
            .header("accept", "application/json")
            .json(&serde_json::json!({
                "image": b64.encode(png(&input)), "instruction": instruction, "seed": 7, "steps": 4
            })),
    )
    .await;
    assert_eq!(r.status(), 200);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["seed"], 7);
    assert_eq!(
        (body["width"].as_u64(), body["height"].as_u64()),
        (Some(40), Some(24))
    );
    let json_image = decode_png(&b64.decode(body["image"].as_str().unwrap()).unwrap());
    assert_eq!(json_image, served);

    // Without a seed, a random one is drawn and echoed, and it reproduces the result.
    let r = edit(&[("output_format", "webp".into())]).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "image/webp");
    let seed: u64 = header(&r, "x-seed").parse().unwrap();
    let first = image::load_from_memory(&r.bytes().await.unwrap())
        .unwrap()
        .to_rgb8();
    let r = edit(&[("seed", seed.to_string())]).await;
    assert_eq!(
        decode_png(&r.bytes().await.unwrap()),
        first,
        "lossless WebP, same seed"
    );

    // Attention: overlay of the whole instruction, of one word, and the token table.
    let r = get(&http, &format!("{url}/attention/{edit_id}")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(header(&r, "content-type"), "image/png");
    let overlay = decode_png(&r.bytes().await.unwrap());
    assert_eq!(overlay.dimensions(), (40, 24));
    assert_ne!(overlay, input, "the heat map is drawn over the input");
    let r = get(&http, &format!("{url}/attention/{edit_id}?word=SQUARE")).await;
    assert_eq!(r.status(), 200);
    let word_overlay = decode_png(&r.bytes().await.unwrap());
    assert_ne!(
        word_overlay, overlay,
        "one word's map differs from the average"
    );
    let r = get(&http, &format!("{url}/attention/{edit_id}?word=zebra")).await;
    assert_eq!(error_type(r, 404).await, "word_not_found");
    let tokens: serde_json::Value =
        get_json(&http, &format!("{url}/attention/{edit_id}/tokens")).await;
    let words: Vec<&str> = tokens["words"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["word"].as_str().unwrap())
        .collect();
    assert_eq!(words, ["make", "the", "red", "square", "blue"]);
    assert_eq!(tokens["words"][0]["tokens"][0], 1, "after the start token");
    assert_eq!(
        (tokens["height"].as_u64(), tokens["width"].as_u64()),
        (Some(12), Some(20))
    );
    assert!(tokens["peak"].as_f64().unwrap() > 0.0);

    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_gives_the_same_bytes_alone_and_inside_a_batch_of_8() {
    let TestServer { server, url, http } = TestServer::start(|args| {
        args.max_batch_size = 8;
        // Long enough for eight concurrent requests to gather into one batch.
        args.max_batch_wait_ms = 1500;
    })
    .await;
    let request = |variant: u32, seed: u64, instruction: &'static str| {
        let http = http.clone();
        let url = url.clone();
        async move {
            let r = post_edit(
                &http,
                &url,
                edit_form(
                    png(&scene(40, 24, variant)),
                    instruction,
                    &[
                        ("seed", seed.to_string()),
                        ("guidance_scale", (3.0 + seed as f64).to_string()),
                    ],
                ),
            )
            .await;
            assert_eq!(r.status(), 200);
            let batch: usize = header(&r, "x-batch-size").parse().unwrap();
            (batch, r.bytes().await.unwrap().to_vec())
        }
    };
    let (alone_batch, alone) = request(0, 1, "add a star").await;
    assert_eq!(alone_batch, 1);

    let instructions = [
        "add a star",
        "remove it",
        "make it green",
        "put a circle on top",
    ];
    let mut tasks = Vec::new();
    for i in 0..8u32 {
        let fut = request(i, 1 + i as u64, instructions[i as usize % 4]);
        tasks.push(tokio::spawn(fut));
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let (batch, together) = &results[0];
    assert_eq!(*batch, 8, "all eight ran in one batch");
    assert_eq!(together, &alone, "bytes depend on the batch");
    // The others really were different edits.
    assert_ne!(results[1].1, alone);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_is_json_with_the_right_status_and_the_server_keeps_serving() {
    let mut args = test_args();
    args.max_body_bytes = 100_000;
    args.max_pixels = 64 * 64;
    args.max_steps = 50;
    args.api_key = Some("sesame".into());
    let adapters = fixture_adapter_dir();
    args.adapters = Some(adapters.path().to_path_buf());
    let TestServer { server, url, http } = TestServer::with_args(args).await;
    let good = png(&scene(40, 24, 2));
    let edit = || http.post(format!("{url}/edit"));
    let get_path = |path: &str| http.get(format!("{url}{path}"));
    let form = |fields: &[(&str, String)]| edit_form(good.clone(), "make it blue", fields);
    let raw_image_form = |bytes: Vec<u8>| {
        reqwest::multipart::Form::new()
            .part(
                "image",
                reqwest::multipart::Part::bytes(bytes).file_name("x"),
            )
            .text("instruction", "make it blue")
    };
    let mut truncated = good.clone();
    truncated.truncate(good.len() / 2);
    let gif = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;".to_vec();

    let cases: Vec<(&str, reqwest::RequestBuilder, u16, &str)> = vec![
        (
            "no content type",
            edit().body("x"),
            415,
            "unsupported_media_type",
        ),
        (
            "text body",
            edit().header("content-type", "text/plain").body("hi"),
            415,
            "unsupported_media_type",
        ),
        (
            "broken JSON",
            edit()
                .header("content-type", "application/json")
                .body("{\"image\":"),
            400,
            "bad_request",
        ),
        (
            "JSON without instruction",
            edit().json(&serde_json::json!({"image": "aGk="})),
            422,
            "invalid_parameter",
        ),
        (
            "JSON unknown field",
            edit().json(&serde_json::json!({"image": "aGk=", "instruction": "x", "stpes": 3})),
            422,
            "invalid_parameter",
        ),
        (
            "bad base64",
            edit().json(&serde_json::json!({"image": "%%%", "instruction": "x"})),
            400,
            "bad_request",
        ),
        (
            "broken multipart",
            edit()
                .header("content-type", "multipart/form-data; boundary=zz")
                .body("--zz\r\nnonsense"),
            400,
            "bad_request",
        ),
        (
            "no image",
            edit().multipart(reqwest::multipart::Form::new().text("instruction", "x")),
            422,
            "invalid_parameter",
        ),
        (
            "no instruction",
            edit().multipart(
                reqwest::multipart::Form::new()
                    .part("image", reqwest::multipart::Part::bytes(good.clone())),
            ),
            422,
            "invalid_parameter",
        ),
        (
            "empty instruction",
            edit().multipart(edit_form(good.clone(), "  ", &[])),
            422,
            "invalid_parameter",
        ),
        (
            "long instruction",
            edit().multipart(edit_form(good.clone(), &"a ".repeat(600), &[])),
            422,
            "invalid_parameter",
        ),
        (
            "not an image",
            edit().multipart(raw_image_form(b"hello, not an image".to_vec())),
            415,
            "unsupported_media_type",
        ),
        (
            "GIF",
            edit().multipart(raw_image_form(gif)),
            415,
            "unsupported_media_type",
        ),
        (
            "truncated PNG",
            edit().multipart(raw_image_form(truncated)),
            400,
            "invalid_image",
        ),
        (
            "100000x100000 PNG",
            edit().multipart(raw_image_form(png_claiming(100_000, 100_000))),
            413,
            "image_too_large",
        ),
        (
            "over max pixels",
            edit().multipart(raw_image_form(png(&scene(80, 64, 0)))),
            413,
            "image_too_large",
        ),
        (
            "body too large",
            edit().multipart(raw_image_form(vec![7u8; 150_000])),
            413,
            "payload_too_large",
        ),
        (
            "steps 0",
            edit().multipart(form(&[("steps", "0".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "steps over max",
            edit().multipart(form(&[("steps", "51".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "steps not a number",
            edit().multipart(form(&[("steps", "many".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "negative guidance",
            edit().multipart(form(&[("guidance_scale", "-1".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "huge guidance",
            edit().multipart(form(&[("guidance_scale", "1e9".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "NaN image guidance",
            edit().multipart(form(&[("image_guidance_scale", "NaN".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "bad seed",
            edit().multipart(form(&[("seed", "-5".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "bad scheduler",
            edit().multipart(form(&[("scheduler", "pndm".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "bad output format",
            edit().multipart(form(&[("output_format", "gif".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "unknown field",
            edit().multipart(form(&[("strength", "1".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "repeated field",
            edit().multipart(form(&[("steps", "2".into()), ("steps", "3".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "adapter path",
            edit().multipart(form(&[("adapter", "../../etc/passwd".into())])),
            422,
            "invalid_parameter",
        ),
        (
            "unknown adapter",
            edit().multipart(form(&[("adapter", "nope".into())])),
            404,
            "adapter_not_found",
        ),
        ("unknown route", get_path("/nope"), 404, "not_found"),
        ("wrong method", get_path("/edit"), 405, "method_not_allowed"),
        (
            "unknown edit",
            get_path("/attention/0123"),
            404,
            "edit_not_found",
        ),
        (
            "unknown edit tokens",
            get_path("/attention/0123/tokens"),
            404,
            "edit_not_found",
        ),
        (
            "admin without key",
            get_path("/adapters"),
            401,
            "unauthorized",
        ),
        (
            "admin wrong key",
            get_path("/adapters").bearer_auth("open"),
            401,
            "unauthorized",
        ),
    ];
    for (name, request, status, kind) in cases {
        let started = Instant::now();
        let response = request.send().await.unwrap();
        let got_status = response.status().as_u16();
        assert_eq!(got_status, status, "{name}: status");
        assert_eq!(
            error_type(response, status).await,
            kind,
            "{name}: error_type"
        );
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{name}: answered slowly"
        );
        let health = get(&http, &format!("{url}/health")).await;
        assert_eq!(health.status(), 200, "{name}: not serving afterwards");
    }

    // Still edits, with and without the adapter, and they differ.
    let plain = send(edit().multipart(form(&[("seed", "3".into())]))).await;
    assert_eq!(plain.status(), 200);
    let with_adapter = send(edit().multipart(form(&[
        ("seed", "3".into()),
        ("adapter", "sd1.lora".into()),
    ])))
    .await;
    assert_eq!(with_adapter.status(), 200);
    assert_eq!(header(&with_adapter, "x-adapter"), "sd1.lora");
    assert_ne!(
        plain.bytes().await.unwrap(),
        with_adapter.bytes().await.unwrap()
    );
    let listed: serde_json::Value =
        send_json(http.get(format!("{url}/adapters")).bearer_auth("sesame")).await;
    assert_eq!(listed[0]["name"], "broken");
    assert_eq!(listed[0]["status"], "refused");
    assert!(listed[0]["error"].as_str().is_some_and(|e| !e.is_empty()));
    assert_eq!(listed[1]["name"], "sd1.lora");
    assert_eq!(listed[1]["status"], "loaded");
    assert_eq!(listed[1]["rank"], 4);
    let r = send(edit().multipart(form(&[("adapter", "broken".into())]))).await;
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error_type"], "adapter_not_found");
    assert!(
        body["error"].as_str().unwrap().contains("was refused"),
        "{body}"
    );
    server.shutdown().await.unwrap();
}

/// A folder holding only the fixture adapter.
fn fixture_adapter_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(fixture_adapter(), dir.path().join("sd1.lora.safetensors")).unwrap();
    // A truncated copy is refused at start and named in the listing; the good one serves.
    let bytes = std::fs::read(fixture_adapter()).unwrap();
    std::fs::write(
        dir.path().join("broken.safetensors"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overload_is_answered_429_at_once_and_never_hangs() {
    let TestServer { server, url, http } = TestServer::start(|args| {
        args.max_queue = 2;
        args.max_batch_size = 1;
        args.default_steps = 30;
    })
    .await;
    let body = png(&scene(40, 24, 3));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..12u64 {
        let (http, url, body) = (http.clone(), url.clone(), body.clone());
        tasks.push(tokio::spawn(async move {
            let sent = Instant::now();
            let r = post_edit(
                &http,
                &url,
                edit_form(body, "add a star", &[("seed", i.to_string())]),
            )
            .await;
            let status = r.status().as_u16();
            let retry_after = r
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let kind = if status == 429 {
                Some(error_type(r, 429).await)
            } else {
                None
            };
            (status, sent.elapsed(), retry_after, kind)
        }));
    }
    let mut ok = 0;
    let mut refused = 0;
    for t in tasks {
        let (status, elapsed, retry_after, kind) = t.await.unwrap();
        match status {
            200 => ok += 1,
            429 => {
                refused += 1;
                assert!(elapsed < Duration::from_secs(2), "429 took {elapsed:?}");
                let seconds: u64 = retry_after.expect("Retry-After").parse().unwrap();
                assert!((1..=60).contains(&seconds));
                assert_eq!(kind.as_deref(), Some("overloaded"));
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(
        refused >= 1,
        "twelve concurrent requests against a queue of two"
    );
    assert!(ok >= 2, "the queued requests succeed, got {ok}");
    assert!(started.elapsed() < Duration::from_secs(60));
    let r = post_edit(
        &http,
        &url,
        edit_form(body, "add a star", &[("steps", "2".into())]),
    )
    .await;
    assert_eq!(r.status(), 200, "serves again after the burst");
    let metrics = metrics(&http, &url).await;
    assert!(
        metrics.contains(&format!(
            "rl4pix_edits_total{{outcome=\"rejected\"}} {refused}"
        )),
        "{metrics}"
    );
    assert!(metrics
        .contains("rl4pix_http_requests_total{method=\"POST\",route=\"/edit\",status=\"429\"}"));
    assert!(metrics.contains("rl4pix_batch_size_bucket"));
    assert!(metrics.contains("rl4pix_queue_depth 0"));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_or_times_out_frees_its_slot() {
    let server = start_with(|args| {
        args.max_batch_size = 1;
        args.max_steps = 900;
    })
    .await;
    let url = server.url();
    let body = png(&scene(40, 24, 4));

    // 900 steps would take tens of seconds; the client gives up after 300 ms.
    let impatient = reqwest::Client::builder()
        .timeout(Duration::from_millis(300))
        .build()
        .unwrap();
    let r = impatient
        .post(format!("{url}/edit"))
        .multipart(edit_form(
            body.clone(),
            "add a star",
            &[("steps", "900".into())],
        ))
        .send()
        .await;
    if let Ok(r) = r {
        panic!(
            "expected the client to time out, got {} {:?}",
            r.status(),
            r.text().await
        );
    }
    let started = Instant::now();
    let http = client();
    let r = post_edit(
        &http,
        &url,
        edit_form(body.clone(), "add a star", &[("steps", "2".into())]),
    )
    .await;
    assert_eq!(r.status(), 200);
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "the abandoned edit kept the worker busy: {:?}",
        started.elapsed()
    );
    let metrics = metrics(&http, &url).await;
    assert!(
        metrics.contains("rl4pix_edits_total{outcome=\"cancelled\"} 1"),
        "{metrics}"
    );
    server.shutdown().await.unwrap();

    // A request past the server's own timeout gets 504 and its work is dropped.
    let server = start_with(|args| {
        args.max_steps = 900;
        args.request_timeout_s = 0.5;
    })
    .await;
    let url = server.url();
    let r = post_edit(
        &http,
        &url,
        edit_form(body, "add a star", &[("steps", "900".into())]),
    )
    .await;
    assert_eq!(error_type(r, 504).await, "timeout");
    let ready = get(&http, &format!("{url}/ready")).await;
    assert_eq!(ready.status(), 200);
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn info_health_ready_docs_and_openapi() {
    let TestServer { server, url, http } = TestServer::start(|_| {}).await;
    let health: serde_json::Value = get_json(&http, &format!("{url}/health")).await;
    assert_eq!(health["status"], "ok");
    let ready = get(&http, &format!("{url}/ready")).await;
    assert_eq!(ready.status(), 200);
    let info: serde_json::Value = get_json(&http, &format!("{url}/info")).await;
    assert_eq!(info["model"]["model"], "sd1");
    assert_eq!(info["model"]["device"], "cpu");
    assert_eq!(info["model"]["dtype"], "f32");
    assert_eq!(info["model"]["vae_scale_factor"], 2);
    // The fixture records no guidance of its own: InstructPix2Pix's.
    assert_eq!(info["model"]["default_guidance_scale"], 7.5);
    assert_eq!(info["model"]["default_image_guidance_scale"], 1.5);
    assert_eq!(info["limits"]["max_body_bytes"], 20 * 1024 * 1024);
    assert_eq!(info["version"], env!("CARGO_PKG_VERSION"));
    let spec: serde_json::Value = get_json(&http, &format!("{url}/openapi.json")).await;
    assert!(spec["openapi"].as_str().unwrap().starts_with("3.1"));
    assert!(spec["paths"]["/edit"]["post"].is_object());
    let docs = get(&http, &format!("{url}/docs")).await;
    assert_eq!(docs.status(), 200);
    let page = docs.text().await.unwrap();
    assert!(
        page.contains("/openapi.json") && !page.contains("https://"),
        "self-contained page"
    );
    server.shutdown().await.unwrap();
}

/// A PNG of `img` carrying `extra` bytes of text metadata before its end: large in bytes, small in
/// pixels.
fn png_with_text_chunk(img: &image::RgbImage, extra: usize) -> Vec<u8> {
    let mut bytes = png(img);
    let iend = bytes.len() - 12;
    let mut data = b"Comment\0".to_vec();
    data.resize(8 + extra, b'x');
    let mut chunk = (data.len() as u32).to_be_bytes().to_vec();
    let mut typed = b"tEXt".to_vec();
    typed.extend_from_slice(&data);
    chunk.extend_from_slice(&typed);
    chunk.extend_from_slice(&crc32fast::hash(&typed).to_be_bytes());
    bytes.splice(iend..iend, chunk);
    bytes
}

#[tokio::test]
async fn a_multipart_body_over_two_mib_is_read_under_the_configured_limit() {
    // 3 MiB in a 40x24 image: the body limit is --max-body-bytes (20 MiB by default), not a
    // framework default.
    let server = start(test_args()).await;
    let url = server.url();
    let big = png_with_text_chunk(&scene(40, 24, 1), 3 << 20);
    assert!(big.len() > 3 << 20);
    let r = post_edit(
        &client(),
        &url,
        edit_form(big, "make it blue", &[("steps", "2".into())]),
    )
    .await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap());
    server.shutdown().await.unwrap();
}
