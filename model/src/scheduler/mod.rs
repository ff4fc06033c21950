//! Noise schedulers with the semantics of diffusers' `DDIMScheduler` and
//! `EulerAncestralDiscreteScheduler`, read from `scheduler/scheduler_config.json`.
//!
//! Unlike diffusers, a scheduler holds no step counter: every call names its step index, so one
//! batch can hold samples at different steps (the server) and DDPO can re-evaluate shuffled
//! steps. Noise is always supplied by the caller, so a result depends only on its inputs.
//!
//! The training-time schedule (betas, cumulative alphas) is computed in f32 the way torch does on
//! the CPU, so the numbers match diffusers' to the last bit or two.

pub mod ddim;
pub mod euler_ancestral;

use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};

use crate::config::{read_json, unsupported};
use crate::error::{ModelError, Result};

pub use ddim::DdimScheduler;
pub use euler_ancestral::EulerAncestralScheduler;

/// `scheduler_config.json`. Missing keys take diffusers' defaults; keys we do not use are ignored
/// (as diffusers' `from_config` does). Values are validated when a scheduler is built from it.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    /// "linear", "scaled_linear" or "squaredcos_cap_v2".
    pub beta_schedule: String,
    /// Explicit betas are not supported; a non-null value is an error.
    pub trained_betas: Option<serde_json::Value>,
    /// "epsilon", "v_prediction" or "sample" (DDIM only).
    pub prediction_type: String,
    /// "leading", "trailing" or "linspace". The default depends on the scheduler, as in
    /// diffusers: "leading" for DDIM, "linspace" for Euler ancestral.
    pub timestep_spacing: Option<String>,
    pub steps_offset: usize,
    /// DDIM: the cumulative alpha after the last step is 1 (true) or that of timestep 0 (false).
    pub set_alpha_to_one: bool,
    /// DDIM: clamp the predicted clean sample to +-`clip_sample_range`.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// DDIM dynamic thresholding; not supported (it is meant for pixel-space models).
    pub thresholding: bool,
    pub rescale_betas_zero_snr: bool,
    /// The file this config was read from, for error messages.
    #[serde(skip)]
    pub source: Option<PathBuf>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            class_name: None,
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: "linear".to_string(),
            trained_betas: None,
            prediction_type: "epsilon".to_string(),
            timestep_spacing: None,
            steps_offset: 0,
            set_alpha_to_one: true,
            clip_sample: true,
            clip_sample_range: 1.0,
            thresholding: false,
            rescale_betas_zero_snr: false,
            source: None,
        }
    }
}

