//! `rl4pix-train eval --generated` on the MagicBrush fixture against the report computed in Python
//! (`tests/make_metrics_fixtures.py`: scikit-image SSIM/PSNR, PIL resize, transformers CLIP).

use std::path::{Path, PathBuf};

use rl4pix_training::commands::eval::{run, Baseline, EvalArgs};
use rl4pix_training::commands::SamplerArgs;
use rl4pix_training::eval::EvalReport;
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn args(dataset: PathBuf, generated: PathBuf, out: &Path) -> EvalArgs {
    EvalArgs {
        dataset,
        split: None,
        generated: Some(generated),
        baseline: None,
        model: None,
        adapter: None,
        clip: Some(fixtures().join("clip/tiny")),
        json: Some(out.join("report.json")),
        markdown: Some(out.join("report.md")),
        limit: None,
        steps: None,
        sampler: SamplerArgs::default(),
        seed: 0,
        out: out.join("unused"),
    }
}

fn assert_matches_reference(report_path: &Path) {
    let ours: Value = serde_json::from_str(&std::fs::read_to_string(report_path).unwrap()).unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("magicbrush/expected_eval.json")).unwrap(),
    )
    .unwrap();
    for setting in ["all_turn", "final_turn"] {
        let (a, b) = (&ours[setting], &expected[setting]);
        assert_eq!(a["count"], b["count"], "{setting} count");
        for key in [
            "l1",
            "l2",
            "psnr",
            "ssim",
            "edit_l1",
            "preserve_l1",
            "clip_t",
        ] {
            let (x, y) = (a[key].as_f64().unwrap(), b[key].as_f64().unwrap());
            let tolerance = if key == "clip_t" { 1e-5 } else { 1e-9 };
            assert!((x - y).abs() < tolerance, "{setting}.{key}: {x} vs {y}");
        }
    }
    // The report deserialises into the typed shape too.
    let _: EvalReport = serde_json::from_value(ours).unwrap();
}

#[test]
fn generated_folder_scores_match_the_python_reference() {
    let out = tempfile::tempdir().unwrap();
    let dataset = fixtures().join("magicbrush");
    run(args(dataset.clone(), dataset.join("generated"), out.path())).unwrap();
    assert_matches_reference(&out.path().join("report.json"));
    let markdown = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(
        markdown.contains("| all turns | 3 |") && markdown.contains("| final turn | 2 |"),
        "{markdown}"
    );
}

