//! Token ids must equal transformers' `CLIPTokenizer` ids as the diffusers pipeline requests them.
//! References come from `tests/make_model_fixtures.py` (transformers 5.24).

use std::path::{Path, PathBuf};

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use rl4pix_model::tokenizer::{ClipTokenizer, TokenizedPrompt};
use serde::Deserialize;
use serde_json::{json, Value};

fn fixtures() -> PathBuf {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/..")).join("tests/fixtures")
}

#[derive(Deserialize)]
struct ReferenceCase {
    text: String,
    ids: Vec<u32>,
    pad_token: String,
    pad_token_id: u32,
}

fn read_json(path: &Path) -> Result<Value> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(serde_json::from_str(&text)?)
}

/// Copies a vocab.json + merges.txt tokenizer folder with another pad token, as
/// `CLIPTokenizer.from_pretrained(dir, pad_token=...)` would see it.
fn with_pad_token(src: &Path, dst: &Path, pad_token: &str) -> Result<()> {
    for name in ["vocab.json", "merges.txt"] {
        std::fs::copy(src.join(name), dst.join(name))?;
    }
    for name in ["tokenizer_config.json", "special_tokens_map.json"] {
        let mut config = read_json(&src.join(name))?;
        config["pad_token"] = json!(pad_token);
        std::fs::write(dst.join(name), config.to_string())?;
    }
    Ok(())
}

fn mismatch_report(
    tokenizer: &ClipTokenizer,
    text: &str,
    expected: &[u32],
) -> Result<Option<String>> {
    let got = tokenizer.encode(text)?;
    Ok((got != expected).then(|| format!("{text:?}\n   got {got:?}\n  want {expected:?}")))
}

