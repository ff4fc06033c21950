//! `rl4pix-train ddpo` as a user runs it: a real process on the sd1 fixture pipeline and the
//! MagicBrush fixture folder; config errors name the key; the adapter written loads back.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::{assert_clean_failure, stderr};

use candle_core::Device;
use rl4pix_model::adapter::LoraAdapter;
use rl4pix_model::pipeline::InstructPix2Pix;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"))
}

fn ddpo(dataset: &Path, out: &Path, logdir: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rl4pix-train"))
        .args(["ddpo", "--model"])
        .arg(fixtures().join("pipelines/sd1"))
        .arg("--dataset")
        .arg(dataset)
        .arg("--out")
        .arg(out)
        .arg("--set")
        .arg(format!("logdir={}", logdir.display()))
        .args([
            "--set",
            "num_epochs=2",
            "--set",
            "sample.num_steps=3",
            "--set",
            "sample.batch_size=2",
            "--set",
            "train.batch_size=2",
        ])
        .args(extra)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run rl4pix-train")
}

#[test]
fn trains_and_writes_a_loadable_adapter_then_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("adapters/rl.safetensors");
    let logdir = tmp.path().join("run");
    let o = ddpo(&fixtures().join("magicbrush"), &out, &logdir, &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(logdir.join("ddpo.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2);
    for key in [
        "reward_mean",
        "reward_std",
        "attention_mean",
        "clip_mean",
        "approx_kl",
        "clip_fraction",
        "loss",
        "lr",
        "seconds",
    ] {
        assert!(lines[1][key].is_number(), "{key} in {}", lines[1]);
    }
    assert!(logdir.join("reward.png").is_file());
    assert!(logdir.join("config.json").is_file());

    let pipeline = InstructPix2Pix::load(&fixtures().join("pipelines/sd1"), &Device::Cpu).unwrap();
    pipeline.load_adapter(&out).unwrap();
    let adapter = LoraAdapter::load(&out, &pipeline.lora_targets(), &Device::Cpu).unwrap();
    assert_eq!(adapter.metadata.target_modules.len(), 4);

    // A fresh run into the same folder is refused: it would mix two runs' checkpoints.
    let o = ddpo(&fixtures().join("magicbrush"), &out, &logdir, &[]);
    assert_clean_failure(&o, &["logdir", "--resume"]);

    // One more epoch, resumed from the run folder's latest checkpoint.
    // (The later `--set num_epochs` wins.)
    let resume = [
        "--resume",
        logdir.to_str().unwrap(),
        "--set",
        "num_epochs=3",
    ];
    let o = ddpo(&fixtures().join("magicbrush"), &out, &logdir, &resume);
    assert!(o.status.success(), "{}", stderr(&o));
    let log = std::fs::read_to_string(logdir.join("ddpo.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 3);
}

#[test]
fn config_errors_name_the_key() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("a.safetensors");
    let run = tmp.path().join("run");
    let data = fixtures().join("magicbrush");
    let o = ddpo(&data, &out, &run, &["--set", "train.learnig_rate=1e-3"]);
    assert_clean_failure(&o, &["train.learnig_rate", "unknown key"]);
    let o = ddpo(&data, &out, &run, &["--set", "sample.eta=fast"]);
    assert_clean_failure(&o, &["sample.eta"]);
    let file = tmp.path().join("bad.toml");
    std::fs::write(&file, "[reward]\ntau = -1\n").unwrap();
    let o = ddpo(&data, &out, &run, &["--config", file.to_str().unwrap()]);
    assert_clean_failure(&o, &["reward.tau"]);
    assert!(!out.exists());
}

#[test]
fn a_dataset_without_masks_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    std::fs::create_dir_all(data.join("images/1")).unwrap();
    image::RgbImage::new(8, 8)
        .save(data.join("images/1/1-input.png"))
        .unwrap();
    image::RgbImage::new(8, 8)
        .save(data.join("images/1/1-output1.png"))
        .unwrap();
    std::fs::write(
        data.join("edit_sessions.json"),
        r#"{"1": [{"input": "1-input.png", "mask": "1-mask1.png", "instruction": "add a dot", "output": "1-output1.png"}]}"#,
    )
    .unwrap();
    let o = ddpo(
        &data,
        &tmp.path().join("a.safetensors"),
        &tmp.path().join("run"),
        &[],
    );
    assert_clean_failure(&o, &["1-mask1.png"]);
}