impl SchedulerConfig {
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut config: Self = read_json(path)?;
        config.source = Some(path.to_path_buf());
        Ok(config)
    }

    /// The file named in error messages.
    pub fn file(&self) -> &Path {
        self.source
            .as_deref()
            .unwrap_or(Path::new("scheduler_config.json"))
    }

    /// The scheduler `_class_name` asks for; an error if it is missing or not one we implement.
    pub fn default_kind(&self) -> Result<SchedulerKind> {
        let name = self.class_name.as_deref().unwrap_or("(missing)");
        SchedulerKind::from_class_name(name)
            .ok_or_else(|| unsupported(self.file(), "_class_name", name))
    }

    pub(crate) fn spacing_or(&self, default: TimestepSpacing) -> Result<TimestepSpacing> {
        match self.timestep_spacing.as_deref() {
            None => Ok(default),
            Some("leading") => Ok(TimestepSpacing::Leading),
            Some("trailing") => Ok(TimestepSpacing::Trailing),
            Some("linspace") => Ok(TimestepSpacing::Linspace),
            Some(other) => Err(unsupported(self.file(), "timestep_spacing", other)),
        }
    }

    pub(crate) fn prediction(&self) -> Result<PredictionType> {
        match self.prediction_type.as_str() {
            "epsilon" => Ok(PredictionType::Epsilon),
            "v_prediction" => Ok(PredictionType::VPrediction),
            "sample" => Ok(PredictionType::Sample),
            other => Err(unsupported(self.file(), "prediction_type", other)),
        }
    }

    /// Cumulative products of (1 - beta) over the training timesteps, as f32 values.
    pub(crate) fn train_alphas_cumprod(&self) -> Result<Vec<f32>> {
        if let Some(betas) = self.trained_betas.as_ref() {
            return Err(unsupported(self.file(), "trained_betas", betas));
        }
        let steps = self.num_train_timesteps;
        if steps == 0 {
            return Err(unsupported(self.file(), "num_train_timesteps", steps));
        }
        let mut betas = match self.beta_schedule.as_str() {
            "linear" => torch_linspace_f32(self.beta_start as f32, self.beta_end as f32, steps),
            "scaled_linear" => torch_linspace_f32(
                self.beta_start.sqrt() as f32,
                self.beta_end.sqrt() as f32,
                steps,
            )
            .into_iter()
            .map(|b| b * b)
            .collect(),
            "squaredcos_cap_v2" => squaredcos_cap_v2_betas(steps),
            other => return Err(unsupported(self.file(), "beta_schedule", other)),
        };
        if self.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
        Ok(cumprod_f32(&alphas))
    }

    pub(crate) fn check_inference_steps(&self, num_inference_steps: usize) -> Result<()> {
        if num_inference_steps == 0 || num_inference_steps > self.num_train_timesteps {
            return Err(ModelError::InvalidArgument(format!(
                "number of inference steps must be in 1..={} (num_train_timesteps of {}), got {num_inference_steps}",
                self.num_train_timesteps,
                self.file().display()
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PredictionType {
    Epsilon,
    VPrediction,
    Sample,
}

/// The inference timesteps (first step first) as diffusers' `set_timesteps` spaces them, before
/// any rounding to integers except the rounding diffusers itself does. `round_linspace` is DDIM's
/// behaviour (integer timesteps); Euler keeps fractional linspace timesteps.
///
/// One deliberate difference: numpy's float `arange` in "trailing" spacing sometimes yields one
/// value too many (e.g. 61 steps of 1000), giving diffusers a bogus timestep -1; we always return
/// exactly `num_inference_steps` values.
pub(crate) fn spaced_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
    round_linspace: bool,
) -> Vec<f64> {
    let train = num_train_timesteps as f64;
    let n = num_inference_steps;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut values = numpy_linspace(0.0, train - 1.0, n);
            if round_linspace {
                values.iter_mut().for_each(|v| *v = v.round_ties_even());
            }
            values.reverse();
            values
        }
        TimestepSpacing::Leading => {
            let ratio = num_train_timesteps / n;
            (0..n)
                .rev()
                .map(|i| (i * ratio + steps_offset) as f64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = train / n as f64;
            // numpy's arange steps by the difference of its first two values.
            let delta = (train - ratio) - train;
            (0..n)
                .map(|i| (train + i as f64 * delta).round_ties_even() - 1.0)
                .collect()
        }
    }
}

/// `numpy.linspace(start, stop, num)`, computed as numpy does (so rounding ties match).
pub(crate) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    if let Some(last) = values.last_mut() {
        *last = stop;
    }
    values
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: both halves are computed from
/// their own end, which matters for the last bits of the betas.
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                start + step * i as f32
            } else {
                end - step * (steps - i - 1) as f32
            }
        })
        .collect()
}

/// torch's CPU `cumprod` of f32 accumulates in f64.
fn cumprod_f32(values: &[f32]) -> Vec<f32> {
    let mut acc = 1.0f64;
    values
        .iter()
        .map(|&v| {
            acc *= v as f64;
            acc as f32
        })
        .collect()
}

fn squaredcos_cap_v2_betas(steps: usize) -> Vec<f32> {
    let alpha_bar = |t: f64| {
        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
            .cos()
            .powi(2)
    };
    (0..steps)
        .map(|i| {
            let t1 = i as f64 / steps as f64;
            let t2 = (i + 1) as f64 / steps as f64;
            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
        })
        .collect()
}

/// Rescales betas so the last timestep has zero signal-to-noise ratio (Lin et al. 2023,
/// Algorithm 1), in f32 as diffusers does.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas: Vec<f32> = betas.iter().map(|b| 1.0 - b).collect();
    let mut sqrt_bar: Vec<f32> = cumprod_f32(&alphas).iter().map(|a| a.sqrt()).collect();
    let first = sqrt_bar[0];
    let last = sqrt_bar[sqrt_bar.len() - 1];
    let scale = first / (first - last);
    for s in sqrt_bar.iter_mut() {
        *s = (*s - last) * scale;
    }
    let bar: Vec<f32> = sqrt_bar.iter().map(|s| s * s).collect();
    let mut rescaled = Vec::with_capacity(bar.len());
    rescaled.push(1.0 - bar[0]);
    rescaled.extend(bar.windows(2).map(|w| 1.0 - w[1] / w[0]));
    rescaled
}

/// Multiplies each sample of a batch (dim 0) by its own factor. A batch whose factors are all
/// equal takes the cheaper scalar path.
pub(crate) fn scale_per_sample(x: &Tensor, factors: &[f64]) -> candle_core::Result<Tensor> {
    let batch = x.dim(0)?;
    if factors.len() != batch {
        candle_core::bail!(
            "scheduler: {} per-sample values for a batch of {batch}",
            factors.len()
        );
    }
    let first = factors[0];
    if factors.iter().all(|&f| f == first) {
        return x.affine(first, 0.0);
    }
    let mut shape = vec![1usize; x.rank()];
    shape[0] = batch;
    let factors = Tensor::from_vec(factors.to_vec(), shape, x.device())?.to_dtype(x.dtype())?;
    x.broadcast_mul(&factors)
}