#[test]
fn clip_vocabulary_matches_transformers_for_hard_strings() -> Result<()> {
    let dir = fixtures().join("tokenizer/clip");
    let reference = read_json(&dir.join("reference.json"))?;
    let cases: Vec<ReferenceCase> = serde_json::from_value(reference["cases"].clone())?;
    ensure!(cases.len() >= 10, "too few reference cases");
    let mut pad_tokens: Vec<&str> = cases.iter().map(|c| c.pad_token.as_str()).collect();
    pad_tokens.dedup();
    ensure!(
        pad_tokens.len() == 2,
        "expected an SD-1 and an SD-2 pad token, found {pad_tokens:?}"
    );

    let mut failures = Vec::new();
    for pad_token in pad_tokens {
        let copy = tempfile::tempdir()?;
        with_pad_token(&dir, copy.path(), pad_token)?;
        let tokenizer = ClipTokenizer::from_dir(copy.path())?;
        assert_eq!(tokenizer.max_length(), 77);
        assert_eq!(tokenizer.bos_id(), 49406);
        assert_eq!(tokenizer.eos_id(), 49407);
        for case in cases.iter().filter(|c| c.pad_token == pad_token) {
            assert_eq!(
                tokenizer.pad_id(),
                case.pad_token_id,
                "pad id for {pad_token:?}"
            );
            if let Some(report) = mismatch_report(&tokenizer, &case.text, &case.ids)? {
                failures.push(format!("[pad {pad_token:?}] {report}"));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} mismatches:\n{}",
        failures.len(),
        failures.join("\n")
    );
    Ok(())
}

#[test]
fn real_vocabulary_reports_content_and_words() -> Result<()> {
    let tokenizer = ClipTokenizer::from_dir(&fixtures().join("tokenizer/clip"))?;
    let TokenizedPrompt {
        ids,
        content,
        words,
    } = tokenizer.encode_detailed("Put a  red\tcircle")?;
    // put, a, red, circle are single tokens in CLIP's vocabulary.
    assert_eq!(content, 1..5);
    assert_eq!(ids[0], tokenizer.bos_id());
    assert_eq!(ids[5], tokenizer.eos_id());
    let words: Vec<(&str, std::ops::Range<usize>)> = words
        .iter()
        .map(|w| (w.word.as_str(), w.tokens.clone()))
        .collect();
    assert_eq!(
        words,
        [("Put", 1..2), ("a", 2..3), ("red", 3..4), ("circle", 4..5)]
    );

    let long = "cat ".repeat(100);
    let prompt = tokenizer.encode_detailed(&long)?;
    assert_eq!(prompt.content, 1..76);
    assert_eq!(prompt.ids[76], tokenizer.eos_id());
    assert_eq!(
        prompt.words.len(),
        75,
        "words beyond the 75 kept tokens are omitted"
    );
    Ok(())
}

/// The pipelines' own tokenizers: sd1 ships vocab.json + merges.txt, sd2 a tokenizer.json with pad "!".
#[test]
fn pipeline_tokenizers_match_reference_ids() -> Result<()> {
    for name in ["sd1", "sd2"] {
        let root = fixtures().join("pipelines");
        let info = read_json(&root.join(format!("{name}.reference.json")))?;
        let prompts: Vec<String> = serde_json::from_value(info["text_prompts"].clone())?;
        let tensors = candle_core::safetensors::load(
            root.join(format!("{name}.reference.safetensors")),
            &Device::Cpu,
        )?;
        let expected: Vec<Vec<i64>> = tensors.get("text.ids").context("text.ids")?.to_vec2()?;
        ensure!(expected.len() == prompts.len(), "{name}: prompt count");

        let tokenizer = ClipTokenizer::from_dir(&root.join(name).join("tokenizer"))?;
        assert_eq!(
            Some(u64::from(tokenizer.pad_id())),
            info["text_pad_token_id"].as_u64(),
            "{name}: pad id"
        );
        for (prompt, expected) in prompts.iter().zip(&expected) {
            let expected: Vec<u32> = expected
                .iter()
                .map(|&id| u32::try_from(id))
                .collect::<Result<_, _>>()?;
            if let Some(report) = mismatch_report(&tokenizer, prompt, &expected)? {
                panic!("{name}: {report}");
            }
        }
    }
    Ok(())
}

/// Both backends (our BPE on sd1's files, the `tokenizers` crate on sd2's tokenizer.json, same
/// vocabulary and merges) agree on where the text's tokens and words are.
#[test]
fn bpe_and_tokenizer_json_backends_agree_on_spans() -> Result<()> {
    let root = fixtures().join("pipelines");
    let bpe = ClipTokenizer::from_dir(&root.join("sd1/tokenizer"))?;
    let json = ClipTokenizer::from_dir(&root.join("sd2/tokenizer"))?;
    for text in [
        "",
        "a photo of a cat",
        "Café crème  brûlée 🐶🔥",
        "it's I'd <|endoftext|> x",
        "hello-world, e-mail: o'clock",
        &"long words here ".repeat(30),
    ] {
        let (a, b) = (bpe.encode_detailed(text)?, json.encode_detailed(text)?);
        assert_eq!(a.content, b.content, "{text:?}");
        assert_eq!(a.words, b.words, "{text:?}");
        assert_eq!(
            a.ids[..a.content.end + 1],
            b.ids[..b.content.end + 1],
            "{text:?}"
        );
    }
    Ok(())
}

/// A word-level tokenizer.json like the toy model's, with or without a post-processor adding BOS/EOS.
fn write_word_level(dir: &Path, with_post_processor: bool) -> Result<()> {
    let vocab = json!({"<|startoftext|>": 0, "<|endoftext|>": 1, "[UNK]": 2, "put": 3, "a": 4, "red": 5, "circle": 6});
    let post_processor = if with_post_processor {
        json!({
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|startoftext|>", "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {
                "<|startoftext|>": {"id": "<|startoftext|>", "ids": [0], "tokens": ["<|startoftext|>"]},
                "<|endoftext|>": {"id": "<|endoftext|>", "ids": [1], "tokens": ["<|endoftext|>"]}
            }
        })
    } else {
        Value::Null
    };
    let special = |id: u32, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false, "rstrip": false,
               "normalized": false, "special": true})
    };
    let tokenizer = json!({
        "version": "1.0",
        "truncation": {"direction": "Right", "max_length": 3, "strategy": "LongestFirst", "stride": 0},
        "padding": null,
        "added_tokens": [special(0, "<|startoftext|>"), special(1, "<|endoftext|>")],
        "normalizer": {"type": "Lowercase"},
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": post_processor,
        "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "[UNK]"}
    });
    std::fs::write(dir.join("tokenizer.json"), tokenizer.to_string())?;
    std::fs::write(
        dir.join("tokenizer_config.json"),
        json!({"model_max_length": 8, "pad_token": "<|endoftext|>"}).to_string(),
    )?;
    Ok(())
}

