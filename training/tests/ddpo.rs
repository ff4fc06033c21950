//! DDPO machinery on the tiny diffusers-built sd1 pipeline (random weights) and a small synthetic
//! data set: log-prob recomputation, gradient routing, exact resume, NaN handling, adapter files.

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rl4pix_model::adapter::LoraAdapter;
use rl4pix_model::attention::ForwardCtx;
use rl4pix_model::pipeline::InstructPix2Pix;
use rl4pix_model::scheduler::ddim::DdimScheduler;
use rl4pix_training::ddpo::config::DataConfig;
use rl4pix_training::ddpo::lora::TrainableLora;
use rl4pix_training::ddpo::prompts::load_prompts;
use rl4pix_training::ddpo::sampler::{
    recompute_log_prob, requests, sample_batch, AttentionSource, Guidance, PromptItem,
};
use rl4pix_training::ddpo::{DdpoConfig, DdpoError, EpochLog, Trainer};
use rl4pix_training::synth::{write_folder, SynthWorld};

fn sd1() -> InstructPix2Pix {
    let dir = PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/pipelines/sd1"
    ));
    InstructPix2Pix::load(&dir, &Device::Cpu).expect("load the sd1 fixture")
}

/// A small synthetic world (16x16, so 8x8 latents on sd1) in MagicBrush's folder layout.
fn synth_dataset(dir: &Path, sessions: u64) -> PathBuf {
    let out = dir.join("synth");
    write_folder(&SynthWorld::new(16, 5), &out, sessions, 1, &|| {}).expect("write world");
    out
}

fn prompts(dir: &Path, pipeline: &InstructPix2Pix) -> Vec<PromptItem> {
    let data = DataConfig {
        resolution: 0,
        max_prompts: 4,
        split: String::new(),
    };
    load_prompts(
        &synth_dataset(dir, 4),
        &data,
        pipeline.vae_scale_factor() as u32,
    )
    .expect("prompts")
}

/// Seconds-scale settings: 2 samples of 3 steps per epoch, both trained in one minibatch.
/// The guidance every sampling test uses.
const GUIDANCE: Guidance = Guidance {
    text: 5.0,
    image: 1.5,
};

/// Sets every LoRA layer's B to random values of standard deviation `std`, so the adapter takes
/// part in the forward pass.
fn randomize_up(lora: &TrainableLora, std: f32) {
    for layer in &lora.layers {
        let b = Tensor::randn(0f32, std, layer.up.dims(), &Device::Cpu).unwrap();
        layer.up.set(&b).unwrap();
    }
}

/// The tiny pipeline, a scratch folder and the prompts of a small synthetic data set in it.
fn setup() -> (InstructPix2Pix, tempfile::TempDir, Vec<PromptItem>) {
    let pipeline = sd1();
    let tmp = tempfile::tempdir().unwrap();
    let prompts = prompts(tmp.path(), &pipeline);
    (pipeline, tmp, prompts)
}

/// A trainer of [`tiny_config`] with `sets` applied.
fn tiny_trainer<'a>(
    pipeline: &'a InstructPix2Pix,
    logdir: &Path,
    sets: &[&str],
    prompts: Vec<PromptItem>,
) -> Trainer<'a> {
    let config = tiny_config(logdir).with_sets(sets).unwrap();
    Trainer::new(pipeline, config, prompts).unwrap()
}

fn tiny_config(logdir: &Path) -> DdpoConfig {
    DdpoConfig::paper()
        .with_sets(&[
            &format!("logdir={}", logdir.display()),
            "num_epochs=2",
            "save_freq=1",
            "num_checkpoint_limit=3",
            "sample.num_steps=3",
            "sample.batch_size=2",
            "sample.num_batches_per_epoch=1",
            "train.batch_size=2",
            "train.learning_rate=1e-2",
            "train.clip_range=0.2",
            "per_prompt_stat_tracking.min_count=2",
        ])
        .expect("tiny config")
}

fn lora_values(trainer: &Trainer) -> Vec<(String, Vec<f32>)> {
    trainer
        .lora()
        .named_vars()
        .into_iter()
        .map(|(name, var)| {
            let values = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (name, values)
        })
        .collect()
}

