//! `rl4pix-train reproduce` as a user runs it, on the sd1 fixture pipeline (random weights) with a
//! tiny synthetic world: the table files and their structure, rerunning resumes instead of redoing,
//! and clean errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::SystemTime;

mod common;
use common::{assert_clean_failure, stderr};

use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/fixtures"))
}

/// Tiny settings: 3 training sessions, one test set of 2 sessions and a validation world of 2, all
/// 16x16 (unless `extra` has `--size`), 2 samples x 2 steps per epoch, 2-step evaluation, the `cpu`
/// preset (independent draws).
fn reproduce(out: &Path, table: &str, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_rl4pix-train"))
        .args(["reproduce", "--table", table, "--model"])
        .arg(fixtures().join("pipelines/sd1"))
        .arg("--out")
        .arg(out)
        .args(if extra.contains(&"--size") {
            &[][..]
        } else {
            &["--size", "16"][..]
        })
        .args([
            "--preset",
            "cpu",
            "--test-seed",
            "12345",
            "--validation-count",
            "2",
            "--train-count",
            "3",
            "--test-count",
            "2",
            "--steps",
            "2",
            "--threads",
            "1",
        ])
        .args([
            "--set",
            "sample.num_steps=2",
            "--set",
            "sample.batch_size=2",
            "--set",
            "sample.num_batches_per_epoch=1",
            "--set",
            "train.batch_size=2",
            "--set",
            "per_prompt_stat_tracking.min_count=2",
            "--set",
            "data.max_prompts=4",
            "--set",
            "save_freq=1",
            "--set",
            "validation.every=1",
            "--set",
            "validation.max_turns=2",
            "--set",
            "validation.steps=2",
        ])
        .args(extra)
        .env_remove("RUST_BACKTRACE")
        .env("RUST_LOG", "info")
        .output()
        .expect("run rl4pix-train")
}

fn read_json(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap()
}

fn modified(path: &Path) -> SystemTime {
    std::fs::metadata(path).unwrap().modified().unwrap()
}

fn rows(table: &Value) -> &Vec<Value> {
    table["test_sets"][0]["rows"].as_array().unwrap()
}

fn row_names(table: &Value) -> Vec<String> {
    table["test_sets"][0]["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["name"].as_str().unwrap().to_string())
        .collect()
}

fn assert_metrics(row: &Value) {
    for setting in ["all_turn", "final_turn"] {
        let m = &row[setting];
        assert!(m["count"].as_u64().unwrap() > 0, "{row}");
        for key in ["l1", "l2", "ssim", "psnr", "edit_l1", "preserve_l1"] {
            assert!(m[key].is_number(), "{setting}.{key} in {row}");
        }
    }
}

/// The embedded model's CLIP and the image side it takes, when the build has one.
fn toy_clip() -> Option<(PathBuf, u64)> {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../model/assets/toy/clip"
    ));
    let text = std::fs::read_to_string(dir.join("config.json")).ok()?;
    let config: Value = serde_json::from_str(&text).ok()?;
    let size = config["vision_config"]["image_size"].as_u64()?;
    Some((dir, size))
}

