//! The DDPO run's configuration: the paper's keys (its Table 4, without the `config.` prefix) plus
//! ours (`sample.image_guidance_scale`, `lora.*`, `reward.*`, `data.*`), read from a TOML file and
//! repeated `--set key=value` overrides on top of a preset. An unknown key or a bad value is an error
//! that names the key.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{DdpoError, Result};

/// The projections LoRA may target (diffusers' names inside an attention module).
pub const LORA_TARGETS: [&str; 4] = ["to_q", "to_k", "to_v", "to_out.0"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DdpoConfig {
    pub seed: u64,
    pub num_epochs: usize,
    /// Epochs between checkpoints (the last epoch always gets one).
    pub save_freq: usize,
    pub num_checkpoint_limit: usize,
    /// Run folder: checkpoints/, ddpo.jsonl, reward.png, kl.png.
    pub logdir: String,
    /// A checkpoint folder, or a run's `checkpoints/` folder (its latest); "" = a fresh run.
    pub resume_from: String,
    /// Only LoRA training is supported (the base weights stay frozen).
    pub use_lora: bool,
    pub sample: SampleConfig,
    pub train: TrainConfig,
    pub per_prompt_stat_tracking: StatTrackingConfig,
    pub lora: LoraConfig,
    pub reward: RewardConfig,
    pub data: DataConfig,
    pub validation: ValidationConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SampleConfig {
    pub num_steps: usize,
    pub eta: f64,
    /// Text guidance.
    pub guidance_scale: f64,
    pub image_guidance_scale: f64,
    /// Samples per UNet call while sampling (with group sampling: the chunk size).
    pub batch_size: usize,
    /// Without group sampling: samples per epoch = batch_size x this, each prompt drawn
    /// independently.
    pub num_batches_per_epoch: usize,
    /// Group sampling: each epoch draws this many distinct prompts (0 = off: independent draws)...
    pub prompts_per_epoch: usize,
    /// ...and this many samples of each, whose advantages are normalised within the group.
    pub samples_per_prompt: usize,
    /// Sample with the model's own guidance (`model_index.json` → `rl4pix.sampling`) instead of
    /// `guidance_scale` / `image_guidance_scale` (which stay the fallback for a model without one).
    pub use_model_guidance: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrainConfig {
    pub batch_size: usize,
    pub learning_rate: f64,
    pub adam_beta1: f64,
    pub adam_beta2: f64,
    pub adam_weight_decay: f64,
    pub adam_epsilon: f64,
    /// Optimizer steps happen every `gradient_accumulation_steps` minibatches (each accumulated
    /// over all its trained timesteps).
    pub gradient_accumulation_steps: usize,
    pub max_grad_norm: f64,
    pub num_inner_epochs: usize,
    /// Recompute log-probs under the same three-way guidance as sampling.
    pub cfg: bool,
    pub adv_clip_max: f64,
    /// PPO's epsilon.
    pub clip_range: f64,
    pub timestep_fraction: f64,
    /// The last N denoising steps are never trained: with v-prediction their log-probability
    /// gradients are several times larger than the layout steps' while their noise barely moves
    /// the image, so they would dominate the clipped gradient. `timestep_fraction` applies to the
    /// steps left.
    pub skip_last_steps: usize,
    /// Weight of the penalty that keeps the policy near the base: the mean squared difference of
    /// the adapted and the frozen base UNet's guided predictions on each trained step (the step's
    /// mean moves linearly with it). 0 = off (no extra forward pass).
    pub kl_weight: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StatTrackingConfig {
    pub buffer_size: usize,
    pub min_count: usize,
    /// With group sampling: the std of a prompt's group is at least this, so a group whose
    /// rewards are nearly equal gives small advantages instead of +-1 noise.
    pub group_std_floor: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: Vec<String>,
}

/// `reward = attention_weight * L_att + alpha * L_clip + localization_weight * L_loc`.
/// The paper's Table 2: both terms (defaults), attention only (`alpha = 0`), clip only
/// (`attention_weight = 0`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RewardConfig {
    pub attention_weight: f64,
    pub alpha: f64,
    /// The clip term counts only when MAE(source, output) exceeds tau.
    pub tau: f64,
    /// Ours: cosine between the mask and the per-pixel change |output - source|.
    pub localization_weight: f64,
    /// Ours: weight of the mean change |output - source| outside the mask (a penalty when < 0).
    pub outside_weight: f64,
    /// ABLATION ONLY, not the paper's method: weight of -L1(output, target), which needs the
    /// ground-truth edit. It shows what the optimiser can reach; it never makes a shipped adapter.
    pub oracle_weight: f64,
    /// Where L_att's cross-attention is read: `base` (the frozen base UNet on the sampled latents,
    /// so the adapter cannot move the map without moving the image) or `policy` (the adapted
    /// UNet's own attention while sampling, as the paper).
    pub attention_source: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DataConfig {
    /// Square working size in pixels; 0 = the first source image's size.
    pub resolution: u32,
    /// Train on the first N turns only (0 = all); few prompts give per-prompt statistics history.
    pub max_prompts: usize,
    /// Parquet split (`train`, `dev`, `test`); "" = every shard.
    pub split: String,
}

/// Model selection on a small validation world (never the test set): every `every` epochs the
/// adapter edits the first `max_turns` turns with the model's own sampler and is scored by
/// `metric`; the best adapter is kept as `best/adapter.safetensors`, and after `patience`
/// evaluations without a better score the run stops (0 = never).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ValidationConfig {
    /// MagicBrush-format folder; "" = no validation.
    pub dataset: String,
    pub max_turns: usize,
    pub every: usize,
    /// `l1`, `l2`, `edit_l1` (lower is better) or `psnr`, `ssim` (higher is better).
    pub metric: String,
    pub patience: usize,
    /// Denoising steps of the validation edits; 0 = the pipeline's default.
    pub steps: usize,
}

/// The validation metrics `validation.metric` may name.
pub const VALIDATION_METRICS: [&str; 5] = ["l1", "l2", "edit_l1", "psnr", "ssim"];

impl RewardConfig {
    /// Every weight 0 (a starting point for tests and for naming one term).
    pub fn default_weights() -> Self {
        Self {
            attention_weight: 0.0,
            alpha: 0.0,
            tau: 0.0,
            localization_weight: 0.0,
            outside_weight: 0.0,
            oracle_weight: 0.0,
            attention_source: "policy".into(),
        }
    }
}

impl Default for DdpoConfig {
    fn default() -> Self {
        Self::paper()
    }
}

impl DdpoConfig {
    /// The paper's Table 4 where it gives a value; InstructPix2Pix's image guidance 1.5, LoRA rank 4
    /// with alpha = rank (diffusers' default), tau = 0 (the paper gives none).
    pub fn paper() -> Self {
        Self {
            seed: 42,
            num_epochs: 200,
            save_freq: 50,
            num_checkpoint_limit: 5,
            logdir: "logs".into(),
            resume_from: String::new(),
            use_lora: true,
            sample: SampleConfig {
                num_steps: 50,
                eta: 1.0,
                guidance_scale: 5.0,
                image_guidance_scale: 1.5,
                batch_size: 1,
                num_batches_per_epoch: 2,
                prompts_per_epoch: 0,
                samples_per_prompt: 1,
                use_model_guidance: false,
            },
            train: TrainConfig {
                batch_size: 1,
                learning_rate: 2e-4,
                adam_beta1: 0.9,
                adam_beta2: 0.999,
                adam_weight_decay: 1e-4,
                adam_epsilon: 1e-8,
                gradient_accumulation_steps: 1,
                max_grad_norm: 1.0,
                num_inner_epochs: 1,
                cfg: true,
                adv_clip_max: 5.0,
                clip_range: 1e-4,
                timestep_fraction: 1.0,
                skip_last_steps: 0,
                kl_weight: 0.0,
            },
            per_prompt_stat_tracking: StatTrackingConfig {
                buffer_size: 16,
                min_count: 16,
                group_std_floor: 0.0,
            },
            lora: LoraConfig {
                rank: 4,
                alpha: 4.0,
                target_modules: LORA_TARGETS.iter().map(|s| s.to_string()).collect(),
            },
            reward: RewardConfig {
                attention_weight: 1.0,
                alpha: -1.0,
                tau: 0.0,
                localization_weight: 0.0,
                outside_weight: 0.0,
                oracle_weight: 0.0,
                attention_source: "policy".into(),
            },
            data: DataConfig {
                resolution: 0,
                max_prompts: 0,
                split: String::new(),
            },
            validation: ValidationConfig {
                dataset: String::new(),
                max_turns: 128,
                every: 10,
                metric: "l1".into(),
                patience: 0,
                steps: 0,
            },
        }
    }

    /// A faster start for two CPU cores and the toy model: 10 DDIM steps, 16 samples per epoch
    /// over 32 prompts (so each prompt gathers history for per-prompt statistics), half the
    /// timesteps trained per sample.
    pub fn cpu() -> Self {
        let mut c = Self::paper();
        c.num_epochs = 100;
        c.save_freq = 10;
        c.sample.num_steps = 10;
        c.sample.batch_size = 8;
        c.sample.num_batches_per_epoch = 2;
        c.train.batch_size = 8;
        c.train.timestep_fraction = 0.5;
        c.per_prompt_stat_tracking.min_count = 8;
        c.data.max_prompts = 32;
        c
    }

    /// Our recipe for the toy v-prediction model on two CPU cores: 8 prompts x 8 samples per
    /// epoch over 512 training turns, advantages within each prompt's group, the model's own
    /// guidance, the last two (noise-dominated) steps untrained, L_att read from the frozen base,
    /// and a validation world for model selection (set `validation.dataset`).
    pub fn group() -> Self {
        let mut c = Self::cpu();
        c.num_epochs = 120;
        c.sample.batch_size = 16;
        c.sample.prompts_per_epoch = 8;
        c.sample.samples_per_prompt = 8;
        c.sample.use_model_guidance = true;
        c.train.batch_size = 16;
        c.train.gradient_accumulation_steps = 2;
        c.train.timestep_fraction = 0.5;
        c.train.skip_last_steps = 2;
        c.train.learning_rate = 4e-4;
        c.train.clip_range = 0.1;
        c.per_prompt_stat_tracking.group_std_floor = 0.01;
        c.reward.attention_source = "base".into();
        c.data.max_prompts = 512;
        c
    }

    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "paper" => Ok(Self::paper()),
            "cpu" => Ok(Self::cpu()),
            "group" => Ok(Self::group()),
            other => Err(DdpoError::Config {
                key: "preset".into(),
                message: format!("unknown preset `{other}` (expected paper, cpu or group)"),
            }),
        }
    }

    /// `preset`, then the TOML file, then each `key=value` in order; validated.
    pub fn build(preset: &str, file: Option<&Path>, sets: &[String]) -> Result<Self> {
        let mut tree = ConfigTree::new(&Self::preset(preset)?)?;
        if let Some(path) = file {
            tree.apply_toml_file(path)?;
        }
        for set in sets {
            tree.apply_assignment(set)?;
        }
        tree.finish()
    }

    /// The same configuration with overrides applied (for tests and programmatic use).
    pub fn with_sets(&self, sets: &[&str]) -> Result<Self> {
        let mut tree = ConfigTree::new(self)?;
        for set in sets {
            tree.apply_assignment(set)?;
        }
        tree.finish()
    }

    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// Every key, dotted, with its value (for the README table and `--help`).
    pub fn flat_keys(&self) -> Vec<(String, Value)> {
        let mut out = Vec::new();
        flatten(&self.to_json(), "", &mut out);
        out
    }

    pub fn samples_per_epoch(&self) -> usize {
        if self.group_sampling() {
            self.sample.prompts_per_epoch * self.sample.samples_per_prompt
        } else {
            self.sample.batch_size * self.sample.num_batches_per_epoch
        }
    }

    /// Each epoch draws `prompts_per_epoch` prompts x `samples_per_prompt` samples.
    pub fn group_sampling(&self) -> bool {
        self.sample.prompts_per_epoch > 0
    }

    /// Denoising steps that may be trained: all but the last `skip_last_steps`.
    pub fn trainable_steps(&self) -> usize {
        self.sample
            .num_steps
            .saturating_sub(self.train.skip_last_steps)
    }

    /// Trained timesteps per sample: ceil-free, as ddpo-pytorch (`int(num_steps * fraction)`),
    /// of the trainable steps.
    pub fn num_train_timesteps(&self) -> usize {
        ((self.trainable_steps() as f64) * self.train.timestep_fraction) as usize
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |key: &str, message: String| {
            Err(DdpoError::Config {
                key: key.into(),
                message,
            })
        };
        let positive_int = [
            ("num_epochs", self.num_epochs),
            ("save_freq", self.save_freq),
            ("num_checkpoint_limit", self.num_checkpoint_limit),
            ("sample.num_steps", self.sample.num_steps),
            ("sample.batch_size", self.sample.batch_size),
            (
                "sample.num_batches_per_epoch",
                self.sample.num_batches_per_epoch,
            ),
            ("train.batch_size", self.train.batch_size),
            (
                "train.gradient_accumulation_steps",
                self.train.gradient_accumulation_steps,
            ),
            ("train.num_inner_epochs", self.train.num_inner_epochs),
            (
                "per_prompt_stat_tracking.buffer_size",
                self.per_prompt_stat_tracking.buffer_size,
            ),
            ("lora.rank", self.lora.rank),
        ];
        for (key, value) in positive_int {
            if value == 0 {
                return bad(key, "must be at least 1".into());
            }
        }
        if self.sample.num_steps > 1000 {
            return bad(
                "sample.num_steps",
                format!("{} is above 1000", self.sample.num_steps),
            );
        }
        let finite_non_negative = [
            ("sample.eta", self.sample.eta),
            ("sample.guidance_scale", self.sample.guidance_scale),
            (
                "sample.image_guidance_scale",
                self.sample.image_guidance_scale,
            ),
            ("train.adam_weight_decay", self.train.adam_weight_decay),
            ("train.max_grad_norm", self.train.max_grad_norm),
            ("reward.tau", self.reward.tau),
            ("train.kl_weight", self.train.kl_weight),
            (
                "per_prompt_stat_tracking.group_std_floor",
                self.per_prompt_stat_tracking.group_std_floor,
            ),
        ];
        for (key, value) in finite_non_negative {
            if !(value.is_finite() && value >= 0.0) {
                return bad(key, format!("must be a finite number >= 0, got {value}"));
            }
        }
        let finite_positive = [
            ("train.learning_rate", self.train.learning_rate),
            ("train.adam_epsilon", self.train.adam_epsilon),
            ("train.adv_clip_max", self.train.adv_clip_max),
            ("train.clip_range", self.train.clip_range),
            ("lora.alpha", self.lora.alpha),
        ];
        for (key, value) in finite_positive {
            if !(value.is_finite() && value > 0.0) {
                return bad(key, format!("must be a finite number > 0, got {value}"));
            }
        }
        for (key, value) in [
            ("train.adam_beta1", self.train.adam_beta1),
            ("train.adam_beta2", self.train.adam_beta2),
        ] {
            if !(0.0..1.0).contains(&value) {
                return bad(key, format!("must be in [0, 1), got {value}"));
            }
        }
        for (key, value) in [
            ("reward.attention_weight", self.reward.attention_weight),
            ("reward.alpha", self.reward.alpha),
            (
                "reward.localization_weight",
                self.reward.localization_weight,
            ),
            ("reward.outside_weight", self.reward.outside_weight),
            ("reward.oracle_weight", self.reward.oracle_weight),
        ] {
            if !value.is_finite() {
                return bad(key, format!("must be finite, got {value}"));
            }
        }
        if self.sample.eta <= 0.0 {
            return bad(
                "sample.eta",
                "must be > 0: DDPO needs the stochastic DDIM step's log-probability".into(),
            );
        }
        if !(self.train.timestep_fraction > 0.0 && self.train.timestep_fraction <= 1.0) {
            return bad(
                "train.timestep_fraction",
                format!("must be in (0, 1], got {}", self.train.timestep_fraction),
            );
        }
        if self.trainable_steps() == 0 {
            return bad(
                "train.skip_last_steps",
                format!(
                    "{} of {} steps leaves none to train",
                    self.train.skip_last_steps, self.sample.num_steps
                ),
            );
        }
        if self.num_train_timesteps() == 0 {
            return bad(
                "train.timestep_fraction",
                format!(
                    "{} of {} trainable steps trains no timestep",
                    self.train.timestep_fraction,
                    self.trainable_steps()
                ),
            );
        }
        if self.group_sampling() && self.sample.samples_per_prompt < 2 {
            return bad(
                "sample.samples_per_prompt",
                "must be at least 2 with group sampling (a group of one has no spread)".into(),
            );
        }
        if !["base", "policy"].contains(&self.reward.attention_source.as_str()) {
            return bad(
                "reward.attention_source",
                format!(
                    "unknown source `{}` (expected base or policy)",
                    self.reward.attention_source
                ),
            );
        }
        if !VALIDATION_METRICS.contains(&self.validation.metric.as_str()) {
            return bad(
                "validation.metric",
                format!(
                    "unknown metric `{}` (expected one of {VALIDATION_METRICS:?})",
                    self.validation.metric
                ),
            );
        }
        if !self.validation.dataset.is_empty() {
            for (key, value) in [
                ("validation.every", self.validation.every),
                ("validation.max_turns", self.validation.max_turns),
            ] {
                if value == 0 {
                    return bad(key, "must be at least 1 with a validation data set".into());
                }
            }
        }
        if !self.use_lora {
            return bad(
                "use_lora",
                "only LoRA training is supported (the base stays frozen)".into(),
            );
        }
        let samples = self.samples_per_epoch();
        if !samples.is_multiple_of(self.train.batch_size) {
            return bad(
                "train.batch_size",
                format!(
                    "{} does not divide the {samples} samples per epoch (sample.batch_size x sample.num_batches_per_epoch, or prompts_per_epoch x samples_per_prompt)",
                    self.train.batch_size
                ),
            );
        }
        let minibatches = samples / self.train.batch_size;
        if !minibatches.is_multiple_of(self.train.gradient_accumulation_steps) {
            return bad(
                "train.gradient_accumulation_steps",
                format!(
                    "{} does not divide the {minibatches} training minibatches per epoch",
                    self.train.gradient_accumulation_steps
                ),
            );
        }
        if self.lora.target_modules.is_empty() {
            return bad("lora.target_modules", "names no module".into());
        }
        for module in &self.lora.target_modules {
            if !LORA_TARGETS.contains(&module.as_str()) {
                return bad(
                    "lora.target_modules",
                    format!("unknown module `{module}` (expected some of {LORA_TARGETS:?})"),
                );
            }
        }
        if let Some(split) = (!self.data.split.is_empty()).then_some(self.data.split.as_str()) {
            if !["train", "dev", "test"].contains(&split) {
                return bad(
                    "data.split",
                    format!("unknown split `{split}` (expected train, dev, test or \"\")"),
                );
            }
        }
        if self.data.resolution > 4096 {
            return bad(
                "data.resolution",
                format!("{} is above 4096", self.data.resolution),
            );
        }
        Ok(())
    }
}

/// Every leaf of a JSON tree as (dotted key, value), in the tree's order.
pub(crate) fn flatten(value: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(v, &key, out);
            }
        }
        leaf => out.push((prefix.to_string(), leaf.clone())),
    }
}