#[test]
fn word_level_tokenizer_json_gets_bos_eos_exactly_once() -> Result<()> {
    for with_post_processor in [false, true] {
        let dir = tempfile::tempdir()?;
        write_word_level(dir.path(), with_post_processor)?;
        let tokenizer = ClipTokenizer::from_dir(dir.path())?;
        assert_eq!(
            (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
            (0, 1, 1)
        );
        assert_eq!(tokenizer.max_length(), 8);

        let prompt = tokenizer.encode_detailed("Put a  RED circle")?;
        assert_eq!(
            prompt.ids,
            [0, 3, 4, 5, 6, 1, 1, 1],
            "post-processor: {with_post_processor}"
        );
        assert_eq!(prompt.content, 1..5);
        let words: Vec<(&str, std::ops::Range<usize>)> = prompt
            .words
            .iter()
            .map(|w| (w.word.as_str(), w.tokens.clone()))
            .collect();
        assert_eq!(
            words,
            [("Put", 1..2), ("a", 2..3), ("RED", 3..4), ("circle", 4..5)]
        );

        // The file's own truncation (3) is ignored; ours keeps BOS + 6 tokens + EOS.
        let long = tokenizer.encode_detailed("a red zebra a red circle put a")?;
        assert_eq!(long.ids, [0, 4, 5, 2, 4, 5, 6, 1]);
        assert_eq!(long.content, 1..7);
        assert_eq!(long.words.len(), 6);

        let empty = tokenizer.encode_detailed("")?;
        assert_eq!(empty.ids, [0, 1, 1, 1, 1, 1, 1, 1]);
        assert_eq!(empty.content, 1..1);
    }
    Ok(())
}

#[test]
fn tokenizer_json_preferred_over_vocab_files() -> Result<()> {
    let dir = tempfile::tempdir()?;
    write_word_level(dir.path(), false)?;
    // A broken vocab.json next to it must not be read.
    std::fs::write(dir.path().join("vocab.json"), "not json")?;
    std::fs::write(dir.path().join("merges.txt"), "")?;
    assert_eq!(
        ClipTokenizer::from_dir(dir.path())?.encode("red")?[..3],
        [0, 5, 1]
    );
    Ok(())
}

#[test]
fn load_errors_name_the_problem() -> Result<()> {
    let empty = tempfile::tempdir()?;
    let message = ClipTokenizer::from_dir(empty.path())
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("vocab.json") && message.contains("not found"),
        "{message}"
    );

    let dir = tempfile::tempdir()?;
    write_word_level(dir.path(), false)?;
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        r#"{"bos_token": "<s>"}"#,
    )?;
    let message = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(
        message.contains("bos_token") && message.contains("<s>"),
        "{message}"
    );

    std::fs::write(dir.path().join("tokenizer_config.json"), "{")?;
    let message = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(message.contains("tokenizer_config.json"), "{message}");

    std::fs::write(dir.path().join("tokenizer_config.json"), "{}")?;
    std::fs::write(dir.path().join("tokenizer.json"), "{\"model\": 3}")?;
    let message = ClipTokenizer::from_dir(dir.path()).unwrap_err().to_string();
    assert!(message.contains("tokenizer.json"), "{message}");
    Ok(())
}