#[test]
fn parquet_dataset_gives_the_same_pixel_metrics() {
    let out = tempfile::tempdir().unwrap();
    let mut args = args(
        fixtures().join("magicbrush_parquet"),
        fixtures().join("magicbrush/generated"),
        out.path(),
    );
    args.split = Some("test".into());
    run(args).unwrap();
    let report: EvalReport =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    let expected: Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("magicbrush/expected_eval.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(report.all_turn.count, 3);
    let l1 = report.all_turn.l1.unwrap();
    assert!((l1 - expected["all_turn"]["l1"].as_f64().unwrap()).abs() < 1e-9);
    // No local descriptions in the hub's parquet: no CLIP-T, and the key is left out.
    assert_eq!(report.all_turn.clip_t, None);
    let raw = std::fs::read_to_string(out.path().join("report.json")).unwrap();
    assert!(!raw.contains("clip_t"), "{raw}");
}

#[test]
fn missing_generated_turn_is_an_error_naming_it() {
    let out = tempfile::tempdir().unwrap();
    let generated = out.path().join("generated");
    for (session, files) in [
        ("101", &["101_1.png"][..]),
        ("202", &["202_1.png", "202_inde_2.png"][..]),
    ] {
        std::fs::create_dir_all(generated.join(session)).unwrap();
        for file in files {
            let from = fixtures()
                .join("magicbrush/generated")
                .join(session)
                .join(file);
            std::fs::copy(from, generated.join(session).join(file)).unwrap();
        }
    }
    let err = run(args(fixtures().join("magicbrush"), generated, out.path()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("session 202 turn 2") && err.contains("202_iter_2.png"),
        "{err}"
    );
}

#[test]
fn baselines_score_the_sources_and_the_targets() {
    let out = tempfile::tempdir().unwrap();
    let dataset = fixtures().join("magicbrush");
    let read = |name: &str| -> EvalReport {
        serde_json::from_str(&std::fs::read_to_string(out.path().join(name)).unwrap()).unwrap()
    };
    let mut truth = args(dataset.clone(), dataset.join("generated"), out.path());
    truth.generated = None;
    truth.clip = None;
    truth.baseline = Some(Baseline::GroundTruth);
    truth.json = Some(out.path().join("truth.json"));
    run(truth).unwrap();
    let truth = read("truth.json");
    assert_eq!(truth.all_turn.l1, Some(0.0));
    assert_eq!(truth.all_turn.edit_l1, Some(0.0));
    assert_eq!(truth.all_turn.ssim, Some(1.0));

    let mut identity = args(dataset.clone(), dataset.join("generated"), out.path());
    identity.generated = None;
    identity.clip = None;
    identity.baseline = Some(Baseline::Identity);
    identity.json = Some(out.path().join("identity.json"));
    run(identity).unwrap();
    let identity = read("identity.json");
    // Output = source: nothing changes outside the mask, and the edit region is as far from the
    // target as the source is.
    assert_eq!(identity.all_turn.preserve_l1, Some(0.0));
    let edit_l1 = identity.all_turn.edit_l1.unwrap();
    assert!(edit_l1 > 0.05, "{edit_l1}");
    assert!(identity.all_turn.l1.unwrap() > 0.0);
}

#[test]
fn limit_takes_the_first_sessions() {
    let out = tempfile::tempdir().unwrap();
    let dataset = fixtures().join("magicbrush");
    let mut args = args(dataset.clone(), dataset.join("generated"), out.path());
    args.limit = Some(1);
    args.clip = None;
    run(args).unwrap();
    let report: EvalReport =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    assert_eq!((report.all_turn.count, report.final_turn.count), (1, 1));
}

#[test]
fn model_run_writes_the_generated_layout_and_scores_it() {
    // The tiny random diffusers pipeline of the model crate's fixtures: its edits are noise, but
    // running it must write MagicBrush's layout, and scoring that layout must give the same report.
    let model = fixtures().join("pipelines/sd1");
    let data = tempfile::tempdir().unwrap();
    let world = rl4pix_training::synth::SynthWorld::new(32, 4);
    rl4pix_training::synth::write_folder(&world, data.path(), 2, 1, &|| {}).unwrap();
    let out = tempfile::tempdir().unwrap();
    let generated = out.path().join("generated");
    let mut model_args = args(data.path().to_path_buf(), generated.clone(), out.path());
    model_args.generated = None;
    model_args.model = Some(model);
    model_args.adapter = Some(fixtures().join("pipelines/sd1.lora.safetensors"));
    model_args.steps = Some(2);
    model_args.out = generated.clone();
    model_args.json = Some(out.path().join("model.json"));
    run(model_args).unwrap();
    for (index, session) in (0..2).map(|i| (i, world.session(i))) {
        let n = session.turns.len();
        let mut names = vec![format!("{}_1.png", session.id)];
        names.extend((2..=n).flat_map(|k| {
            [
                format!("{}_inde_{k}.png", session.id),
                format!("{}_iter_{k}.png", session.id),
            ]
        }));
        for name in names {
            assert!(
                generated.join(&session.id).join(&name).is_file(),
                "session {index}: {name}"
            );
        }
    }
    let rescored = args(data.path().to_path_buf(), generated, out.path());
    run(rescored).unwrap();
    assert_eq!(
        std::fs::read_to_string(out.path().join("model.json")).unwrap(),
        std::fs::read_to_string(out.path().join("report.json")).unwrap()
    );
}