/// Half-precision inputs are computed in f32 (as diffusers' Euler step does).
pub(crate) fn to_working_dtype(x: &Tensor) -> candle_core::Result<Tensor> {
    match x.dtype() {
        DType::F16 | DType::BF16 => x.to_dtype(DType::F32),
        _ => Ok(x.clone()),
    }
}

pub(crate) fn check_same_shape(name: &str, x: &Tensor, sample: &Tensor) -> candle_core::Result<()> {
    if x.dims() != sample.dims() {
        candle_core::bail!(
            "scheduler: `{name}` has shape {:?}, the sample {:?}",
            x.dims(),
            sample.dims()
        );
    }
    Ok(())
}

pub(crate) fn check_batch(
    step_indices: &[usize],
    sample: &Tensor,
    num_steps: usize,
) -> candle_core::Result<()> {
    let batch = sample.dim(0)?;
    if step_indices.len() != batch {
        candle_core::bail!(
            "scheduler: {} step indices for a batch of {batch}",
            step_indices.len()
        );
    }
    if let Some(bad) = step_indices.iter().find(|&&i| i >= num_steps) {
        candle_core::bail!(
            "scheduler: step index {bad} out of range (the schedule has {num_steps} steps)"
        );
    }
    Ok(())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    EulerAncestral,
}

impl SchedulerKind {
    /// diffusers' class name (`_class_name` in `scheduler_config.json`).
    pub fn class_name(self) -> &'static str {
        match self {
            Self::Ddim => "DDIMScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
        }
    }

    /// The kind a diffusers `_class_name` names.
    pub fn from_class_name(name: &str) -> Option<Self> {
        match name {
            "DDIMScheduler" => Some(Self::Ddim),
            "EulerAncestralDiscreteScheduler" => Some(Self::EulerAncestral),
            _ => None,
        }
    }

    /// Command-line (and request) spelling: "ddim", "euler-ancestral" (also "euler_ancestral",
    /// "euler_a"), any case. Every front end parses scheduler names here, so they accept the
    /// same spellings and reject the rest with the same message.
    pub fn from_cli_name(s: &str) -> std::result::Result<Self, UnknownSchedulerName> {
        match s.to_ascii_lowercase().as_str() {
            "ddim" => Ok(Self::Ddim),
            "euler-ancestral" | "euler_ancestral" | "euler_a" => Ok(Self::EulerAncestral),
            _ => Err(UnknownSchedulerName(s.chars().take(32).collect())),
        }
    }

    /// The canonical command-line spelling (the inverse of `from_cli_name`).
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ddim => "ddim",
            Self::EulerAncestral => "euler-ancestral",
        }
    }
}

/// A scheduler name `SchedulerKind::from_cli_name` does not know (kept to its first 32
/// characters, so an oversized request field is not echoed back whole).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown scheduler {0:?} (expected ddim or euler-ancestral)")]
pub struct UnknownSchedulerName(pub String);

impl std::fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[derive(Debug, Clone)]
pub enum Scheduler {
    Ddim(DdimScheduler),
    EulerAncestral(EulerAncestralScheduler),
}

#[derive(Debug, Clone)]
pub struct StepOutput {
    pub prev_sample: Tensor,
    /// (B,) Gaussian log-density of `prev_sample` under the step's distribution, averaged over
    /// all non-batch dims. DDIM only, and only when every sample's step has a non-zero std.
    pub log_prob: Option<Tensor>,
}

impl Scheduler {
    /// `eta` is used by DDIM only (0 = deterministic, 1 = DDPM-like).
    pub fn new(
        kind: SchedulerKind,
        config: &SchedulerConfig,
        num_inference_steps: usize,
        eta: f64,
    ) -> Result<Self> {
        Ok(match kind {
            SchedulerKind::Ddim => {
                Self::Ddim(DdimScheduler::new(config, num_inference_steps, eta)?)
            }
            SchedulerKind::EulerAncestral => {
                Self::EulerAncestral(EulerAncestralScheduler::new(config, num_inference_steps)?)
            }
        })
    }

    pub fn kind(&self) -> SchedulerKind {
        match self {
            Self::Ddim(_) => SchedulerKind::Ddim,
            Self::EulerAncestral(_) => SchedulerKind::EulerAncestral,
        }
    }

    pub fn num_steps(&self) -> usize {
        match self {
            Self::Ddim(s) => s.timesteps().len(),
            Self::EulerAncestral(s) => s.timesteps().len(),
        }
    }

