//! The DDPO loop. Each epoch: sample trajectories with the current policy -> score them -> turn
//! rewards into per-prompt advantages -> `train.num_inner_epochs` passes of PPO over the samples,
//! each sample's timesteps shuffled, gradients accumulated over the trained timesteps (and
//! `train.gradient_accumulation_steps` minibatches) before one clipped AdamW step on the LoRA
//! variables. Checkpoints hold everything a resumed run needs to continue bit for bit.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rl4pix_model::adapter::LoraAdapter;
use rl4pix_model::pipeline::InstructPix2Pix;
use rl4pix_model::scheduler::ddim::DdimScheduler;
use serde::{Deserialize, Serialize};

use super::config::DdpoConfig;
use super::lora::TrainableLora;
use super::optim::{AdamW, AdamWParams};
use super::ppo::ppo_loss;
use super::reward::RewardTerms;
use super::sampler::{
    base_prediction, kl_to_base, policy_prediction, requests, sample_batch, AttentionSource,
    Guidance, PromptItem, Trajectories,
};
use super::stat_tracker::{
    group_advantages, mean_std, within_group_std, PerPromptStatTracker, StatTrackerState,
};
use super::validation::{Validation, ValidationState};
use super::{io_error, plots, DdpoError, Result};

pub const LOG_FILE: &str = "ddpo.jsonl";
pub const CHECKPOINTS_DIR: &str = "checkpoints";
const STATE_FILE: &str = "state.json";
const LORA_FILE: &str = "lora.safetensors";
const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// The checkpoint's adapter in diffusers' format, for evaluating a run midway.
pub const CHECKPOINT_ADAPTER_FILE: &str = "adapter.safetensors";
/// `validation.jsonl`: one line per validation (the base first, at epoch 0).
pub const VALIDATION_LOG: &str = "validation.jsonl";
/// `best/adapter.safetensors`: the adapter of the best validation score so far.
pub const BEST_DIR: &str = "best";
/// Keeps the LoRA init's draws apart from the run's sampling stream.
const LORA_INIT_STREAM: u64 = 1;

/// One line of the JSONL log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochLog {
    /// Epochs completed (1-based).
    pub epoch: usize,
    pub reward_mean: f64,
    pub reward_std: f64,
    pub attention_mean: f64,
    pub clip_mean: f64,
    pub mae_mean: f64,
    pub localization_mean: f64,
    /// Mean change outside the mask (ours).
    #[serde(default)]
    pub outside_mean: f64,
    /// Mean L1 of the samples to their targets: the policy's true error on the training turns
    /// (logged for every run; rewarded only by the oracle ablation).
    #[serde(default)]
    pub oracle_l1_mean: f64,
    /// With group sampling: the mean within-group reward std.
    #[serde(default)]
    pub within_group_std: Option<f64>,
    pub approx_kl: f64,
    /// With `train.kl_weight` > 0: the mean KL of the trained steps to the base's.
    #[serde(default)]
    pub kl_to_base: Option<f64>,
    pub clip_fraction: f64,
    pub loss: f64,
    pub grad_norm: f64,
    /// Mean gradient norm of one trained step's loss, per step index (null: not trained).
    #[serde(default)]
    pub step_grad_norms: Vec<Option<f64>>,
    pub lr: f64,
    pub seconds: f64,
    /// Of `seconds`: sampling (with decoding and rewards) and the PPO updates.
    #[serde(default)]
    pub sample_seconds: f64,
    #[serde(default)]
    pub train_seconds: f64,
    pub samples: usize,
    pub optimizer_steps: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct CheckpointState {
    epoch: usize,
    optimizer_steps: usize,
    rng_seed: Vec<u8>,
    rng_stream: u64,
    /// u128 as a decimal string (JSON numbers stop at 2^53 in many readers).
    rng_word_pos: String,
    tracker: StatTrackerState,
    lora_rank: usize,
    lora_alpha: f64,
    lora_target_modules: Vec<String>,
    base_fingerprint: String,
    config: serde_json::Value,
    #[serde(default)]
    validation: Option<ValidationState>,
}