/// The configuration as a JSON tree while overrides are applied; each leaf keeps the type of its
/// default, so a value of another type is refused with the key's name.
struct ConfigTree {
    tree: Value,
}

impl ConfigTree {
    fn new(base: &DdpoConfig) -> Result<Self> {
        Ok(Self {
            tree: serde_json::to_value(base).map_err(|e| DdpoError::Config {
                key: "(all)".into(),
                message: e.to_string(),
            })?,
        })
    }

    fn apply_toml_file(&mut self, path: &Path) -> Result<()> {
        let text = std::fs::read_to_string(path).map_err(|source| DdpoError::Io {
            path: path.to_path_buf(),
            cause: source,
        })?;
        let table: toml::Table = toml::from_str(&text).map_err(|e| DdpoError::Config {
            key: path.display().to_string(),
            message: format!("not valid TOML: {e}"),
        })?;
        self.apply_table(&table, "")
    }

    fn apply_table(&mut self, table: &toml::Table, prefix: &str) -> Result<()> {
        for (k, v) in table {
            let key = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                // `[config]` (the paper's prefix) and `[sample]`-style tables nest; a table where a
                // leaf is expected is caught by `set`.
                toml::Value::Table(inner) if key == "config" || self.is_section(&key) => {
                    let next = if key == "config" { "" } else { key.as_str() };
                    self.apply_table(inner, next)?;
                }
                leaf => self.set(&key, toml_to_json(leaf))?,
            }
        }
        Ok(())
    }

    fn is_section(&self, key: &str) -> bool {
        matches!(self.lookup(key), Some(Value::Object(_)))
    }

    fn lookup(&self, key: &str) -> Option<&Value> {
        key.split('.')
            .try_fold(&self.tree, |node, part| node.as_object()?.get(part))
    }

    /// `key=value`, the value read as a TOML value (`2e-4`, `true`, `"x"`, `["to_q"]`), or as a
    /// bare string when it is not one (`logdir=runs/a`).
    fn apply_assignment(&mut self, assignment: &str) -> Result<()> {
        let Some((key, raw)) = assignment.split_once('=') else {
            return Err(DdpoError::Config {
                key: assignment.trim().into(),
                message: "expected key=value".into(),
            });
        };
        let key = key.trim();
        let raw = raw.trim();
        let value = match toml::from_str::<toml::Table>(&format!("v = {raw}")) {
            Ok(mut t) => t.remove("v").map(|v| toml_to_json(&v)),
            Err(_) => None,
        }
        .unwrap_or_else(|| Value::String(raw.to_string()));
        self.set(key, value)
    }

    fn set(&mut self, key: &str, value: Value) -> Result<()> {
        let key = key.strip_prefix("config.").unwrap_or(key);
        let known = || {
            DdpoConfig::paper()
                .flat_keys()
                .into_iter()
                .map(|(k, _)| k)
                .collect::<Vec<_>>()
                .join(", ")
        };
        let mut node = &mut self.tree;
        for part in key.split('.') {
            node = match node.as_object_mut().and_then(|m| m.get_mut(part)) {
                Some(next) => next,
                None => {
                    return Err(DdpoError::Config {
                        key: key.into(),
                        message: format!("unknown key (known keys: {})", known()),
                    })
                }
            };
        }
        let bad = |expected: &str| DdpoError::Config {
            key: key.into(),
            message: format!("expected {expected}, got {value}"),
        };
        let checked = match &*node {
            Value::Object(_) => {
                return Err(DdpoError::Config {
                    key: key.into(),
                    message: "is a section, not a value".into(),
                })
            }
            Value::Bool(_) => value
                .as_bool()
                .map(Value::Bool)
                .ok_or_else(|| bad("true or false"))?,
            Value::String(_) => match &value {
                Value::String(_) => value.clone(),
                _ => return Err(bad("a string")),
            },
            Value::Number(n) if n.is_u64() => match value.as_u64() {
                Some(v) => Value::from(v),
                None => return Err(bad("a whole number >= 0")),
            },
            Value::Number(_) => match value.as_f64() {
                Some(v) => Value::from(v),
                None => return Err(bad("a number")),
            },
            Value::Array(_) => match &value {
                Value::Array(items) if items.iter().all(Value::is_string) => value.clone(),
                Value::String(s) => {
                    Value::Array(s.split(',').map(|x| Value::from(x.trim())).collect())
                }
                _ => return Err(bad("a list of strings")),
            },
            Value::Null => value.clone(),
        };
        *node = checked;
        Ok(())
    }

    fn finish(self) -> Result<DdpoConfig> {
        let config: DdpoConfig =
            serde_json::from_value(self.tree).map_err(|e| DdpoError::Config {
                key: "(all)".into(),
                message: e.to_string(),
            })?;
        config.validate()?;
        Ok(config)
    }
}