    /// The timestep fed to the UNet at `step_index`. Panics if `step_index >= num_steps()`.
    pub fn timestep(&self, step_index: usize) -> f64 {
        match self {
            Self::Ddim(s) => s.timesteps()[step_index] as f64,
            Self::EulerAncestral(s) => s.timesteps()[step_index],
        }
    }

    /// The factor the initial Gaussian noise is multiplied by.
    pub fn init_noise_sigma(&self) -> f64 {
        match self {
            Self::Ddim(_) => 1.0,
            Self::EulerAncestral(s) => s.init_noise_sigma(),
        }
    }

    pub fn scale_model_input(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor> {
        let indices = vec![step_index; sample.dim(0)?];
        self.scale_model_input_batched(sample, &indices)
    }

    /// `scale_model_input` with one step index per sample.
    pub fn scale_model_input_batched(
        &self,
        sample: &Tensor,
        step_indices: &[usize],
    ) -> candle_core::Result<Tensor> {
        match self {
            Self::Ddim(s) => {
                check_batch(step_indices, sample, s.timesteps().len())?;
                Ok(sample.clone())
            }
            Self::EulerAncestral(s) => s.scale_model_input_batched(sample, step_indices),
        }
    }

    /// Whether `step` consumes `noise` (DDIM with eta > 0, Euler ancestral).
    pub fn needs_noise(&self) -> bool {
        match self {
            Self::Ddim(s) => s.eta() > 0.0,
            Self::EulerAncestral(_) => true,
        }
    }

    /// `noise` has sample's shape; required iff `needs_noise()` (ignored otherwise).
    pub fn step(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<StepOutput> {
        let indices = vec![step_index; sample.dim(0)?];
        self.step_batched(model_output, &indices, sample, noise)
    }

    /// `step` with one step index per sample.
    pub fn step_batched(
        &self,
        model_output: &Tensor,
        step_indices: &[usize],
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<StepOutput> {
        match self {
            Self::Ddim(s) => s.step_batched(model_output, step_indices, sample, noise),
            Self::EulerAncestral(s) => Ok(StepOutput {
                prev_sample: s.step_batched(model_output, step_indices, sample, noise)?,
                log_prob: None,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_parsing() {
        assert_eq!(
            SchedulerKind::from_cli_name("ddim"),
            Ok(SchedulerKind::Ddim)
        );
        for s in ["euler-ancestral", "euler_ancestral", "euler_a", "Euler_A"] {
            assert_eq!(
                SchedulerKind::from_cli_name(s),
                Ok(SchedulerKind::EulerAncestral)
            );
        }
        let unknown = SchedulerKind::from_cli_name("pndm").unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "unknown scheduler \"pndm\" (expected ddim or euler-ancestral)"
        );
        let long = "x".repeat(1000);
        assert_eq!(SchedulerKind::from_cli_name(&long).unwrap_err().0.len(), 32);
        for kind in [SchedulerKind::Ddim, SchedulerKind::EulerAncestral] {
            assert_eq!(SchedulerKind::from_cli_name(kind.name()), Ok(kind));
        }
        assert_eq!(
            SchedulerKind::from_class_name("EulerAncestralDiscreteScheduler"),
            Some(SchedulerKind::EulerAncestral)
        );
        assert_eq!(SchedulerKind::from_class_name("PNDMScheduler"), None);
    }

    #[test]
    fn unknown_class_name_names_key_and_file() {
        let config = SchedulerConfig {
            class_name: Some("PNDMScheduler".into()),
            source: Some(PathBuf::from("/m/scheduler/scheduler_config.json")),
            ..Default::default()
        };
        let message = config.default_kind().unwrap_err().to_string();
        assert!(message.contains("_class_name"), "{message}");
        assert!(message.contains("PNDMScheduler"), "{message}");
        assert!(
            message.contains("/m/scheduler/scheduler_config.json"),
            "{message}"
        );
    }

    #[test]
    fn trailing_spacing_never_adds_a_step() {
        // numpy's arange gives 62 values here.
        let t = spaced_timesteps(TimestepSpacing::Trailing, 1000, 61, 0, true);
        assert_eq!(t.len(), 61);
        assert_eq!(t[0], 999.0);
        assert!(t.iter().all(|&v| v >= 0.0));
    }

    #[test]
    fn per_sample_scaling() -> candle_core::Result<()> {
        let x = Tensor::ones((3, 2), DType::F32, &candle_core::Device::Cpu)?;
        let y = scale_per_sample(&x, &[1.0, 2.0, 3.0])?;
        assert_eq!(
            y.to_vec2::<f32>()?,
            vec![vec![1.0, 1.0], vec![2.0, 2.0], vec![3.0, 3.0]]
        );
        assert!(scale_per_sample(&x, &[1.0, 2.0]).is_err());
        Ok(())
    }
}