#[test]
fn table1_writes_both_files_and_a_rerun_resumes() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("repro");
    // CLIP-T with the embedded model's CLIP, on a world of the size it takes.
    let clip_args: Vec<String> = match toy_clip() {
        Some((dir, size)) => vec![
            "--clip".into(),
            dir.display().to_string(),
            "--size".into(),
            size.to_string(),
        ],
        None => vec!["--no-clip".into()],
    };
    let mut first: Vec<&str> = vec!["--set", "num_epochs=2"];
    first.extend(clip_args.iter().map(String::as_str));
    let o = reproduce(&out, "1", &first);
    assert!(o.status.success(), "{}", stderr(&o));

    let table = read_json(&out.join("table1.json"));
    assert_eq!(table["table"], 1);
    assert_eq!(row_names(&table), ["base", "both", "oracle", "identity"]);
    assert_eq!(table["test_sets"].as_array().unwrap().len(), 1);
    assert_eq!(table["test_sets"][0]["seed"], 12345);
    assert_eq!(table["train_world"]["seed"], 11);
    assert_eq!(table["validation_set"]["seed"], 777);
    assert_eq!(table["sampler"]["kind"], "eval");
    for row in rows(&table) {
        assert_metrics(row);
    }
    let run = &table["runs"][0];
    assert_eq!(run["name"], "both");
    assert_eq!(run["epochs"], 2);
    assert_eq!(run["reward"], "1·L_att -1·L_clip");
    assert!(run["reward_first_tenth"].is_number());
    assert!(run["train_l1_last_tenth"].is_number());
    // Validation chose the evaluated adapter: its best, kept under best/.
    assert!(run["selected_epoch"].as_u64().unwrap() <= 2);
    assert!(run["adapter"]
        .as_str()
        .unwrap()
        .ends_with("best/adapter.safetensors"));
    assert_eq!(table["runs"][1]["reward"], "-100·L1(target)");
    let adapter_row = &rows(&table)[1];
    assert!(adapter_row["verdict"]["wins"].is_array());
    assert!(adapter_row["verdict"]["pass"].is_boolean());
    // The identity baseline preserves everything outside the mask exactly.
    assert_eq!(rows(&table)[3]["all_turn"]["preserve_l1"], 0.0);
    if toy_clip().is_some() {
        for row in rows(&table) {
            assert!(row["all_turn"]["clip_t"].is_number(), "{row}");
        }
    }

    let md = std::fs::read_to_string(out.join("table1.md")).unwrap();
    for needle in [
        "| model | turns | L1 ↓ | L2 ↓ | SSIM ↑ | PSNR ↑ | CLIP-T ↑ | edit-region L1 ↓ | preservation L1 ↓ |",
        "| base |",
        "| + RL, the paper's reward (attention + clip) (1·L_att -1·L_clip) |",
        "| + RL, ORACLE ablation (-L1 to the target; not the paper's method)",
        "| identity (no edit) |",
        "All turns",
        "Final turn",
        "reward, first tenth",
        "Pass (>= 3 of 4",
        "Passing on every test set",
    ] {
        assert!(md.contains(needle), "`{needle}` missing from:\n{md}");
    }

    // Rerunning keeps the data, the finished run and the evaluations.
    let run = out.join("runs/both");
    let eval = out.join("eval/test-12345");
    let log = std::fs::read_to_string(run.join("ddpo.jsonl")).unwrap();
    let adapter_time = modified(&run.join("adapter.safetensors"));
    let base_time = modified(&eval.join("base.json"));
    let rl_time = modified(&eval.join("both.json"));
    let world_time = modified(&out.join("world/edit_sessions.json"));
    let o = reproduce(&out, "1", &first);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("already finished"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read_to_string(run.join("ddpo.jsonl")).unwrap(),
        log
    );
    assert_eq!(modified(&run.join("adapter.safetensors")), adapter_time);
    assert_eq!(modified(&eval.join("base.json")), base_time);
    assert_eq!(modified(&eval.join("both.json")), rl_time);
    assert_eq!(modified(&out.join("world/edit_sessions.json")), world_time);
    assert_eq!(std::fs::read_to_string(out.join("table1.md")).unwrap(), md);

    // More epochs continue the run from its checkpoint: the first two epochs are not redone.
    let mut longer_args = first.clone();
    longer_args[1] = "num_epochs=3";
    let o = reproduce(&out, "1", &longer_args);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("DDPO run resumed"), "{}", stderr(&o));
    let longer = std::fs::read_to_string(run.join("ddpo.jsonl")).unwrap();
    assert_eq!(longer.lines().count(), 3);
    assert!(longer.starts_with(&log), "the first epochs were redone");
    assert_eq!(modified(&eval.join("base.json")), base_time);
    let table = read_json(&out.join("table1.json"));
    assert_eq!(table["runs"][0]["epochs"], 3);

    // Another configuration for the same run folder is refused, naming the key.
    let mut other = longer_args.clone();
    other.extend(["--set", "train.learning_rate=1e-3"]);
    let o = reproduce(&out, "1", &other);
    assert_clean_failure(&o, &["train.learning_rate", "another configuration"]);
}

