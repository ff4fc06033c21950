//! `POST /v1/images/edits` answers the request the official `openai` Python SDK sends, byte for
//! byte: `tests/fixtures/openai/` was recorded from `client.images.edit(...)` by
//! `tests/capture_openai_request.py`, and is replayed here against the real server with the
//! default model.

mod common;

use base64::Engine;
use serde_json::Value;

fn fixture() -> (Value, Vec<u8>) {
    let dir = common::repo_root().join("tests/fixtures/openai");
    let request: Value =
        serde_json::from_slice(&std::fs::read(dir.join("images_edit.json")).unwrap()).unwrap();
    let body = std::fs::read(dir.join(request["body_file"].as_str().unwrap())).unwrap();
    (request, body)
}

fn toy_args() -> rl4pix_server::Args {
    rl4pix_server::Args::for_model(common::repo_root().join("model/assets/toy"))
}

/// The recorded request, with its own headers (the SDK's bearer, boundary, user agent...).
async fn replay(base: &str, bearer: Option<&str>) -> reqwest::Response {
    let (request, body) = fixture();
    assert_eq!(request["method"], "POST");
    let mut builder = common::client().post(format!("{base}{}", request["path"].as_str().unwrap()));
    for pair in request["headers"].as_array().unwrap() {
        let (name, value) = (pair[0].as_str().unwrap(), pair[1].as_str().unwrap());
        // The connection's own headers belong to the recording, not to the request.
        if ["host", "content-length", "connection"].contains(&name.to_ascii_lowercase().as_str()) {
            continue;
        }
        let value = match (name.eq_ignore_ascii_case("authorization"), bearer) {
            (true, Some(token)) => format!("Bearer {token}"),
            _ => value.to_string(),
        };
        builder = builder.header(name, value);
    }
    builder.body(body).send().await.unwrap()
}

fn openai_error(body: &Value) -> (&str, &str, Option<&str>) {
    let error = &body["error"];
    assert!(
        error["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    (
        error["type"].as_str().unwrap(),
        error["code"].as_str().unwrap(),
        error["param"].as_str(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sdks_recorded_request_edits_like_post_edit() {
    let server = common::start(toy_args()).await;
    let base = server.url();

    let response = replay(&base, None).await;
    assert_eq!(response.status(), 200);
    let answer: Value = response.json().await.unwrap();
    assert!(
        answer["created"].as_u64().unwrap() > 1_700_000_000,
        "{answer}"
    );
    assert_eq!(answer["output_format"], "png");
    assert_eq!(answer["size"], "128x128");
    let data = answer["data"].as_array().unwrap();
    assert_eq!(data.len(), 1);
    assert_eq!(
        data[0]["seed"], 7,
        "the SDK's extra_body seed reached the edit"
    );
    let png = base64::engine::general_purpose::STANDARD
        .decode(data[0]["b64_json"].as_str().unwrap())
        .unwrap();
    let image = common::decode_png(&png);
    assert_eq!(image.dimensions(), (128, 128));

    // The same edit through the native route gives the same pixels: one pipeline, two dialects.
    let input =
        std::fs::read(common::repo_root().join("model/assets/toy/grid/7-input.png")).unwrap();
    let native = common::post_edit(
        &common::client(),
        &base,
        common::edit_form(
            input.clone(),
            "colour the square orange",
            &[("seed", "7".into()), ("adapter", "none".into())],
        ),
    )
    .await;
    assert_eq!(native.status(), 200);
    let native = common::decode_png(&native.bytes().await.unwrap());
    assert!(
        native == image,
        "/v1/images/edits and /edit differ for the same seed"
    );
    let untouched = common::decode_png(&input);
    assert!(image != untouched, "the edit changed nothing");

    // n images: consecutive seeds, batched together.
    let form = || {
        reqwest::multipart::Form::new()
            .part(
                "image",
                reqwest::multipart::Part::bytes(input.clone())
                    .file_name("in.png")
                    .mime_str("image/png")
                    .unwrap(),
            )
            .text("prompt", "colour the square orange")
    };
    let two: Value = common::send_json(
        common::client()
            .post(format!("{base}/v1/images/edits"))
            .multipart(
                form()
                    .text("n", "2")
                    .text("seed", "7")
                    .text("size", "64x48")
                    .text("steps", "4"),
            ),
    )
    .await;
    assert_eq!(two["size"], "64x48", "{two}");
    let seeds: Vec<&Value> = two["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| &d["seed"])
        .collect();
    assert_eq!(seeds, [7, 8]);
    let first = base64::engine::general_purpose::STANDARD
        .decode(two["data"][0]["b64_json"].as_str().unwrap())
        .unwrap();
    assert_eq!(common::decode_png(&first).dimensions(), (64, 48));

    // Errors come in OpenAI's shape, with the field at fault.
    let cases: Vec<(reqwest::multipart::Form, u16, &str, Option<&str>)> = vec![
        (
            reqwest::multipart::Form::new().part(
                "image",
                reqwest::multipart::Part::bytes(input.clone()).file_name("in.png"),
            ),
            422,
            "invalid_parameter",
            Some("prompt"),
        ),
        (
            form().text("model", "dall-e-2"),
            404,
            "model_not_found",
            Some("model"),
        ),
        (
            form().part(
                "mask",
                reqwest::multipart::Part::bytes(input.clone()).file_name("m.png"),
            ),
            400,
            "bad_request",
            Some("mask"),
        ),
        (
            form().text("response_format", "url"),
            400,
            "bad_request",
            Some("response_format"),
        ),
        (form().text("n", "11"), 422, "invalid_parameter", Some("n")),
        (
            form().text("size", "big"),
            422,
            "invalid_parameter",
            Some("size"),
        ),
        (form().text("colour", "red"), 422, "invalid_parameter", None),
        (
            reqwest::multipart::Form::new()
                .part(
                    "image",
                    reqwest::multipart::Part::bytes(b"text".to_vec()).file_name("a.png"),
                )
                .text("prompt", "x"),
            415,
            "unsupported_media_type",
            None,
        ),
    ];
    for (form, status, code, param) in cases {
        let response = common::send(
            common::client()
                .post(format!("{base}/v1/images/edits"))
                .multipart(form),
        )
        .await;
        assert_eq!(response.status().as_u16(), status);
        let body: Value = response.json().await.unwrap();
        let (kind, got_code, got_param) = openai_error(&body);
        assert_eq!(kind, "invalid_request_error", "{body}");
        assert_eq!((got_code, got_param), (code, param), "{body}");
    }
    let not_multipart = common::send(
        common::client()
            .post(format!("{base}/v1/images/edits"))
            .json(&serde_json::json!({"prompt": "x"})),
    )
    .await;
    assert_eq!(not_multipart.status(), 415);
    openai_error(&not_multipart.json().await.unwrap());

    let models: Value = common::get_json(&common::client(), &format!("{base}/v1/models")).await;
    assert_eq!(models["object"], "list");
    assert_eq!(models["data"][0]["id"], "toy");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_openai_api_key_the_bearer_must_match() {
    let mut args = toy_args();
    args.openai_api_key = Some("sk-right".into());
    args.default_steps = 2;
    let server = common::start(args).await;
    let base = server.url();

    let refused = replay(&base, None).await;
    assert_eq!(refused.status(), 401);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(openai_error(&body).0, "authentication_error");
    let models = common::get(&common::client(), &format!("{base}/v1/models")).await;
    assert_eq!(models.status(), 401, "no bearer at all");

    let accepted = replay(&base, Some("sk-right")).await;
    assert_eq!(accepted.status(), 200);
    server.shutdown().await.unwrap();
}
