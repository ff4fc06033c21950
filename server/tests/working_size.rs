//! Edits run at the model's recorded working size by default and come back at the input's size;
//! `working_size=input` runs at the input's own size; the answer says which ran.

mod common;

use image::RgbImage;

async fn edit(base: &str, png: Vec<u8>, fields: &[(&str, String)]) -> reqwest::Response {
    common::post_edit(
        &common::client(),
        base,
        common::edit_form(png, "colour the square orange", fields),
    )
    .await
}

fn working_size(response: &reqwest::Response) -> String {
    response.headers()["x-working-size"]
        .to_str()
        .unwrap()
        .to_string()
}

/// Share of pixels identical to the input's.
fn unchanged_share(a: &RgbImage, b: &RgbImage) -> f64 {
    let same = a.pixels().zip(b.pixels()).filter(|(p, q)| p == q).count();
    same as f64 / (a.width() * a.height()) as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_model_runs_at_its_size_and_answers_at_the_inputs() {
    let mut args = rl4pix_server::Args::for_model(common::repo_root().join("model/assets/toy"));
    args.default_steps = 8;
    let server = common::start(args).await;
    let base = server.url();
    let info: serde_json::Value =
        common::get_json(&common::client(), &format!("{base}/info")).await;
    assert_eq!(info["model"]["working_size"], 32);
    assert_eq!(info["limits"]["working_size"], "model");

    let input_png =
        std::fs::read(common::repo_root().join("model/assets/toy/grid/7-input.png")).unwrap();
    let input = common::decode_png(&input_png);
    let seed = [("seed", "3".to_string())];

    let kept = edit(&base, input_png.clone(), &seed).await;
    assert_eq!(kept.status(), 200);
    assert_eq!(working_size(&kept), "32x32");
    let kept = common::decode_png(&kept.bytes().await.unwrap());
    assert_eq!(kept.dimensions(), (128, 128));

    let plain = edit(
        &base,
        input_png.clone(),
        &[seed[0].clone(), ("keep_input", "false".into())],
    )
    .await;
    assert_eq!(working_size(&plain), "32x32");
    let plain = common::decode_png(&plain.bytes().await.unwrap());
    // The background the model left alone keeps the input's exact pixels only when asked to.
    let (kept_share, plain_share) = (
        unchanged_share(&kept, &input),
        unchanged_share(&plain, &input),
    );
    println!(
        "pixels identical to the input: keep_input {kept_share:.3}, plain scaling {plain_share:.3}"
    );
    assert!(kept_share > 0.5, "{kept_share}");
    assert!(
        kept_share > plain_share + 0.2,
        "{kept_share} vs {plain_share}"
    );
    assert!(kept != input, "the edit changed nothing");

    let own = edit(
        &base,
        input_png.clone(),
        // Few steps: at 128x128 the model is slow, and only the size is checked here.
        &[
            seed[0].clone(),
            ("working_size", "input".into()),
            ("steps", "2".into()),
        ],
    )
    .await;
    assert_eq!(working_size(&own), "128x128");
    assert_eq!(
        common::decode_png(&own.bytes().await.unwrap()).dimensions(),
        (128, 128)
    );

    // Another aspect ratio: about 32x32 worth of pixels on the VAE's 4-pixel grid, answered at
    // 96x64.
    let wide = common::png(&common::scene(96, 64, 2));
    let response = edit(&base, wide, &[]).await;
    assert_eq!(working_size(&response), "40x28");
    assert_eq!(
        common::decode_png(&response.bytes().await.unwrap()).dimensions(),
        (96, 64)
    );

    let bad = edit(&base, input_png, &[("working_size", "huge".into())]).await;
    assert_eq!(bad.status(), 422);
    let body: serde_json::Value = bad.json().await.unwrap();
    assert!(body["error"]
        .as_str()
        .unwrap()
        .contains("working_size must be model or input"));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_records_no_size_runs_at_the_inputs() {
    let server = common::start(common::test_args()).await;
    let response = edit(&server.url(), common::png(&common::scene(40, 24, 1)), &[]).await;
    assert_eq!(response.status(), 200);
    assert_eq!(working_size(&response), "40x24");
    server.shutdown().await.unwrap();
}