#[test]
fn table2_runs_the_ablation_and_ours() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("repro");
    let o = reproduce(
        &out,
        "2",
        &[
            "--set",
            "num_epochs=1",
            "--set",
            "reward.localization_weight=1",
            "--no-clip",
            "--eval-sampler",
            "policy",
            "--no-validation",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let table = read_json(&out.join("table2.json"));
    assert_eq!(table["table"], 2);
    assert_eq!(
        row_names(&table),
        ["base", "attn", "clip", "both", "ours", "identity"]
    );
    assert!(table["clip"].is_null());
    assert!(table["validation_set"].is_null());
    assert_eq!(table["sampler"]["kind"], "policy");
    assert_eq!(table["sampler"]["scheduler"], "ddim");
    for row in rows(&table) {
        assert_metrics(row);
        assert!(row["all_turn"]["clip_t"].is_null());
    }
    let rewards: Vec<&str> = table["runs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["reward"].as_str().unwrap())
        .collect();
    assert_eq!(
        rewards,
        [
            "1·L_att",
            "-1·L_clip",
            "1·L_att -1·L_clip",
            "1·L_att -1·L_clip +1·L_loc"
        ]
    );
    for run in table["runs"].as_array().unwrap() {
        assert_eq!(run["epochs"], 1);
        assert!(
            run["selected_epoch"].is_null(),
            "no validation: the last adapter"
        );
        assert!(run["reward_first_tenth"].is_number());
    }
    for row in &rows(&table)[1..5] {
        assert!(row["verdict"]["pass"].is_boolean());
    }
    let md = std::fs::read_to_string(out.join("table2.md")).unwrap();
    for needle in [
        "| + RL, attention only (1·L_att) |",
        "| + RL, clip only (-1·L_clip) |",
        "| + RL, ours (1·L_att -1·L_clip +1·L_loc) |",
        "| attention only | 1·L_att | 1 | last |",
        "the DDPO policy's",
    ] {
        assert!(md.contains(needle), "`{needle}` missing from:\n{md}");
    }
}

#[test]
fn bad_arguments_fail_cleanly_before_any_work() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("repro");
    let o = reproduce(&out, "1", &["--test-seed", "11"]);
    assert_clean_failure(&o, &["--test-seed", "unseen"]);
    let o = reproduce(&out, "1", &["--set", "train.learnig_rate=1"]);
    assert_clean_failure(&o, &["train.learnig_rate"]);
    let o = reproduce(
        &out,
        "1",
        &[
            "--set",
            "reward.alpha=0",
            "--set",
            "reward.attention_weight=0",
        ],
    );
    assert_clean_failure(&o, &["reward", "no term"]);
    let o = reproduce(&out, "3", &[]);
    assert_clean_failure(&o, &["--table"]);

    // A folder written with other parameters is refused, not overwritten.
    std::fs::create_dir_all(out.join("world")).unwrap();
    std::fs::write(
        out.join("world/rl4pix_synth.json"),
        r#"{"seed": 7, "count": 3, "size": 16, "complete": true}"#,
    )
    .unwrap();
    let o = reproduce(&out, "1", &[]);
    assert_clean_failure(&o, &["world", "seed 7", "another --out"]);
    std::fs::remove_file(out.join("world/rl4pix_synth.json")).unwrap();
    std::fs::write(out.join("world/notes.txt"), "mine").unwrap();
    let o = reproduce(&out, "1", &[]);
    assert_clean_failure(&o, &["world", "not empty"]);
    assert!(
        !out.join("test-12345").exists(),
        "nothing else should be written"
    );
}
