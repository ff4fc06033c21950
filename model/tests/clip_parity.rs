//! CLIPModel parity with transformers on a tiny random CLIP (fixtures from
//! `tests/make_metrics_fixtures.py`): projected image and text embeddings, and the token ids.

use std::path::PathBuf;

use candle_core::{DType, Tensor};
use rl4pix_model::clip::{cosine_similarity, ClipModel};
use rl4pix_model::tokenizer::ClipTokenizer;

mod common;
use common::{device, max_abs};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/clip")
}

fn expected() -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(fixtures().join("expected.safetensors"), &device()).unwrap()
}

#[test]
fn image_and_text_embeddings_match_transformers() {
    let model = ClipModel::load(&fixtures().join("tiny"), &device()).unwrap();
    let expected = expected();
    let image = model.image_embeds(&expected["pixel_values"]).unwrap();
    let image_diff = max_abs(&(&image - &expected["image_embeds"]).unwrap());
    assert!(image_diff < 1e-4, "image embeddings differ by {image_diff}");
    let ids = expected["input_ids"].to_dtype(DType::U32).unwrap();
    let text = model.text_embeds(&ids).unwrap();
    let text_diff = max_abs(&(&text - &expected["text_embeds"]).unwrap());
    assert!(text_diff < 1e-4, "text embeddings differ by {text_diff}");
    eprintln!("max |diff|: image embeddings {image_diff:e}, text embeddings {text_diff:e}");
    // Cosines (what CLIP-T reports) agree too.
    let ours = cosine_similarity(&image, &text).unwrap();
    let theirs = cosine_similarity(&expected["image_embeds"], &expected["text_embeds"]).unwrap();
    assert!(max_abs(&(&ours - &theirs).unwrap()) < 1e-5);
}

#[test]
fn tokenizer_ids_match_transformers() {
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tiny")).unwrap();
    let texts: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("expected.json")).unwrap())
            .unwrap();
    let expected: Vec<Vec<i64>> = expected()["input_ids"].to_vec2().unwrap();
    for (text, want) in texts["texts"].as_array().unwrap().iter().zip(expected) {
        let ids: Vec<i64> = tokenizer
            .encode(text.as_str().unwrap())
            .unwrap()
            .into_iter()
            .map(i64::from)
            .collect();
        assert_eq!(ids, want, "{text}");
    }
}

#[test]
fn wrong_image_size_and_bad_config_are_reported() {
    let model = ClipModel::load(&fixtures().join("tiny"), &device()).unwrap();
    let wrong = Tensor::zeros((1, 3, 16, 16), DType::F32, &device()).unwrap();
    let err = model.image_embeds(&wrong).unwrap_err().to_string();
    assert!(err.contains("(1, 3, 16, 16)"), "{err}");

    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), r#"{"projection_dim": 8}"#).unwrap();
    let err = ClipModel::load(dir.path(), &device())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("config.json") && err.contains("text_config"),
        "{err}"
    );
    let err = ClipModel::load(&fixtures().join("missing"), &device())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("config.json"), "{err}");
}