pub struct Trainer<'a> {
    pipeline: &'a InstructPix2Pix,
    config: DdpoConfig,
    prompts: Vec<PromptItem>,
    scheduler: DdimScheduler,
    lora: TrainableLora,
    optimizer: AdamW,
    tracker: PerPromptStatTracker,
    rng: ChaCha8Rng,
    /// Epochs completed.
    epoch: usize,
    run_dir: PathBuf,
    last_checkpoint: Option<PathBuf>,
    history: Vec<EpochLog>,
    sampling_guidance: Guidance,
    attention_source: AttentionSource,
    validation: Option<Validation>,
}

impl<'a> Trainer<'a> {
    /// A fresh run writing into `config.logdir`.
    pub fn new(
        pipeline: &'a InstructPix2Pix,
        config: DdpoConfig,
        prompts: Vec<PromptItem>,
    ) -> Result<Self> {
        config.validate()?;
        if prompts.is_empty() {
            return Err(DdpoError::Dataset("no training prompts".into()));
        }
        let size = prompts[0].source.dimensions();
        if let Some(p) = prompts.iter().find(|p| p.source.dimensions() != size) {
            return Err(DdpoError::Dataset(format!(
                "prompt `{}` is {:?}, the others {size:?}: all sources must share the working size",
                p.key,
                p.source.dimensions()
            )));
        }
        let scheduler = DdimScheduler::new(
            &pipeline.scheduler_config,
            config.sample.num_steps,
            config.sample.eta,
        )?;
        let mut init_rng = ChaCha8Rng::seed_from_u64(config.seed);
        init_rng.set_stream(LORA_INIT_STREAM);
        let lora = TrainableLora::new(
            pipeline,
            config.lora.rank,
            config.lora.alpha,
            &config.lora.target_modules,
            &mut init_rng,
        )?;
        let optimizer = AdamW::new(
            lora.named_vars(),
            AdamWParams {
                lr: config.train.learning_rate,
                beta1: config.train.adam_beta1,
                beta2: config.train.adam_beta2,
                eps: config.train.adam_epsilon,
                weight_decay: config.train.adam_weight_decay,
            },
        )?;
        let tracker = PerPromptStatTracker::new(
            config.per_prompt_stat_tracking.buffer_size,
            config.per_prompt_stat_tracking.min_count,
        );
        let sampling_guidance = Guidance::of_policy(&config.sample, pipeline);
        let attention_source =
            AttentionSource::parse(&config.reward.attention_source).ok_or_else(|| {
                DdpoError::Config {
                    key: "reward.attention_source".into(),
                    message: format!("unknown source `{}`", config.reward.attention_source),
                }
            })?;
        Ok(Self {
            sampling_guidance,
            attention_source,
            validation: None,
            pipeline,
            rng: ChaCha8Rng::seed_from_u64(config.seed),
            run_dir: PathBuf::from(&config.logdir),
            config,
            prompts,
            scheduler,
            lora,
            optimizer,
            tracker,
            epoch: 0,
            last_checkpoint: None,
            history: Vec::new(),
        })
    }

    pub fn config(&self) -> &DdpoConfig {
        &self.config
    }

    /// Model selection on `prompts` (a validation world's turns, never the test set) as
    /// `validation.*` configures it.
    pub fn set_validation(&mut self, prompts: Vec<PromptItem>) -> Result<()> {
        self.validation = Some(Validation::new(self.config.validation.clone(), prompts)?);
        Ok(())
    }

    /// The guidance the policy samples with.
    pub fn sampling_guidance(&self) -> Guidance {
        self.sampling_guidance
    }

    /// The validation's best so far: (epoch, score).
    pub fn best(&self) -> Option<(usize, f64)> {
        self.validation.as_ref().and_then(Validation::best)
    }

    pub fn lora(&self) -> &TrainableLora {
        &self.lora
    }

    pub fn epochs_completed(&self) -> usize {
        self.epoch
    }

