//! The CLIP text encoder's last hidden state must match transformers' `CLIPTextModel` on the
//! fixture pipelines (sd1: quick_gelu, sd2: gelu). References from `tests/make_model_fixtures.py`.

use anyhow::{Context, Result};
use candle_core::{DType, Tensor};
use rl4pix_model::text_encoder::{ClipTextConfig, ClipTextEncoder};
use rl4pix_model::tokenizer::ClipTokenizer;
use rl4pix_model::ModelError;

mod common;
use common::{device, pipelines_dir};

/// max |a - b| / max |b|.
fn relative_error(actual: &Tensor, expected: &Tensor) -> Result<f32> {
    let diff: f32 = (actual - expected)?.abs()?.max_all()?.to_scalar()?;
    let scale: f32 = expected.abs()?.max_all()?.to_scalar()?;
    Ok(diff / scale)
}

#[test]
fn last_hidden_state_matches_transformers() -> Result<()> {
    for (name, hidden_act) in [("sd1", "quick_gelu"), ("sd2", "gelu")] {
        let root = pipelines_dir();
        let encoder =
            ClipTextEncoder::load(&root.join(name).join("text_encoder"), DType::F32, &device())?;
        assert_eq!(
            encoder.config.hidden_act, hidden_act,
            "{name}: fixture covers this activation"
        );
        let reference = candle_core::safetensors::load(
            root.join(format!("{name}.reference.safetensors")),
            &device(),
        )?;
        let ids = reference.get("text.ids").context("text.ids")?;
        let expected = reference.get("text.hidden").context("text.hidden")?;

        let hidden = encoder.forward(&ids.to_dtype(DType::U32)?)?;
        assert_eq!(hidden.dims(), expected.dims(), "{name}");
        let error = relative_error(&hidden, expected)?;
        eprintln!("{name}: relative error {error:e}");
        assert!(error <= 1e-4, "{name}: relative error {error}");

        // The tokenizer's ids, not only the stored ones, feed the same hidden states.
        let info: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
            root.join(format!("{name}.reference.json")),
        )?)?;
        let prompts: Vec<String> = serde_json::from_value(info["text_prompts"].clone())?;
        let tokenizer = ClipTokenizer::from_dir(&root.join(name).join("tokenizer"))?;
        let rows = prompts
            .iter()
            .map(|p| Ok(Tensor::new(tokenizer.encode(p)?.as_slice(), &device())?))
            .collect::<Result<Vec<_>>>()?;
        let (hidden, pooled) = encoder
            .transformer()
            .forward_with_pooled(&Tensor::stack(&rows, 0)?)?;
        assert!(
            relative_error(&hidden, expected)? <= 1e-4,
            "{name}: via tokenizer"
        );

        // Pooled = hidden state at the first EOS (configs here have a real eos_token_id).
        let eos = encoder.config.eos_token_id;
        for (row, prompt) in prompts.iter().enumerate() {
            let position = tokenizer
                .encode(prompt)?
                .iter()
                .position(|&id| id == eos)
                .context("no EOS")?;
            let expected_row = hidden.get(row)?.get(position)?;
            assert!(
                relative_error(&pooled.get(row)?, &expected_row)? == 0.0,
                "{name}: pooled row {row}"
            );
        }
    }
    Ok(())
}

#[test]
fn config_errors_name_file_and_key() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let source = pipelines_dir().join("sd1/text_encoder");
    std::fs::copy(
        source.join("model.safetensors"),
        dir.path().join("model.safetensors"),
    )?;
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("config.json"))?)?;
    config["hidden_act"] = "mish".into();
    std::fs::write(dir.path().join("config.json"), config.to_string())?;

    let err = ClipTextEncoder::load(dir.path(), DType::F32, &device())
        .err()
        .context("loaded a bad config")?;
    let message = err.to_string();
    assert!(
        matches!(&err, ModelError::Unsupported { key, .. } if key == "hidden_act"),
        "{message}"
    );
    assert!(
        message.contains("config.json") && message.contains("mish"),
        "{message}"
    );

    // A width that disagrees with the weights is reported against the weight file.
    config["hidden_act"] = "quick_gelu".into();
    config["hidden_size"] = 64.into();
    std::fs::write(dir.path().join("config.json"), config.to_string())?;
    let err = ClipTextEncoder::load(dir.path(), DType::F32, &device())
        .err()
        .context("loaded wrong width")?;
    assert!(matches!(err, ModelError::Weights { .. }), "{err}");

    std::fs::remove_file(dir.path().join("config.json"))?;
    let err = ClipTextEncoder::load(dir.path(), DType::F32, &device())
        .err()
        .context("loaded without config")?;
    assert!(matches!(err, ModelError::MissingFile { .. }), "{err}");
    assert!(ClipTextConfig::from_file(&source.join("config.json"))?
        .projection_dim
        .is_some());
    Ok(())
}