fn toml_to_json(value: &toml::Value) -> Value {
    match value {
        toml::Value::String(s) => Value::String(s.clone()),
        toml::Value::Integer(i) => Value::from(*i),
        toml::Value::Float(f) => Value::from(*f),
        toml::Value::Boolean(b) => Value::Bool(*b),
        toml::Value::Datetime(d) => Value::String(d.to_string()),
        toml::Value::Array(items) => Value::Array(items.iter().map(toml_to_json).collect()),
        toml::Value::Table(t) => Value::Object(
            t.iter()
                .map(|(k, v)| (k.clone(), toml_to_json(v)))
                .collect(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_of(err: DdpoError) -> String {
        match err {
            DdpoError::Config { key, .. } => key,
            other => panic!("expected a config error, got {other}"),
        }
    }

    #[test]
    fn defaults_are_the_papers() {
        let c = DdpoConfig::paper();
        c.validate().unwrap();
        assert_eq!(c.seed, 42);
        assert_eq!(c.sample.num_steps, 50);
        assert_eq!(c.train.learning_rate, 2e-4);
        assert_eq!(c.train.clip_range, 1e-4);
        assert_eq!(c.per_prompt_stat_tracking.min_count, 16);
        assert_eq!(c.reward.alpha, -1.0);
        DdpoConfig::cpu().validate().unwrap();
        let g = DdpoConfig::group();
        g.validate().unwrap();
        assert_eq!(g.samples_per_epoch(), 64, "8 prompts x 8 samples");
        assert_eq!(g.trainable_steps(), 8);
        assert_eq!(g.num_train_timesteps(), 4);
        assert_eq!(g.reward.oracle_weight, 0.0, "the oracle is never a default");
    }

    #[test]
    fn sets_and_files_override_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("run.toml");
        std::fs::write(
            &file,
            "seed = 7\n[sample]\nnum_steps = 8\n[config.train]\nlearning_rate = 1e-3\n\
             [reward]\nalpha = 0\n",
        )
        .unwrap();
        let c = DdpoConfig::build(
            "cpu",
            Some(&file),
            &[
                "sample.num_steps=4".into(),
                "logdir=runs/a b".into(),
                "train.cfg=false".into(),
                "lora.target_modules=to_q,to_v".into(),
            ],
        )
        .unwrap();
        assert_eq!(c.seed, 7);
        assert_eq!(c.sample.num_steps, 4);
        assert_eq!(c.train.learning_rate, 1e-3);
        assert_eq!(c.reward.alpha, 0.0);
        assert_eq!(c.logdir, "runs/a b");
        assert!(!c.train.cfg);
        assert_eq!(c.lora.target_modules, vec!["to_q", "to_v"]);
        assert_eq!(
            c.sample.batch_size, 8,
            "the preset stays under the overrides"
        );
    }

    #[test]
    fn errors_name_the_key() {
        let p = DdpoConfig::paper();
        for (set, key) in [
            ("train.learnig_rate=1", "train.learnig_rate"),
            ("bogus=1", "bogus"),
            ("train.learning_rate=fast", "train.learning_rate"),
            ("train.learning_rate=-1", "train.learning_rate"),
            ("sample.num_steps=2.5", "sample.num_steps"),
            ("sample.num_steps=0", "sample.num_steps"),
            ("train.cfg=maybe", "train.cfg"),
            ("sample.eta=0", "sample.eta"),
            ("train.batch_size=3", "train.batch_size"),
            ("lora.target_modules=to_x", "lora.target_modules"),
            ("use_lora=false", "use_lora"),
            ("train=1", "train"),
            ("train.timestep_fraction=1.5", "train.timestep_fraction"),
            ("train.skip_last_steps=50", "train.skip_last_steps"),
            ("sample.prompts_per_epoch=2", "sample.samples_per_prompt"),
            ("reward.attention_source=image", "reward.attention_source"),
            ("validation.metric=fid", "validation.metric"),
            ("train.kl_weight=-1", "train.kl_weight"),
            ("reward.oracle_weight=nan", "reward.oracle_weight"),
        ] {
            let err = p.with_sets(&[set]).unwrap_err();
            let message = err.to_string();
            assert_eq!(key_of(err), key, "{set}: {message}");
            assert!(message.contains(key), "{message}");
        }
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("bad.toml");
        std::fs::write(&file, "[train]\nlearning_rat = 1e-3\n").unwrap();
        let err = DdpoConfig::build("paper", Some(&file), &[]).unwrap_err();
        assert_eq!(key_of(err), "train.learning_rat");
        assert_eq!(
            key_of(DdpoConfig::build("fast", None, &[]).unwrap_err()),
            "preset"
        );
    }

    #[test]
    fn printed_config_reads_back() {
        let cpu = DdpoConfig::cpu();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cpu.toml");
        std::fs::write(&file, toml::to_string_pretty(&cpu).unwrap()).unwrap();
        assert_eq!(DdpoConfig::build("paper", Some(&file), &[]).unwrap(), cpu);
    }

    #[test]
    fn every_issue_key_exists() {
        let keys: Vec<String> = DdpoConfig::paper()
            .flat_keys()
            .into_iter()
            .map(|k| k.0)
            .collect();
        for key in [
            "seed",
            "num_epochs",
            "save_freq",
            "num_checkpoint_limit",
            "logdir",
            "resume_from",
            "use_lora",
            "sample.num_steps",
            "sample.eta",
            "sample.guidance_scale",
            "sample.batch_size",
            "sample.num_batches_per_epoch",
            "train.batch_size",
            "train.learning_rate",
            "train.adam_beta1",
            "train.adam_beta2",
            "train.adam_weight_decay",
            "train.adam_epsilon",
            "train.gradient_accumulation_steps",
            "train.max_grad_norm",
            "train.num_inner_epochs",
            "train.cfg",
            "train.adv_clip_max",
            "train.clip_range",
            "train.timestep_fraction",
            "per_prompt_stat_tracking.buffer_size",
            "per_prompt_stat_tracking.min_count",
            "sample.image_guidance_scale",
            "lora.rank",
            "lora.alpha",
            "reward.attention_weight",
            "reward.alpha",
            "reward.tau",
        ] {
            assert!(keys.iter().any(|k| k == key), "missing {key}");
        }
    }
}