    pub fn history(&self) -> &[EpochLog] {
        &self.history
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    pub fn last_checkpoint(&self) -> Option<&Path> {
        self.last_checkpoint.as_deref()
    }

    /// Runs the remaining epochs up to `num_epochs`, logging, plotting and checkpointing.
    pub fn run(&mut self, progress: bool) -> Result<()> {
        std::fs::create_dir_all(&self.run_dir).map_err(io_error(&self.run_dir))?;
        let log_path = self.run_dir.join(LOG_FILE);
        if self.epoch == 0 && self.last_checkpoint.is_none() {
            // A fresh run must not mix its checkpoints with another run's.
            let root = self.run_dir.join(CHECKPOINTS_DIR);
            if root.is_dir() && !list_checkpoints(&root)?.is_empty() {
                return Err(DdpoError::Config {
                    key: "logdir".into(),
                    message: format!(
                        "{} already holds a run's checkpoints: resume it (--resume {}) or choose another logdir",
                        self.run_dir.display(),
                        self.run_dir.display()
                    ),
                });
            }
            std::fs::write(&log_path, "").map_err(io_error(&log_path))?;
            let validation_log = self.run_dir.join(VALIDATION_LOG);
            if validation_log.exists() {
                std::fs::write(&validation_log, "").map_err(io_error(&validation_log))?;
            }
        }
        let bar = if progress {
            indicatif::ProgressBar::new(self.config.num_epochs as u64)
        } else {
            indicatif::ProgressBar::hidden()
        };
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "ddpo {bar:30} {pos}/{len} epochs [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        bar.set_position(self.epoch as u64);
        if self.epoch == 0 {
            // The base itself (a zero adapter) is the score to beat.
            self.validate()?;
        }
        while self.epoch < self.config.num_epochs {
            if self.validation.as_ref().is_some_and(Validation::stopped) {
                tracing::info!(epoch = self.epoch, "validation stopped the run early");
                break;
            }
            let log = self.run_epoch()?;
            append_log(&log_path, &log)?;
            bar.set_position(log.epoch as u64);
            bar.set_message(format!(
                "reward {:.4} kl {:.2e} clipfrac {:.2}",
                log.reward_mean, log.approx_kl, log.clip_fraction
            ));
            tracing::info!(
                epoch = log.epoch,
                reward = log.reward_mean,
                attention = log.attention_mean,
                clip = log.clip_mean,
                kl = log.approx_kl,
                seconds = log.seconds,
                "ddpo epoch"
            );
            self.history.push(log);
            let validate_now = self
                .validation
                .as_ref()
                .is_some_and(|v| v.due(self.epoch, self.config.num_epochs));
            if validate_now {
                self.validate()?;
            }
            let stopping = self.validation.as_ref().is_some_and(Validation::stopped);
            if self.epoch.is_multiple_of(self.config.save_freq)
                || self.epoch == self.config.num_epochs
                || stopping
            {
                self.save_checkpoint()?;
                self.plot()?;
            }
        }
        bar.finish();
        Ok(())
    }

    /// One epoch of the algorithm; returns its log line (not yet written).
    pub fn run_epoch(&mut self) -> Result<EpochLog> {
        let started = Instant::now();
        let epoch = self.epoch + 1;
        let cfg = self.config.clone();
        let non_finite = |what: String, last: &Option<PathBuf>| DdpoError::NonFinite {
            what,
            epoch,
            last_checkpoint: last.clone(),
        };

        // 1. Sample trajectories with the current policy (no autograd graph).
        let policy = self.lora.resolved_detached()?;
        let sampling_guidance = self.sampling_guidance;
        let (indices, seeds, groups) = self.draw_samples();
        let mut batches = Vec::new();
        for (chunk, chunk_seeds) in indices
            .chunks(cfg.sample.batch_size)
            .zip(seeds.chunks(cfg.sample.batch_size))
        {
            batches.push(sample_batch(
                self.pipeline,
                &self.scheduler,
                &self.prompts,
                chunk,
                chunk_seeds,
                sampling_guidance,
                &policy,
                self.attention_source,
            )?);
        }
        let samples = Trajectories::concat(batches)?;
        let old_log_probs = samples.log_probs.flatten_all()?.to_vec1::<f32>()?;
        if let Some(bad) = old_log_probs.iter().find(|v| !v.is_finite()) {
            return Err(non_finite(
                format!("a sampled log-probability ({bad})"),
                &self.last_checkpoint,
            ));
        }

        // 2. Rewards.
        let terms: Vec<RewardTerms> = (0..samples.len())
            .map(|i| {
                self.prompts[samples.prompts[i]].reward(
                    &cfg.reward,
                    &samples.attention[i],
                    samples.grid,
                    &samples.images[i],
                )
            })
            .collect();
        let rewards: Vec<f64> = terms.iter().map(|t| t.reward).collect();
        if let Some(bad) = rewards.iter().find(|v| !v.is_finite()) {
            return Err(non_finite(
                format!("a reward ({bad})"),
                &self.last_checkpoint,
            ));
        }
        for map in &samples.attention {
            if map.iter().any(|v| !v.is_finite()) {
                return Err(non_finite(
                    "a cross-attention map".into(),
                    &self.last_checkpoint,
                ));
            }
        }

        let sample_seconds = started.elapsed().as_secs_f64();

        // 3. Advantages: within each prompt's group, or from per-prompt statistics.
        let advantages = match &groups {
            Some(groups) => group_advantages(
                groups,
                &rewards,
                cfg.per_prompt_stat_tracking.group_std_floor,
            ),
            None => {
                let keys: Vec<String> = samples
                    .prompts
                    .iter()
                    .map(|&i| self.prompts[i].key.clone())
                    .collect();
                self.tracker.update(&keys, &rewards)
            }
        };

        // 4. PPO: inner epochs over shuffled samples; each minibatch trains a shuffled subset of
        // the trainable steps, one step index per UNet call, so each step's gradient norm is seen.
        let train_guidance = if cfg.train.cfg {
            sampling_guidance
        } else {
            // Guidance 1 makes the pipeline use the text+image branch alone.
            Guidance {
                text: 1.0,
                image: 1.0,
            }
        };
        let vars: Vec<Var> = self.lora.named_vars().into_iter().map(|(_, v)| v).collect();
        let num_steps = self.scheduler.timesteps().len();
        let trainable = cfg.trainable_steps();
        let trained_steps = cfg.num_train_timesteps();
        let accumulation = (trained_steps * cfg.train.gradient_accumulation_steps) as f64;
        let size = self.prompts[0].source.dimensions();
        let device = self.pipeline.device().clone();
        let (mut kls, mut clip_fracs, mut losses, mut norms, mut kl_base) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut step_norms: Vec<Vec<f64>> = vec![Vec::new(); num_steps];
        let mut accumulated: Vec<Option<Tensor>> = vec![None; vars.len()];
        for _inner in 0..cfg.train.num_inner_epochs {
            let mut order: Vec<usize> = (0..samples.len()).collect();
            order.shuffle(&mut self.rng);
            for (minibatch_index, minibatch) in order.chunks(cfg.train.batch_size).enumerate() {
                let mut step_order: Vec<usize> = (0..trainable).collect();
                step_order.shuffle(&mut self.rng);
                let prompt_indices: Vec<usize> =
                    minibatch.iter().map(|&i| samples.prompts[i]).collect();
                let reqs = requests(
                    &self.prompts,
                    &prompt_indices,
                    train_guidance,
                    &self.scheduler,
                );
                let cond = self.pipeline.condition(&reqs, size)?;
                let adv: Vec<f32> = minibatch.iter().map(|&i| advantages[i] as f32).collect();
                let adv = Tensor::from_vec(adv, minibatch.len(), &device)?;
                let rows = Tensor::new(
                    minibatch.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                    &device,
                )?;
                for &step in &step_order[..trained_steps] {
                    let steps = vec![step; minibatch.len()];
                    let pick = |t: &Tensor| -> Result<Tensor> {
                        Ok(t.index_select(&rows, 0)?.narrow(1, step, 1)?.squeeze(1)?)
                    };
                    let latents = pick(&samples.latents)?;
                    let next_latents = pick(&samples.next_latents)?;
                    let old = pick(&samples.log_probs)?;
                    let adapter = self.lora.resolved()?;
                    let pred = policy_prediction(
                        self.pipeline,
                        &self.scheduler,
                        &cond,
                        &latents,
                        &steps,
                        &adapter,
                    )?;
                    let new = self
                        .scheduler
                        .log_prob(&pred, &steps, &latents, &next_latents)?
                        .to_dtype(DType::F32)?;
                    let term = ppo_loss(
                        &new,
                        &old,
                        &adv,
                        cfg.train.clip_range,
                        cfg.train.adv_clip_max,
                    )?;
                    let mut loss_tensor = term.loss;
                    if cfg.train.kl_weight > 0.0 {
                        let base = base_prediction(
                            self.pipeline,
                            &self.scheduler,
                            &cond,
                            &latents,
                            &steps,
                        )?;
                        let kl = kl_to_base(&self.scheduler, &pred, &base, &steps, &latents)?
                            .mean_all()?;
                        kl_base.push(kl.to_scalar::<f32>()? as f64);
                        loss_tensor = (loss_tensor + (kl * cfg.train.kl_weight)?)?;
                    }
                    let loss = loss_tensor.to_scalar::<f32>()? as f64;
                    if !loss.is_finite() {
                        return Err(non_finite(
                            format!("the PPO loss ({loss})"),
                            &self.last_checkpoint,
                        ));
                    }
                    let grads = loss_tensor.backward()?;
                    let mut squares = 0f64;
                    for (slot, var) in accumulated.iter_mut().zip(&vars) {
                        if let Some(g) = grads.get(var.as_tensor()) {
                            squares += g
                                .sqr()?
                                .sum_all()?
                                .to_dtype(DType::F64)?
                                .to_scalar::<f64>()?;
                            let g = (g / accumulation)?;
                            *slot = Some(match slot.take() {
                                Some(sum) => (sum + g)?,
                                None => g,
                            });
                        }
                    }
                    step_norms[step].push(squares.sqrt());
                    kls.push(term.approx_kl);
                    clip_fracs.push(term.clip_fraction);
                    losses.push(loss);
                }
                if (minibatch_index + 1).is_multiple_of(cfg.train.gradient_accumulation_steps) {
                    let norm = self
                        .optimizer
                        .step(&accumulated, cfg.train.max_grad_norm)
                        .map_err(|e| match e {
                            DdpoError::NonFinite { what, .. } => {
                                non_finite(what, &self.last_checkpoint)
                            }
                            other => other,
                        })?;
                    norms.push(norm);
                    accumulated = vec![None; vars.len()];
                }
            }
        }
        let mean = |v: &[f64]| mean_std(v.iter().copied()).0;
        let (reward_mean, reward_std) = mean_std(rewards.iter().copied());
        let term_mean = |f: fn(&RewardTerms) -> f64| mean(&terms.iter().map(f).collect::<Vec<_>>());
        self.epoch = epoch;
        Ok(EpochLog {
            epoch,
            reward_mean,
            reward_std,
            attention_mean: term_mean(|t| t.attention),
            clip_mean: term_mean(|t| t.clip),
            mae_mean: term_mean(|t| t.mae),
            localization_mean: term_mean(|t| t.localization),
            outside_mean: term_mean(|t| t.outside),
            oracle_l1_mean: term_mean(|t| t.oracle_l1.unwrap_or(f64::NAN)),
            within_group_std: groups.as_ref().map(|g| within_group_std(g, &rewards)),
            approx_kl: mean(&kls),
            kl_to_base: (!kl_base.is_empty()).then(|| mean(&kl_base)),
            clip_fraction: mean(&clip_fracs),
            loss: mean(&losses),
            grad_norm: mean(&norms),
            step_grad_norms: step_norms
                .iter()
                .map(|v| (!v.is_empty()).then(|| mean(v)))
                .collect(),
            lr: self.optimizer.params().lr,
            seconds: started.elapsed().as_secs_f64(),
            sample_seconds,
            train_seconds: started.elapsed().as_secs_f64() - sample_seconds,
            samples: samples.len(),
            optimizer_steps: self.optimizer.steps_taken(),
        })
    }

    /// The epoch's samples: prompt indices, one seed each, and with group sampling each sample's
    /// group (the position of its prompt among the epoch's prompts).
    fn draw_samples(&mut self) -> (Vec<usize>, Vec<u64>, Option<Vec<usize>>) {
        let cfg = &self.config;
        if cfg.group_sampling() {
            let count = cfg.sample.prompts_per_epoch.min(self.prompts.len());
            let chosen = rand::seq::index::sample(&mut self.rng, self.prompts.len(), count);
            let mut indices = Vec::new();
            let mut groups = Vec::new();
            for (group, prompt) in chosen.iter().enumerate() {
                for _ in 0..cfg.sample.samples_per_prompt {
                    indices.push(prompt);
                    groups.push(group);
                }
            }
            let seeds = (0..indices.len()).map(|_| self.rng.random()).collect();
            (indices, seeds, Some(groups))
        } else {
            let (mut indices, mut seeds) = (Vec::new(), Vec::new());
            for _ in 0..cfg.sample.num_batches_per_epoch {
                indices.extend(
                    (0..cfg.sample.batch_size)
                        .map(|_| self.rng.random_range(0..self.prompts.len())),
                );
                seeds.extend((0..cfg.sample.batch_size).map(|_| self.rng.random::<u64>()));
            }
            (indices, seeds, None)
        }
    }

    /// Scores the current adapter on the validation turns; a better score than the best so far
    /// writes `best/adapter.safetensors` (and `best/validation.json`).
    fn validate(&mut self) -> Result<()> {
        let Some(mut validation) = self.validation.take() else {
            return Ok(());
        };
        let adapter = self.lora.resolved_detached()?;
        let outcome = validation.evaluate(self.pipeline, &adapter, self.epoch);
        let result = outcome.and_then(|record| {
            append_json_line(&self.run_dir.join(VALIDATION_LOG), &record)?;
            tracing::info!(
                epoch = self.epoch,
                score = record.score,
                best_epoch = record.best_epoch,
                "validation"
            );
            if record.improved {
                let dir = self.run_dir.join(BEST_DIR);
                std::fs::create_dir_all(&dir).map_err(io_error(&dir))?;
                let partial = dir.join(format!("{CHECKPOINT_ADAPTER_FILE}.partial"));
                self.adapter("ddpo-best")?.save(&partial)?;
                let path = dir.join(CHECKPOINT_ADAPTER_FILE);
                std::fs::rename(&partial, &path).map_err(io_error(&path))?;
                let info = dir.join("validation.json");
                let text = serde_json::to_string_pretty(&record).unwrap_or_default();
                std::fs::write(&info, text + "\n").map_err(io_error(&info))?;
            }
            Ok(())
        });
        self.validation = Some(validation);
        result
    }

    /// The adapter as trained so far, ready to `save`.
    pub fn adapter(&self, name: &str) -> Result<LoraAdapter> {
        self.lora.to_adapter(
            name,
            self.pipeline.unet.fingerprint(),
            self.config.to_json(),
            self.reward_summary(),
        )
    }

    /// Mean reward of the first and last tenth of the epochs run (at least one each).
    pub fn reward_summary(&self) -> serde_json::Value {
        let n = self.history.len();
        let tenth = (n / 10).max(1).min(n.max(1));
        let mean_of = |logs: &[EpochLog]| {
            (!logs.is_empty()).then(|| mean_std(logs.iter().map(|l| l.reward_mean)).0)
        };
        let last = self.history.last();
        serde_json::json!({
            "epochs": n,
            "reward_first_tenth": mean_of(&self.history[..tenth.min(n)]),
            "reward_last_tenth": mean_of(&self.history[n.saturating_sub(tenth)..]),
            "reward_last_epoch": last.map(|l| l.reward_mean),
            "attention_last_epoch": last.map(|l| l.attention_mean),
            "clip_last_epoch": last.map(|l| l.clip_mean),
            "approx_kl_last_epoch": last.map(|l| l.approx_kl),
        })
    }

    /// Writes `reward.png` and `kl.png` into the run folder.
    pub fn plot(&self) -> Result<()> {
        let reward: Vec<(f64, f64)> = self
            .history
            .iter()
            .map(|l| (l.epoch as f64, l.reward_mean))
            .collect();
        let band: Vec<(f64, f64, f64)> = self
            .history
            .iter()
            .map(|l| {
                (
                    l.epoch as f64,
                    l.reward_mean - l.reward_std,
                    l.reward_mean + l.reward_std,
                )
            })
            .collect();
        // A tenth of the run (at least 1 epoch) smooths the noisy per-epoch means.
        let window = (self.history.len() / 10).max(1);
        plots::line_chart(&self.run_dir.join("reward.png"), &reward, &band, window)?;
        let kl: Vec<(f64, f64)> = self
            .history
            .iter()
            .map(|l| (l.epoch as f64, l.approx_kl))
            .collect();
        plots::line_chart(&self.run_dir.join("kl.png"), &kl, &[], window)?;
        Ok(())
    }

    /// `<logdir>/checkpoints/epoch-NNNNNN/`: LoRA variables, AdamW moments, the adapter file and
    /// `state.json` (epoch, RNG position, stat tracker, config); written under a temporary name
    /// and renamed, then old checkpoints beyond `num_checkpoint_limit` are removed.
    pub fn save_checkpoint(&mut self) -> Result<PathBuf> {
        let root = self.run_dir.join(CHECKPOINTS_DIR);
        std::fs::create_dir_all(&root).map_err(io_error(&root))?;
        let name = format!("epoch-{:06}", self.epoch);
        let dir = root.join(&name);
        let partial = root.join(format!("{name}.partial"));
        if partial.exists() {
            std::fs::remove_dir_all(&partial).map_err(io_error(&partial))?;
        }
        std::fs::create_dir_all(&partial).map_err(io_error(&partial))?;
        let save = |file: &str, tensors: &HashMap<String, Tensor>| -> Result<()> {
            let path = partial.join(file);
            candle_core::safetensors::save(tensors, &path).map_err(|e| DdpoError::Checkpoint {
                path,
                message: e.to_string(),
            })
        };
        save(LORA_FILE, &self.lora.tensors())?;
        save(OPTIMIZER_FILE, &self.optimizer.state())?;
        self.adapter("ddpo")?
            .save(&partial.join(CHECKPOINT_ADAPTER_FILE))?;
        let state = CheckpointState {
            epoch: self.epoch,
            optimizer_steps: self.optimizer.steps_taken(),
            rng_seed: self.rng.get_seed().to_vec(),
            rng_stream: self.rng.get_stream(),
            rng_word_pos: self.rng.get_word_pos().to_string(),
            tracker: self.tracker.state(),
            lora_rank: self.lora.rank,
            lora_alpha: self.lora.alpha,
            lora_target_modules: self.lora.target_modules.clone(),
            base_fingerprint: self.pipeline.unet.fingerprint().to_string(),
            config: self.config.to_json(),
            validation: self.validation.as_ref().map(Validation::state),
        };
        let state_path = partial.join(STATE_FILE);
        let text = serde_json::to_string_pretty(&state).map_err(|e| DdpoError::Checkpoint {
            path: state_path.clone(),
            message: e.to_string(),
        })?;
        std::fs::write(&state_path, text).map_err(io_error(&state_path))?;
        if dir.exists() {
            std::fs::remove_dir_all(&dir).map_err(io_error(&dir))?;
        }
        std::fs::rename(&partial, &dir).map_err(io_error(&dir))?;
        self.last_checkpoint = Some(dir.clone());
        for old in list_checkpoints(&root)?
            .into_iter()
            .rev()
            .skip(self.config.num_checkpoint_limit)
        {
            if old != dir {
                std::fs::remove_dir_all(&old).map_err(io_error(&old))?;
            }
        }
        Ok(dir)
    }

    /// Continues from a checkpoint folder (or a run folder / `checkpoints/` folder: its latest):
    /// LoRA, AdamW moments, RNG position, stat tracker, epoch, and the log up to that epoch.
    pub fn resume(&mut self, from: &Path) -> Result<()> {
        let dir = resolve_checkpoint(from)?;
        let checkpoint_error = |message: String| DdpoError::Checkpoint {
            path: dir.clone(),
            message,
        };
        let state_path = dir.join(STATE_FILE);
        let text = std::fs::read_to_string(&state_path).map_err(io_error(&state_path))?;
        let state: CheckpointState = serde_json::from_str(&text)
            .map_err(|e| checkpoint_error(format!("{STATE_FILE}: {e}")))?;
        if state.base_fingerprint != self.pipeline.unet.fingerprint() {
            return Err(checkpoint_error(
                "it was trained on another base model (fingerprints differ)".into(),
            ));
        }
        if state.lora_rank != self.lora.rank
            || state.lora_alpha != self.lora.alpha
            || state.lora_target_modules != self.lora.target_modules
        {
            return Err(checkpoint_error(format!(
                "its LoRA is rank {} alpha {} on {:?}; this run's is rank {} alpha {} on {:?}",
                state.lora_rank,
                state.lora_alpha,
                state.lora_target_modules,
                self.lora.rank,
                self.lora.alpha,
                self.lora.target_modules
            )));
        }
        let load = |file: &str| -> Result<HashMap<String, Tensor>> {
            let path = dir.join(file);
            candle_core::safetensors::load(&path, self.pipeline.device()).map_err(|e| {
                DdpoError::Checkpoint {
                    path,
                    message: e.to_string(),
                }
            })
        };
        self.lora
            .load_tensors(&load(LORA_FILE)?)
            .map_err(|e| checkpoint_error(e.to_string()))?;
        self.optimizer
            .load_state(&load(OPTIMIZER_FILE)?, state.optimizer_steps)
            .map_err(|e| checkpoint_error(e.to_string()))?;
        let seed: [u8; 32] = state
            .rng_seed
            .as_slice()
            .try_into()
            .map_err(|_| checkpoint_error("rng_seed must be 32 bytes".into()))?;
        let word_pos: u128 = state
            .rng_word_pos
            .parse()
            .map_err(|_| checkpoint_error(format!("bad rng_word_pos `{}`", state.rng_word_pos)))?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        rng.set_stream(state.rng_stream);
        rng.set_word_pos(word_pos);
        self.rng = rng;
        self.tracker = PerPromptStatTracker::from_state(&state.tracker);
        if let (Some(validation), Some(saved)) = (self.validation.as_mut(), &state.validation) {
            validation.restore(saved);
        }
        self.epoch = state.epoch;
        self.last_checkpoint = Some(dir.clone());
        // The log continues from the checkpoint: lines of epochs past it are dropped.
        std::fs::create_dir_all(&self.run_dir).map_err(io_error(&self.run_dir))?;
        let log_path = self.run_dir.join(LOG_FILE);
        self.history = match std::fs::read_to_string(&log_path) {
            Ok(text) => text
                .lines()
                .filter_map(|l| serde_json::from_str::<EpochLog>(l).ok())
                .filter(|l| l.epoch <= state.epoch)
                .collect(),
            Err(_) => Vec::new(),
        };
        let mut file = std::fs::File::create(&log_path).map_err(io_error(&log_path))?;
        for log in &self.history {
            let line = serde_json::to_string(log).unwrap_or_default();
            writeln!(file, "{line}").map_err(io_error(&log_path))?;
        }
        Ok(())
    }
}

fn append_log(path: &Path, log: &EpochLog) -> Result<()> {
    append_json_line(path, log)
}

fn append_json_line(path: &Path, value: &impl Serialize) -> Result<()> {
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(io_error(path))?;
    let line = serde_json::to_string(value).unwrap_or_default();
    writeln!(file, "{line}").map_err(io_error(path))
}

/// Complete checkpoints under `root`, oldest first.
pub fn list_checkpoints(root: &Path) -> Result<Vec<PathBuf>> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io_error(root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.join(STATE_FILE).is_file()
                && p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("epoch-") && !n.ends_with(".partial"))
        })
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// A checkpoint folder itself, or the latest under a `checkpoints/` folder or a run folder.
pub fn resolve_checkpoint(from: &Path) -> Result<PathBuf> {
    if from.join(STATE_FILE).is_file() {
        return Ok(from.to_path_buf());
    }
    for root in [from.join(CHECKPOINTS_DIR), from.to_path_buf()] {
        if root.is_dir() {
            if let Some(latest) = list_checkpoints(&root)?.pop() {
                return Ok(latest);
            }
        }
    }
    Err(DdpoError::Checkpoint {
        path: from.to_path_buf(),
        message: format!("no {STATE_FILE} here nor a checkpoint folder under it"),
    })
}
