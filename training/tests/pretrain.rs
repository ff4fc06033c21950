//! Pretraining on a tiny configuration: the loss goes down, a resumed run continues exactly where
//! the checkpoint left off, a truncated checkpoint is refused, and an exported model loads in the
//! editing pipeline.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rl4pix_model::pipeline::{EditParams, InstructPix2Pix};
use rl4pix_training::pretrain::log::read_log;
use rl4pix_training::pretrain::unet::{UnetRun, UnetTrainConfig};
use rl4pix_training::pretrain::vae::{VaeRun, VaeTrainConfig};
use rl4pix_training::pretrain::{checkpoint, export, unet, vae, Cadence};
use rl4pix_training::synth::SynthWorld;

fn tiny_vae(run_dir: &Path, steps: usize, resume: Option<&Path>) -> VaeRun {
    VaeRun {
        run_dir: run_dir.to_path_buf(),
        config: VaeTrainConfig {
            size: 16,
            seed: 3,
            steps,
            batch: 4,
            lr: 3e-3,
            warmup: 2,
            channels: vec![8, 8],
            latent_channels: 4,
            norm_groups: 4,
            ..VaeTrainConfig::default()
        },
        resume: resume.map(Path::to_path_buf),
        cadence: Cadence {
            checkpoint_every: 5,
            log_every: 5,
            eval_every: 0,
        },
        stop_after: None,
        device: Device::Cpu,
    }
}

fn weights(dir: &Path) -> HashMap<String, Tensor> {
    checkpoint::open(dir)
        .expect("checkpoint")
        .tensors("weights.safetensors", &Device::Cpu)
        .expect("weights")
}

fn mean_of(records: &[rl4pix_training::pretrain::log::LogRecord]) -> f64 {
    records.iter().map(|r| r.loss).sum::<f64>() / records.len() as f64
}

#[test]
fn tiny_vae_learns_resumes_exactly_and_refuses_truncated_checkpoints() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let full = tmp.path().join("full");
    vae::train(&tiny_vae(&full, 40, None)).expect("train");

    let log = read_log(&full.join("vae.log.jsonl")).expect("log");
    assert_eq!(log.len(), 8);
    let (first, last) = (mean_of(&log[..2]), mean_of(&log[6..]));
    assert!(last < 0.7 * first, "loss did not fall: {first} -> {last}");

    // Resume from step 30 in another folder: ten more steps land on the same weights.
    let ckpt_30 = checkpoint::checkpoints_dir(&full).join("step-0000030");
    let resumed = tmp.path().join("resumed");
    vae::train(&tiny_vae(&resumed, 40, Some(&ckpt_30))).expect("resume");
    let a = weights(&checkpoint::checkpoints_dir(&full).join("step-0000040"));
    let b = weights(&checkpoint::checkpoints_dir(&resumed).join("step-0000040"));
    assert_eq!(a.len(), b.len());
    for (name, x) in &a {
        let diff = (x - &b[name])
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        assert!(diff < 1e-4, "{name} differs by {diff} after resume");
    }

    // Stopped early: checkpointed, not exported; resuming finishes and exports.
    let stopped_dir = tmp.path().join("stopped");
    let stopped = vae::train(&VaeRun {
        stop_after: Some(10),
        ..tiny_vae(&stopped_dir, 40, None)
    })
    .expect("stopped");
    assert_eq!((stopped.step, stopped.total_steps), (10, 40));
    assert!(!stopped.model_dir.exists(), "a stopped run exported a VAE");
    let finished = vae::train(&tiny_vae(&stopped_dir, 40, Some(&stopped_dir))).expect("resume");
    assert_eq!(finished.step, 40);
    assert!(finished.model_dir.join("config.json").is_file());

    // A checkpoint cut short is refused with a message that says so.
    let cut = tmp.path().join("cut");
    std::fs::create_dir_all(&cut).expect("mkdir");
    for entry in std::fs::read_dir(&ckpt_30).expect("read_dir") {
        let entry = entry.expect("entry");
        std::fs::copy(entry.path(), cut.join(entry.file_name())).expect("copy");
    }
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(cut.join("weights.safetensors"))
        .expect("open");
    let len = file.metadata().expect("meta").len();
    file.set_len(len / 2).expect("truncate");
    let Err(err) = vae::train(&tiny_vae(&tmp.path().join("again"), 40, Some(&cut))) else {
        panic!("a truncated checkpoint was accepted");
    };
    let message = err.to_string();
    assert!(
        message.contains("truncated") && message.contains("weights.safetensors"),
        "{message}"
    );

    // A resumed run must have the configuration the checkpoint was made with.
    let mut other = tiny_vae(&tmp.path().join("other"), 40, Some(&ckpt_30));
    other.config.lr = 1e-2;
    let Err(err) = vae::train(&other) else {
        panic!("a checkpoint of another configuration was accepted");
    };
    assert!(err.to_string().contains("another configuration"), "{err}");
}

