//! `rl4pix-train edit` as a user runs it: real process, real files, exit codes and messages.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{assert_clean_failure, stderr};

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/pipelines"
    ))
}

fn edit(model: &Path, image: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rl4pix-train"))
        .args(["edit", "--model"])
        .arg(model)
        .arg("--image")
        .arg(image)
        .args([
            "--instruction",
            "turn the square red and add a moon",
            "--out",
        ])
        .arg(out)
        .args(["--steps", "4"])
        .args(extra)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run rl4pix-train")
}

/// A copy of the sd1 fixture pipeline that a test may break.
fn copy_model(to: &Path) {
    fn copy_dir(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            let target = to.join(entry.file_name());
            if entry.file_type().unwrap().is_dir() {
                copy_dir(&entry.path(), &target);
            } else {
                std::fs::copy(entry.path(), target).unwrap();
            }
        }
    }
    copy_dir(&fixtures().join("sd1"), to);
}

fn input() -> PathBuf {
    fixtures().join("sd1.pipeline.input.png")
}

#[test]
fn edit_writes_diffusers_image_and_attention_map() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.png");
    let attn = tmp.path().join("attn.png");
    let latents = fixtures().join("sd1.pipeline.latents.safetensors");
    let o = edit(
        &fixtures().join("sd1"),
        &input(),
        &out,
        &[
            "--scheduler",
            "ddim",
            "--init-latents",
            latents.to_str().unwrap(),
            "--attention-out",
            attn.to_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let got = image::open(&out).unwrap().to_rgb8();
    let want = image::open(fixtures().join("sd1.pipeline.output.png"))
        .unwrap()
        .to_rgb8();
    let diff = got
        .as_raw()
        .iter()
        .zip(want.as_raw())
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(diff <= 2, "differs from diffusers by {diff} levels");
    let overlay = image::open(&attn).unwrap().to_rgb8();
    assert_eq!(overlay.dimensions(), got.dimensions());
}

#[test]
fn seed_makes_edits_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let run = |name: &str, seed: &str| {
        let out = tmp.path().join(name);
        let o = edit(
            &fixtures().join("sd1"),
            &input(),
            &out,
            &["--seed", seed, "--scheduler", "euler-ancestral"],
        );
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(out).unwrap()
    };
    assert_eq!(run("a.png", "5"), run("b.png", "5"));
    assert_ne!(run("a.png", "5"), run("c.png", "6"));
}

#[test]
fn missing_model_file_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_model(&model);
    std::fs::remove_file(model.join("vae").join("config.json")).unwrap();
    let o = edit(&model, &input(), &tmp.path().join("o.png"), &[]);
    assert_clean_failure(&o, &["vae", "config.json", "not found"]);
}

#[test]
fn unsupported_config_value_names_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_model(&model);
    let path = model.join("unet").join("config.json");
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    cfg["act_fn"] = "mish".into();
    std::fs::write(&path, cfg.to_string()).unwrap();
    let o = edit(&model, &input(), &tmp.path().join("o.png"), &[]);
    assert_clean_failure(&o, &["act_fn", "mish", "unet"]);
}

#[test]
fn wrong_tensor_shape_is_named_with_both_shapes() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_model(&model);
    let path = model
        .join("unet")
        .join("diffusion_pytorch_model.safetensors");
    let dev = candle_core::Device::Cpu;
    let mut tensors = candle_core::safetensors::load(&path, &dev).unwrap();
    tensors.insert(
        "conv_out.weight".into(),
        candle_core::Tensor::zeros((4, 16, 1, 1), candle_core::DType::F32, &dev).unwrap(),
    );
    candle_core::safetensors::save(&tensors, &path).unwrap();
    let o = edit(&model, &input(), &tmp.path().join("o.png"), &[]);
    assert_clean_failure(&o, &["conv_out.weight", "[4, 16, 3, 3]", "[4, 16, 1, 1]"]);
}

#[test]
fn truncated_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_model(&model);
    let path = model
        .join("vae")
        .join("diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    let o = edit(&model, &input(), &tmp.path().join("o.png"), &[]);
    assert_clean_failure(&o, &["vae", "safetensors"]);
}

#[test]
fn an_image_that_is_not_an_image_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = tmp.path().join("photo.png");
    std::fs::write(&fake, b"GIF89a but not really an image").unwrap();
    let o = edit(
        &fixtures().join("sd1"),
        &fake,
        &tmp.path().join("o.png"),
        &[],
    );
    assert_clean_failure(&o, &["photo.png", "image"]);
    let missing = tmp.path().join("nope.png");
    let o = edit(
        &fixtures().join("sd1"),
        &missing,
        &tmp.path().join("o.png"),
        &[],
    );
    assert_clean_failure(&o, &["nope.png"]);
}

#[test]
fn bad_adapter_and_bad_latents_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    // sd2's adapter does not fit sd1's UNet.
    let adapter = fixtures().join("sd2.lora.safetensors");
    let o = edit(
        &fixtures().join("sd1"),
        &input(),
        &tmp.path().join("o.png"),
        &["--adapter", adapter.to_str().unwrap()],
    );
    assert_clean_failure(&o, &["adapter"]);
    let latents = fixtures().join("sd2.pipeline.latents.safetensors");
    let o = edit(
        &fixtures().join("sd1"),
        &input(),
        &tmp.path().join("o.png"),
        &["--init-latents", latents.to_str().unwrap()],
    );
    assert_clean_failure(&o, &["latents", "expected"]);
    assert!(!tmp.path().join("o.png").exists());
}

/// `model_index.json` → `rl4pix.sampling` sets the guidance an edit gets when it names none.
#[test]
fn the_models_own_guidance_is_the_default_and_a_bad_one_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("model");
    copy_model(&model);
    let index_path = model.join("model_index.json");
    let original = std::fs::read_to_string(&index_path).unwrap();
    let with_sampling = |guidance: f64| {
        let mut index: serde_json::Value = serde_json::from_str(&original).unwrap();
        index["rl4pix"]["sampling"] =
            serde_json::json!({"guidance_scale": guidance, "image_guidance_scale": 1.2});
        std::fs::write(&index_path, index.to_string()).unwrap();
    };
    with_sampling(3.0);
    let run = |model: &Path, name: &str, extra: &[&str]| {
        let out = tmp.path().join(name);
        let o = edit(model, &input(), &out, extra);
        assert!(o.status.success(), "{}", stderr(&o));
        std::fs::read(out).unwrap()
    };
    let own_default = run(&model, "own.png", &[]);
    let explicit = run(
        &fixtures().join("sd1"),
        "explicit.png",
        &["--guidance-scale", "3", "--image-guidance-scale", "1.2"],
    );
    let ip2p_default = run(&fixtures().join("sd1"), "ip2p.png", &[]);
    assert_eq!(own_default, explicit);
    assert_ne!(own_default, ip2p_default);
    // A flag still overrides the model's choice.
    let overridden = run(
        &model,
        "overridden.png",
        &["--guidance-scale", "7.5", "--image-guidance-scale", "1.5"],
    );
    assert_eq!(overridden, ip2p_default);

    with_sampling(-1.0);
    let o = edit(&model, &input(), &tmp.path().join("bad.png"), &[]);
    assert_clean_failure(&o, &["rl4pix.sampling.guidance_scale", "model_index.json"]);
}