#[test]
fn recomputed_log_prob_equals_the_sampled_one() {
    let (pipeline, _tmp, prompts) = setup();
    let scheduler = DdimScheduler::new(&pipeline.scheduler_config, 4, 1.0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let targets: Vec<String> = ["to_q", "to_k", "to_v", "to_out.0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let lora = TrainableLora::new(&pipeline, 2, 2.0, &targets, &mut rng).unwrap();
    // A non-zero B so the adapter takes part in both passes.
    randomize_up(&lora, 0.05);
    let guidance = GUIDANCE;
    let indices = [0, 1, 2];
    let batch = sample_batch(
        &pipeline,
        &scheduler,
        &prompts,
        &indices,
        &[11, 12, 13],
        guidance,
        &lora.resolved_detached().unwrap(),
        AttentionSource::Policy,
    )
    .unwrap();
    assert_eq!(batch.latents.dims()[..2], [3, 4]);
    assert_eq!(batch.log_probs.dims(), [3, 4]);
    assert_eq!(batch.attention[0].len(), 8 * 8);
    let size = prompts[0].source.dimensions();
    let cond = pipeline
        .condition(&requests(&prompts, &indices, guidance, &scheduler), size)
        .unwrap();
    // Each sample at a different step, as the trainer's shuffled timesteps put them.
    for offset in 0..4 {
        let steps: Vec<usize> = (0..3).map(|i| (i + offset) % 4).collect();
        let pick = |t: &Tensor| {
            let rows: Vec<Tensor> = steps
                .iter()
                .enumerate()
                .map(|(i, &s)| t.get(i).unwrap().get(s).unwrap())
                .collect();
            Tensor::stack(&rows, 0).unwrap()
        };
        let new = recompute_log_prob(
            &pipeline,
            &scheduler,
            &cond,
            &pick(&batch.latents),
            &pick(&batch.next_latents),
            &steps,
            &lora.resolved().unwrap(),
        )
        .unwrap();
        let old = pick(&batch.log_probs);
        let ratio = (new - &old)
            .unwrap()
            .exp()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        for r in ratio {
            assert!((r - 1.0).abs() < 1e-5, "ratio {r} at steps {steps:?}");
        }
    }
}

#[test]
fn gradients_reach_only_the_lora_and_base_weights_stay() {
    let (pipeline, tmp, prompts) = setup();
    let size = prompts[0].source.dimensions();
    let scheduler = DdimScheduler::new(&pipeline.scheduler_config, 3, 1.0).unwrap();
    let base_out = |p: &InstructPix2Pix| {
        let reqs = requests(&prompts, &[0], GUIDANCE, &scheduler);
        let cond = p.condition(&reqs, size).unwrap();
        let x = Tensor::ones((1, 4, 8, 8), candle_core::DType::F32, &Device::Cpu).unwrap();
        p.guided_noise_pred(&cond, &x, &[500.0], ForwardCtx::plain())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    };
    let before = base_out(&pipeline);
    let fingerprint = pipeline.unet.fingerprint().to_string();

    let mut trainer = tiny_trainer(
        &pipeline,
        &tmp.path().join("run"),
        &["num_epochs=1"],
        prompts.clone(),
    );
    let initial = lora_values(&trainer);
    assert!(initial
        .iter()
        .filter(|(n, _)| n.ends_with("lora_B"))
        .all(|(_, v)| v.iter().all(|&x| x == 0.0)));

    // One PPO term by hand: B gets a non-zero gradient, A none yet (B = 0 blocks it).
    let guidance = GUIDANCE;
    let batch = sample_batch(
        &pipeline,
        &scheduler,
        &prompts,
        &[0, 1],
        &[1, 2],
        guidance,
        &trainer.lora().resolved_detached().unwrap(),
        AttentionSource::Policy,
    )
    .unwrap();
    let cond = pipeline
        .condition(&requests(&prompts, &[0, 1], guidance, &scheduler), size)
        .unwrap();
    let pick = |t: &Tensor| {
        Tensor::stack(
            &[
                t.get(0).unwrap().get(1).unwrap(),
                t.get(1).unwrap().get(1).unwrap(),
            ],
            0,
        )
        .unwrap()
    };
    let new = recompute_log_prob(
        &pipeline,
        &scheduler,
        &cond,
        &pick(&batch.latents),
        &pick(&batch.next_latents),
        &[1, 1],
        &trainer.lora().resolved().unwrap(),
    )
    .unwrap();
    let grads = new.sum_all().unwrap().backward().unwrap();
    let mut b_grad = 0f32;
    for (name, var) in trainer.lora().named_vars() {
        let g = grads
            .get(var.as_tensor())
            .expect("every LoRA variable gets a gradient");
        let size = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        if name.ends_with("lora_B") {
            b_grad += size;
        } else {
            assert_eq!(size, 0.0, "{name}: A's gradient is zero while B = 0");
        }
    }
    assert!(b_grad > 0.0, "B must receive gradient");

    trainer.run(false).unwrap();
    let after = lora_values(&trainer);
    assert_ne!(initial, after, "training must move the LoRA");
    assert_eq!(
        base_out(&pipeline),
        before,
        "base weights must be untouched"
    );
    assert_eq!(pipeline.unet.fingerprint(), fingerprint);
}

/// Log lines without timing; values read back from the JSONL file may differ in the last bit
/// (JSON float parsing), so numbers are compared to 1e-12 relative.
fn assert_same_logs(a: &[EpochLog], b: &[EpochLog]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        let (mut x, mut y) = (
            serde_json::to_value(x).unwrap(),
            serde_json::to_value(y).unwrap(),
        );
        for timing in ["seconds", "sample_seconds", "train_seconds"] {
            x[timing] = 0.into();
            y[timing] = 0.into();
        }
        for (key, vx) in x.as_object().unwrap() {
            let vy = &y[key];
            match (vx.as_f64(), vy.as_f64()) {
                (Some(p), Some(q)) => assert!(
                    (p - q).abs() <= 1e-12 * p.abs().max(q.abs()),
                    "{key}: {p} vs {q}"
                ),
                _ => assert_eq!(vx, vy, "{key}"),
            }
        }
    }
}

#[test]
fn four_epochs_equal_two_plus_resume_plus_two() {
    let (pipeline, tmp, prompts) = setup();

    let straight_dir = tmp.path().join("straight");
    let mut straight = tiny_trainer(&pipeline, &straight_dir, &["num_epochs=4"], prompts.clone());
    straight.run(false).unwrap();

    let split_dir = tmp.path().join("split");
    let mut part = tiny_trainer(&pipeline, &split_dir, &["num_epochs=2"], prompts.clone());
    part.run(false).unwrap();
    let checkpoint = part.last_checkpoint().unwrap().to_path_buf();
    assert!(checkpoint.ends_with("epoch-000002"));
    drop(part);

    let mut resumed = tiny_trainer(&pipeline, &split_dir, &["num_epochs=4"], prompts);
    resumed.resume(&checkpoint).unwrap();
    assert_eq!(resumed.epochs_completed(), 2);
    resumed.run(false).unwrap();

    assert_eq!(lora_values(&straight), lora_values(&resumed), "bit for bit");
    assert_same_logs(straight.history(), resumed.history());
    // The resumed log file holds each epoch once.
    let log = std::fs::read_to_string(split_dir.join("ddpo.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 4);
    // num_checkpoint_limit = 3 keeps epochs 2..4.
    let kept: Vec<String> = std::fs::read_dir(split_dir.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept.len(), 3, "{kept:?}");
    assert!(!kept.contains(&"epoch-000001".to_string()));
    assert!(split_dir.join("reward.png").is_file() && split_dir.join("kl.png").is_file());
}

#[test]
fn non_finite_values_stop_the_run_and_keep_the_last_good_checkpoint() {
    let (pipeline, tmp, prompts) = setup();
    let run = tmp.path().join("run");
    // A learning rate no model survives: the weights blow up after the first update.
    let mut trainer = tiny_trainer(
        &pipeline,
        &run,
        &["num_epochs=4", "train.learning_rate=1e30", "lora.alpha=1e6"],
        prompts,
    );
    let err = trainer.run(false).unwrap_err();
    let message = err.to_string();
    let DdpoError::NonFinite {
        epoch,
        last_checkpoint,
        ..
    } = err
    else {
        panic!("expected a non-finite stop, got {message}");
    };
    assert!(message.contains("not finite"), "{message}");
    assert!(epoch >= 2, "{message}");
    let last = last_checkpoint.expect("a checkpoint before the failure");
    assert!(message.contains(&last.display().to_string()), "{message}");
    assert!(last.join("state.json").is_file());
    // Nothing was checkpointed after the failure, and the kept one is finite.
    assert_eq!(trainer.epochs_completed(), epoch - 1);
    let lora = candle_core::safetensors::load(last.join("lora.safetensors"), &Device::Cpu).unwrap();
    for (name, t) in lora {
        let v = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
    }
}

#[test]
fn the_adapter_loads_back_with_its_metadata() {
    let (pipeline, tmp, prompts) = setup();
    let mut trainer = tiny_trainer(
        &pipeline,
        &tmp.path().join("run"),
        &["num_epochs=1"],
        prompts,
    );
    trainer.run(false).unwrap();
    let path = tmp.path().join("rl.safetensors");
    trainer.adapter("rl").unwrap().save(&path).unwrap();

    let resolved = pipeline.load_adapter(&path).unwrap();
    assert_eq!(resolved.name, "rl");
    let adapter = LoraAdapter::load(&path, &pipeline.lora_targets(), &Device::Cpu).unwrap();
    let projections = pipeline.unet.projections().entries.len();
    assert_eq!(
        adapter.layers.len(),
        projections,
        "every attention projection"
    );
    let meta = &adapter.metadata;
    assert_eq!(meta.rank, 4);
    assert_eq!(meta.alpha, 4.0);
    assert_eq!(
        meta.base_fingerprint.as_deref(),
        Some(pipeline.unet.fingerprint())
    );
    let config = meta.training_config.as_ref().unwrap();
    assert_eq!(config["sample"]["num_steps"], 3);
    assert_eq!(meta.reward_summary.as_ref().unwrap()["epochs"], 1);
    assert!(meta.created.as_ref().unwrap().ends_with('Z'));
    // The weights written are the trained ones.
    for (name, var) in trainer.lora().named_vars() {
        let (path, part) = name.rsplit_once('.').unwrap();
        let layer = &adapter.layers[path];
        let saved = if part == "lora_A" {
            &layer.down
        } else {
            &layer.up
        };
        assert_eq!(
            saved.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            var.as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap()
        );
    }
}

#[test]
fn blank_masks_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let data = synth_dataset(tmp.path(), 2);
    for entry in walk(&data.join("images")) {
        if entry.to_string_lossy().contains("mask") {
            image::GrayImage::new(16, 16).save(&entry).unwrap();
        }
    }
    let config = DataConfig {
        resolution: 0,
        max_prompts: 0,
        split: String::new(),
    };
    let err = load_prompts(&data, &config, 2).unwrap_err().to_string();
    assert!(err.contains("blank") && err.contains("mask"), "{err}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(walk(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// One PPO update raises the log-probability of a sample with a positive advantage and lowers
/// that of one with a negative advantage (the sign of the whole chain: loss, backward, AdamW).
#[test]
fn a_ppo_step_moves_the_policy_towards_the_advantage() {
    use rl4pix_training::ddpo::optim::{AdamW, AdamWParams};
    use rl4pix_training::ddpo::ppo::ppo_loss;

    let (pipeline, _tmp, prompts) = setup();
    let size = prompts[0].source.dimensions();
    let scheduler = DdimScheduler::new(&pipeline.scheduler_config, 3, 1.0).unwrap();
    let targets: Vec<String> = ["to_q", "to_k", "to_v", "to_out.0"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let lora = TrainableLora::new(
        &pipeline,
        4,
        4.0,
        &targets,
        &mut ChaCha8Rng::seed_from_u64(1),
    )
    .unwrap();
    let guidance = GUIDANCE;
    let indices = [0, 1];
    let batch = sample_batch(
        &pipeline,
        &scheduler,
        &prompts,
        &indices,
        &[7, 8],
        guidance,
        &lora.resolved_detached().unwrap(),
        AttentionSource::Policy,
    )
    .unwrap();
    let cond = pipeline
        .condition(&requests(&prompts, &indices, guidance, &scheduler), size)
        .unwrap();
    let steps = [1usize, 1];
    let pick = |t: &Tensor| {
        Tensor::stack(
            &[
                t.get(0).unwrap().get(1).unwrap(),
                t.get(1).unwrap().get(1).unwrap(),
            ],
            0,
        )
        .unwrap()
    };
    let (x, next, old) = (
        pick(&batch.latents),
        pick(&batch.next_latents),
        pick(&batch.log_probs),
    );
    let log_prob = |lora: &TrainableLora| {
        recompute_log_prob(
            &pipeline,
            &scheduler,
            &cond,
            &x,
            &next,
            &steps,
            &lora.resolved().unwrap(),
        )
        .unwrap()
    };
    let mut optimizer = AdamW::new(
        lora.named_vars(),
        AdamWParams {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        },
    )
    .unwrap();
    let advantages = Tensor::new(&[1f32, -1.0], &Device::Cpu).unwrap();
    let before = log_prob(&lora).to_vec1::<f32>().unwrap();
    for _ in 0..3 {
        let term = ppo_loss(&log_prob(&lora), &old, &advantages, 0.2, 5.0).unwrap();
        let grads = term.loss.backward().unwrap();
        let grads: Vec<Option<Tensor>> = lora
            .named_vars()
            .iter()
            .map(|(_, v)| grads.get(v.as_tensor()).cloned())
            .collect();
        optimizer.step(&grads, 1.0).unwrap();
    }
    let after = log_prob(&lora).to_vec1::<f32>().unwrap();
    assert!(
        after[0] > before[0],
        "positive advantage: {before:?} -> {after:?}"
    );
    assert!(
        after[1] < before[1],
        "negative advantage: {before:?} -> {after:?}"
    );
}

/// Group sampling on the tiny world: P prompts x K samples, steps after `skip_last_steps` never
/// trained, per-step gradient norms logged for the others.
#[test]
fn group_sampling_trains_only_the_kept_steps_and_logs_their_gradients() {
    let pipeline = sd1();
    let tmp = tempfile::tempdir().unwrap();
    let config = tiny_config(&tmp.path().join("run"))
        .with_sets(&[
            "num_epochs=1",
            "sample.prompts_per_epoch=2",
            "sample.samples_per_prompt=2",
            "train.batch_size=4",
            "train.skip_last_steps=1",
            "per_prompt_stat_tracking.group_std_floor=0.001",
            "reward.attention_source=base",
        ])
        .unwrap();
    assert_eq!(config.samples_per_epoch(), 4);
    let mut trainer = Trainer::new(&pipeline, config, prompts(tmp.path(), &pipeline)).unwrap();
    trainer.run(false).unwrap();
    let log = &trainer.history()[0];
    assert_eq!(log.samples, 4);
    assert!(
        log.within_group_std.is_some_and(|s| s.is_finite()),
        "{log:?}"
    );
    assert!(
        log.oracle_l1_mean > 0.0 && log.oracle_l1_mean < 1.0,
        "{log:?}"
    );
    assert_eq!(log.step_grad_norms.len(), 3);
    assert!(
        log.step_grad_norms[2].is_none(),
        "the last step is skipped: {log:?}"
    );
    assert!(
        log.step_grad_norms[..2]
            .iter()
            .all(|n| n.is_some_and(|n| n > 0.0)),
        "{log:?}"
    );
}

/// The attention term read from the frozen base cannot be moved by the adapter alone: with one
/// step the base sees the same initial noise whatever the adapter, so its map is the same; the
/// policy's own map moves with a LoRA on the attention keys.
#[test]
fn base_attention_ignores_the_adapter_and_policy_attention_does_not() {
    let (pipeline, _tmp, prompts) = setup();
    let scheduler = DdimScheduler::new(&pipeline.scheduler_config, 1, 1.0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let zero = TrainableLora::new(&pipeline, 4, 4.0, &["to_k".to_string()], &mut rng).unwrap();
    let moved = TrainableLora::new(&pipeline, 4, 4.0, &["to_k".to_string()], &mut rng).unwrap();
    randomize_up(&moved, 0.5);
    let guidance = GUIDANCE;
    let attention = |lora: &TrainableLora, source| {
        sample_batch(
            &pipeline,
            &scheduler,
            &prompts,
            &[0, 1],
            &[5, 6],
            guidance,
            &lora.resolved_detached().unwrap(),
            source,
        )
        .unwrap()
        .attention
    };
    assert_eq!(
        attention(&zero, AttentionSource::Base),
        attention(&moved, AttentionSource::Base)
    );
    // With a zero adapter both read the same UNet, but not in the same batch: the base's maps come
    // from a forward of the text-conditioned rows alone, the policy's from the guided batch, and
    // candle's composed matmuls (RL4PIX_FUSED=0, the GPU path) may round differently per batch
    // size. So: equal to float rounding, and far closer than a moved adapter.
    let largest_gap = |a: &[Vec<f32>], b: &[Vec<f32>]| {
        a.iter()
            .flatten()
            .zip(b.iter().flatten())
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max)
    };
    let base = attention(&zero, AttentionSource::Base);
    let rounding = largest_gap(&base, &attention(&zero, AttentionSource::Policy));
    assert!(
        rounding <= 1e-5,
        "with a zero adapter both read the same UNet: largest gap {rounding}"
    );
    let moved_gap = largest_gap(&base, &attention(&moved, AttentionSource::Policy));
    assert!(
        moved_gap > 1e-3,
        "a moved adapter moves the policy's maps: {moved_gap}"
    );
    assert_ne!(
        attention(&zero, AttentionSource::Policy),
        attention(&moved, AttentionSource::Policy)
    );
}

/// The KL penalty toward the base is 0 for the base itself, positive for a moved adapter, and its
/// gradient reaches the LoRA.
#[test]
fn kl_to_base_is_zero_at_the_base_and_grows_with_the_adapter() {
    use rl4pix_training::ddpo::sampler::{base_prediction, kl_to_base, policy_prediction};
    let (pipeline, _tmp, prompts) = setup();
    let scheduler = DdimScheduler::new(&pipeline.scheduler_config, 3, 1.0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let targets: Vec<String> = ["to_q", "to_v"].iter().map(|s| s.to_string()).collect();
    let lora = TrainableLora::new(&pipeline, 4, 4.0, &targets, &mut rng).unwrap();
    let guidance = GUIDANCE;
    let indices = [0, 1];
    let size = prompts[0].source.dimensions();
    let cond = pipeline
        .condition(&requests(&prompts, &indices, guidance, &scheduler), size)
        .unwrap();
    let latents = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let steps = [0, 1];
    let base = base_prediction(&pipeline, &scheduler, &cond, &latents, &steps).unwrap();
    let kl = |lora: &TrainableLora| {
        let pred = policy_prediction(
            &pipeline,
            &scheduler,
            &cond,
            &latents,
            &steps,
            &lora.resolved().unwrap(),
        )
        .unwrap();
        kl_to_base(&scheduler, &pred, &base, &steps, &latents).unwrap()
    };
    let at_base = kl(&lora).to_vec1::<f32>().unwrap();
    assert!(at_base.iter().all(|v| v.abs() < 1e-6), "{at_base:?}");
    randomize_up(&lora, 0.05);
    let moved = kl(&lora);
    let values = moved.to_vec1::<f32>().unwrap();
    assert!(values.iter().all(|v| *v > 0.0), "{values:?}");
    let grads = moved.mean_all().unwrap().backward().unwrap();
    let reached = lora
        .named_vars()
        .iter()
        .filter(|(_, v)| grads.get(v.as_tensor()).is_some())
        .count();
    assert!(reached > 0);
}

/// Validation scores the base at epoch 0 and every `every` epochs, keeps the best adapter, and
/// the policy samples with the model's own guidance when asked.
#[test]
fn validation_keeps_the_best_adapter_and_the_model_guidance_is_used() {
    let pipeline = sd1();
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let config = tiny_config(&run)
        .with_sets(&[
            "validation.dataset=unused-here",
            "validation.every=1",
            "validation.max_turns=2",
            "validation.steps=2",
            "sample.use_model_guidance=true",
        ])
        .unwrap();
    let prompts = prompts(tmp.path(), &pipeline);
    let mut trainer = Trainer::new(&pipeline, config, prompts.clone()).unwrap();
    let guidance = trainer.sampling_guidance();
    assert_eq!(
        (guidance.text, guidance.image),
        (
            pipeline.guidance_defaults.guidance_scale,
            pipeline.guidance_defaults.image_guidance_scale
        )
    );
    trainer.set_validation(prompts[..2].to_vec()).unwrap();
    trainer.run(false).unwrap();
    let text = std::fs::read_to_string(run.join("validation.jsonl")).unwrap();
    let records: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let epochs: Vec<u64> = records
        .iter()
        .map(|r| r["epoch"].as_u64().unwrap())
        .collect();
    assert_eq!(epochs, [0, 1, 2]);
    assert_eq!(records[0]["improved"], true);
    assert_eq!(records[0]["turns"], 2);
    let (best_epoch, best_score) = trainer.best().unwrap();
    let best_record = &records[best_epoch];
    assert_eq!(best_record["score"].as_f64().unwrap(), best_score);
    assert!(records
        .iter()
        .all(|r| r["score"].as_f64().unwrap() >= best_score));
    let best = LoraAdapter::load(
        &run.join("best/adapter.safetensors"),
        &pipeline.lora_targets(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(
        best.metadata.base_fingerprint.as_deref(),
        Some(pipeline.unet.fingerprint())
    );
}