#[test]
fn tiny_instruct_pix2pix_learns_and_exports_a_loadable_model() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let vae_run = tmp.path().join("vae");
    let vae_summary = vae::train(&tiny_vae(&vae_run, 5, None)).expect("vae");
    let run_dir = tmp.path().join("unet");
    let run = UnetRun {
        run_dir: run_dir.clone(),
        vae_dir: vae_summary.model_dir.clone(),
        config: UnetTrainConfig {
            size: 16,
            seed: 4,
            steps: 30,
            batch: 4,
            lr: 3e-3,
            warmup: 2,
            channels: vec![8, 16],
            attention: vec![true, false],
            heads: 2,
            norm_groups: 4,
            text_hidden: 16,
            text_layers: 1,
            text_heads: 2,
            ..UnetTrainConfig::default()
        },
        resume: None,
        cadence: Cadence {
            checkpoint_every: 30,
            log_every: 5,
            eval_every: 30,
        },
        stop_after: None,
        data_parallel: 1,
        device: Device::Cpu,
    };
    let summary = unet::train(&run).expect("train");
    assert_eq!((summary.step, summary.total_steps), (30, 30));
    let log = read_log(&run_dir.join("unet.log.jsonl")).expect("log");
    assert_eq!(log.len(), 6);
    let (first, last) = (mean_of(&log[..2]), mean_of(&log[4..]));
    assert!(last < first, "loss did not fall: {first} -> {last}");
    assert!(log[5].eval.is_some());
    assert!(run_dir.join("unet.loss.png").is_file());

    // Stopped after step 12 (same 30-step schedule) and resumed with the batch split across
    // three threads (uneven shards: 1, 1, 2 rows): the same weights as one go on one thread.
    // Both start from this run's weights (initialisation is not seeded).
    let again = |dir: &str, resume: bool, stop_after: Option<usize>, data_parallel| UnetRun {
        run_dir: tmp.path().join(dir),
        vae_dir: run.vae_dir.clone(),
        config: UnetTrainConfig {
            init_from: Some(run_dir.clone()),
            ..run.config.clone()
        },
        resume: resume.then(|| tmp.path().join(dir)),
        cadence: Cadence {
            checkpoint_every: 100,
            log_every: 5,
            eval_every: 0,
        },
        stop_after,
        data_parallel,
        device: Device::Cpu,
    };
    unet::train(&again("one-go", false, None, 1)).expect("one go");
    let stopped = unet::train(&again("split", false, Some(12), 1)).expect("stopped run");
    assert_eq!((stopped.step, stopped.total_steps), (12, 30));
    let resumed = unet::train(&again("split", true, None, 3)).expect("resumed run");
    assert_eq!(resumed.step, 30);
    let latest = |dir: &str| {
        let ckpt = checkpoint::latest(&tmp.path().join(dir)).expect("list");
        weights(&ckpt.expect("a checkpoint"))
    };
    let (one_go, in_two) = (latest("one-go"), latest("split"));
    for (name, tensor) in &one_go {
        let diff = (tensor - &in_two[name])
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        // A key bias adds the same score to every key of a query, which softmax ignores: its
        // gradient is rounding noise, and Adam turns noise into full-size steps.
        if name.ends_with("k_proj.bias") {
            continue;
        }
        assert!(
            diff < 1e-5,
            "{name} differs by {diff} after stop and resume"
        );
    }

    let model_dir = tmp.path().join("model");
    export::export_model(
        &run_dir,
        None,
        &model_dir,
        &export::ExportOptions::default(),
    )
    .expect("export");
    let pipeline = InstructPix2Pix::load(&model_dir, &Device::Cpu).expect("load");
    // An export that cannot finish (here: a VAE folder that does not exist; then a guidance the
    // loader refuses) says why and leaves the model it would have replaced as it was.
    std::fs::write(model_dir.join("README.md"), "kept").unwrap();
    let before = std::fs::read(model_dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap();
    let refused = [
        export::ExportOptions {
            vae_source: Some(tmp.path().join("no-such-vae")),
            dtype: DType::F32,
            ..export::ExportOptions::default()
        },
        export::ExportOptions {
            sampling: Some(rl4pix_model::pipeline::GuidanceDefaults {
                guidance_scale: -1.0,
                image_guidance_scale: 1.5,
            }),
            dtype: DType::F32,
            ..export::ExportOptions::default()
        },
    ];
    for (options, reason) in refused.iter().zip(["no-such-vae", "guidance_scale"]) {
        let err = export::export_model(&run_dir, None, &model_dir, options)
            .expect_err("a bad export is refused")
            .to_string();
        assert!(err.contains(reason), "error names {reason}: {err}");
        assert_eq!(
            std::fs::read(model_dir.join("unet/diffusion_pytorch_model.safetensors")).unwrap(),
            before,
            "a refused export left the old weights"
        );
    }
    assert_eq!(
        std::fs::read_to_string(model_dir.join("README.md")).unwrap(),
        "kept"
    );
    let leftovers: Vec<_> = std::fs::read_dir(tmp.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains(".export-"))
        .collect();
    assert!(leftovers.is_empty(), "staging folders left behind");
    let turn = SynthWorld::new(16, 99).session(0).turns.remove(0);
    let params = EditParams {
        steps: 2,
        ..EditParams::default()
    };
    let out = pipeline
        .edit(&turn.source, &turn.instruction, &params)
        .expect("edit");
    assert_eq!(out.image.dimensions(), (16, 16));
    let scheduler: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(model_dir.join("scheduler/scheduler_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(scheduler["prediction_type"], "v_prediction");

    // A warm start takes the weights and nothing else: one step at a negligible learning rate
    // scores the held-out batch as the source run's last weights did.
    let val_loss = |records: &[rl4pix_training::pretrain::log::LogRecord]| {
        records.last().unwrap().eval.as_ref().unwrap()["val_loss"]
            .as_f64()
            .unwrap()
    };
    let warm_dir = tmp.path().join("warm");
    let mut warm = UnetRun {
        run_dir: warm_dir.clone(),
        config: UnetTrainConfig {
            steps: 1,
            lr: 1e-12,
            warmup: 0,
            init_from: Some(run_dir.clone()),
            ..run.config.clone()
        },
        cadence: Cadence {
            eval_every: 1,
            log_every: 1,
            ..run.cadence
        },
        ..run
    };
    unet::train(&warm).expect("warm start");
    let warm_log = read_log(&warm_dir.join("unet.log.jsonl")).expect("log");
    let (source, started) = (val_loss(&log), val_loss(&warm_log));
    assert!(
        (source - started).abs() < 1e-4 * source,
        "{source} vs {started}"
    );
    // Without the warm start the same step scores like an untrained model.
    warm.run_dir = tmp.path().join("cold");
    warm.config.init_from = None;
    unet::train(&warm).expect("cold start");
    let cold = val_loss(&read_log(&warm.run_dir.join("unet.log.jsonl")).expect("log"));
    assert!(cold > 1.5 * source, "{cold} vs {source}");
}

#[test]
fn trainable_text_encoder_computes_what_the_pipelines_encoder_does() {
    use candle_nn::{VarBuilder, VarMap};
    use rl4pix_model::text_encoder::{ClipTextConfig, ClipTextTransformer};
    use rl4pix_training::pretrain::text::{text_config, TrainTextEncoder};

    let config: ClipTextConfig =
        serde_json::from_value(text_config(20, 16, 2, 4, 8)).expect("config");
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
    let trainable = TrainTextEncoder::new(vb.clone(), &config).expect("trainable");
    // Layer norms start at identity; perturb every weight so they matter.
    for var in varmap.all_vars() {
        let noise = var.as_tensor().randn_like(0.0, 0.3).expect("randn");
        var.set(&(var.as_tensor() + noise).expect("add"))
            .expect("set");
    }
    let reference = ClipTextTransformer::new(vb, &config).expect("reference");
    let ids = Tensor::new(
        &[[0u32, 5, 7, 9, 1, 1, 1, 1], [0, 3, 1, 1, 1, 1, 1, 1]],
        &Device::Cpu,
    )
    .expect("ids");
    let a = trainable.forward(&ids).expect("trainable forward");
    let b = reference.forward(&ids).expect("reference forward");
    let diff = (a - &b)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    assert!(diff < 1e-4, "max difference {diff}");
    let (_, pooled) = reference.forward_with_pooled(&ids).expect("pooled");
    let mine = trainable.pooled(&ids, &b).expect("mine");
    let diff = (pooled - mine)
        .and_then(|d| d.abs())
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f32>())
        .expect("diff");
    assert!(diff < 1e-6, "pooled differs by {diff}");
}

#[test]
fn tiny_clip_trains_and_loads_as_a_clip_t_scorer() {
    use rl4pix_training::metrics::ClipScorer;
    use rl4pix_training::pretrain::clip::{train, ClipRun, ClipTrainConfig};

    let tmp = tempfile::tempdir().expect("tempdir");
    let summary = train(&ClipRun {
        run_dir: tmp.path().join("clip"),
        config: ClipTrainConfig {
            size: 16,
            steps: 20,
            batch: 8,
            warmup: 2,
            hidden: 16,
            layers: 1,
            heads: 2,
            projection: 8,
            ..ClipTrainConfig::default()
        },
        resume: None,
        cadence: Cadence {
            checkpoint_every: 20,
            log_every: 5,
            eval_every: 0,
        },
        device: Device::Cpu,
    })
    .expect("train");
    let log = read_log(&tmp.path().join("clip").join("clip.log.jsonl")).expect("log");
    assert!(
        log[3].loss < log[0].loss,
        "{} -> {}",
        log[0].loss,
        log[3].loss
    );
    let scorer = ClipScorer::load(&summary.model_dir, &Device::Cpu).expect("load");
    let turn = SynthWorld::new(16, 98).session(0).turns.remove(0);
    let description = turn.local_description.clone().unwrap_or_default();
    let score = scorer.score(&turn.target, &description).expect("score");
    assert!(score.is_finite() && score.abs() <= 1.0 + 1e-6, "{score}");
}

#[test]
fn decoder_fine_tuning_keeps_the_encoder_and_scaling_factor() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let base = vae::train(&tiny_vae(&tmp.path().join("base"), 5, None)).expect("base");
    let mut run = tiny_vae(&tmp.path().join("decoder"), 5, None);
    run.config.decoder_from = Some(base.model_dir.clone());
    let tuned = vae::train(&run).expect("decoder fine-tuning");
    assert_eq!(tuned.scaling_factor, base.scaling_factor);
    let load = |dir: &Path| {
        candle_core::safetensors::load(
            dir.join("diffusion_pytorch_model.safetensors"),
            &Device::Cpu,
        )
        .expect("weights")
    };
    let (before, after) = (load(&base.model_dir), load(&tuned.model_dir));
    let mut decoder_changed = false;
    for (name, x) in &before {
        let diff = (x - &after[name])
            .and_then(|d| d.abs())
            .and_then(|d| d.max_all())
            .and_then(|d| d.to_scalar::<f32>())
            .expect("diff");
        if name.starts_with("encoder.") || name.starts_with("quant_conv.") {
            assert_eq!(diff, 0.0, "{name} changed");
        } else if name.starts_with("decoder.") && diff > 0.0 {
            decoder_changed = true;
        }
    }
    assert!(decoder_changed);
}
