//! DDIM (Song et al. 2020) with diffusers' `DDIMScheduler` semantics, plus the Gaussian
//! log-probability of each stochastic step that DDPO needs (as ddpo-pytorch's
//! `ddim_step_with_logprob` computes it).

use candle_core::Tensor;

use super::{
    check_batch, check_same_shape, scale_per_sample, spaced_timesteps, to_working_dtype,
    PredictionType, SchedulerConfig, StepOutput, TimestepSpacing,
};
use crate::config::unsupported;
use crate::error::{ModelError, Result};

/// ln(sqrt(2 pi)), the Gaussian density's constant.
const LN_SQRT_2PI: f64 = 0.918_938_533_204_672_8;

#[derive(Debug, Clone, Copy)]
struct StepCoefficients {
    alpha_prod: f64,
    alpha_prod_prev: f64,
    /// eta * sqrt(variance): the std of the step's Gaussian.
    std_dev: f64,
}

#[derive(Debug, Clone)]
pub struct DdimScheduler {
    timesteps: Vec<usize>,
    steps: Vec<StepCoefficients>,
    alphas_cumprod: Vec<f64>,
    final_alpha_cumprod: f64,
    prediction: PredictionType,
    clip_range: Option<f64>,
    eta: f64,
}

impl DdimScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize, eta: f64) -> Result<Self> {
        let file = config.file();
        if config.thresholding {
            return Err(unsupported(file, "thresholding", true));
        }
        let prediction = config.prediction()?;
        let spacing = config.spacing_or(TimestepSpacing::Leading)?;
        if config.clip_sample
            && !(config.clip_sample_range.is_finite() && config.clip_sample_range > 0.0)
        {
            return Err(unsupported(
                file,
                "clip_sample_range",
                config.clip_sample_range,
            ));
        }
        if !(eta.is_finite() && eta >= 0.0) {
            return Err(ModelError::InvalidArgument(format!(
                "DDIM eta must be finite and >= 0, got {eta}"
            )));
        }
        let alphas_cumprod: Vec<f64> = config
            .train_alphas_cumprod()?
            .into_iter()
            .map(f64::from)
            .collect();
        config.check_inference_steps(num_inference_steps)?;
        let train = config.num_train_timesteps;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };

        let timesteps: Vec<usize> = spaced_timesteps(
            spacing,
            train,
            num_inference_steps,
            config.steps_offset,
            true,
        )
        .into_iter()
        .map(|t| t as usize)
        .collect();
        if let Some(&t) = timesteps.iter().find(|&&t| t >= train) {
            return Err(ModelError::Config {
                file: file.to_path_buf(),
                message: format!(
                    "steps_offset {} with {num_inference_steps} steps gives timestep {t}, past num_train_timesteps {train}",
                    config.steps_offset
                ),
            });
        }

        // diffusers steps back by a fixed stride whatever the spacing; past 0 it uses the final alpha.
        let stride = train / num_inference_steps;
        let mut steps = Vec::with_capacity(timesteps.len());
        for &t in &timesteps {
            let alpha_prod = alphas_cumprod[t];
            let alpha_prod_prev = match t.checked_sub(stride) {
                Some(prev) => alphas_cumprod[prev],
                None => final_alpha_cumprod,
            };
            let variance =
                (1.0 - alpha_prod_prev) / (1.0 - alpha_prod) * (1.0 - alpha_prod / alpha_prod_prev);
            let std_dev = eta * variance.sqrt();
            // The direction term takes sqrt(1 - alpha_prev - std^2); eta > 1 can make it negative
            // (rounding alone only by ~1e-16, which the step clamps to 0).
            if 1.0 - alpha_prod_prev - std_dev * std_dev < -1e-9 {
                return Err(ModelError::InvalidArgument(format!(
                    "DDIM eta {eta} is too large: the step from timestep {t} would need a negative variance"
                )));
            }
            steps.push(StepCoefficients {
                alpha_prod,
                alpha_prod_prev,
                std_dev,
            });
        }

        Ok(Self {
            timesteps,
            steps,
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            clip_range: config.clip_sample.then_some(config.clip_sample_range),
            eta,
        })
    }

    /// Integer timesteps, first step first.
    pub fn timesteps(&self) -> &[usize] {
        &self.timesteps
    }

    /// Cumulative alphas of all training timesteps.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    pub fn final_alpha_cumprod(&self) -> f64 {
        self.final_alpha_cumprod
    }

    pub fn eta(&self) -> f64 {
        self.eta
    }

    /// The std (eta * sigma_t) of the step at `step_index`. Panics if out of range.
    pub fn std_dev(&self, step_index: usize) -> f64 {
        self.steps[step_index].std_dev
    }

    /// Per-sample step indices (len == batch) so one call can handle samples at different steps;
    /// also returns the Gaussian log-probability of prev_sample (mean over C,H,W, per sample; as
    /// ddpo-pytorch's ddim_step_with_logprob) when every step's std is non-zero (eta > 0).
    /// `noise` (sample's shape) is required when eta > 0 and ignored otherwise.
    pub fn step_batched(
        &self,
        model_output: &Tensor,
        step_indices: &[usize],
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<StepOutput> {
        let out_dtype = model_output.dtype();
        let (mean, stds) = self.prev_mean(model_output, step_indices, sample)?;
        let prev_sample = if self.eta > 0.0 {
            let Some(noise) = noise else {
                candle_core::bail!("DDIM with eta {} needs noise for its step", self.eta);
            };
            check_same_shape("noise", noise, sample)?;
            let noise = to_working_dtype(noise)?;
            (&mean + scale_per_sample(&noise, &stds)?)?
        } else {
            mean.clone()
        };
        let log_prob = if stds.iter().all(|&s| s > 0.0) {
            Some(gaussian_log_prob(&prev_sample, &mean, &stds)?)
        } else {
            None
        };
        Ok(StepOutput {
            prev_sample: prev_sample.to_dtype(out_dtype)?,
            log_prob,
        })
    }

    /// Log-probability (B,) of a given prev_sample under the steps' Gaussians (DDPO recomputes
    /// this under new weights); differentiable w.r.t. model_output. An error if any of the steps
    /// is deterministic (std 0: eta = 0, or the last step with `set_alpha_to_one`).
    pub fn log_prob(
        &self,
        model_output: &Tensor,
        step_indices: &[usize],
        sample: &Tensor,
        prev_sample: &Tensor,
    ) -> candle_core::Result<Tensor> {
        check_same_shape("prev_sample", prev_sample, sample)?;
        let (mean, stds) = self.prev_mean(model_output, step_indices, sample)?;
        if let Some(i) = stds.iter().position(|&s| s <= 0.0) {
            candle_core::bail!(
                "DDIM log-probability is undefined for a deterministic step (step index {}, eta {})",
                step_indices[i],
                self.eta
            );
        }
        let prev_sample = to_working_dtype(&prev_sample.detach())?;
        gaussian_log_prob(&prev_sample, &mean, &stds)
    }

    /// The mean of the step's Gaussian and the per-sample stds.
    fn prev_mean(
        &self,
        model_output: &Tensor,
        step_indices: &[usize],
        sample: &Tensor,
    ) -> candle_core::Result<(Tensor, Vec<f64>)> {
        check_batch(step_indices, sample, self.steps.len())?;
        check_same_shape("model_output", model_output, sample)?;
        let steps: Vec<StepCoefficients> = step_indices.iter().map(|&i| self.steps[i]).collect();
        let per_sample =
            |f: fn(&StepCoefficients) -> f64| steps.iter().map(f).collect::<Vec<f64>>();
        let sqrt_alpha = per_sample(|s| s.alpha_prod.sqrt());
        let sqrt_beta = per_sample(|s| (1.0 - s.alpha_prod).sqrt());
        let inv_sqrt_alpha = per_sample(|s| 1.0 / s.alpha_prod.sqrt());
        let inv_sqrt_beta = per_sample(|s| 1.0 / (1.0 - s.alpha_prod).sqrt());

        let model_output = to_working_dtype(model_output)?;
        let sample = to_working_dtype(sample)?;
        let (pred_original, pred_epsilon) = match self.prediction {
            PredictionType::Epsilon => {
                let x0 = scale_per_sample(
                    &(&sample - scale_per_sample(&model_output, &sqrt_beta)?)?,
                    &inv_sqrt_alpha,
                )?;
                (x0, model_output)
            }
            PredictionType::Sample => {
                let eps = scale_per_sample(
                    &(&sample - scale_per_sample(&model_output, &sqrt_alpha)?)?,
                    &inv_sqrt_beta,
                )?;
                (model_output, eps)
            }
            PredictionType::VPrediction => {
                let x0 = (scale_per_sample(&sample, &sqrt_alpha)?
                    - scale_per_sample(&model_output, &sqrt_beta)?)?;
                let eps = (scale_per_sample(&model_output, &sqrt_alpha)?
                    + scale_per_sample(&sample, &sqrt_beta)?)?;
                (x0, eps)
            }
        };
        // Only the clean-sample estimate is clipped; the noise estimate stays the model's.
        let pred_original = match self.clip_range {
            Some(range) => pred_original.clamp(-range, range)?,
            None => pred_original,
        };
        let sqrt_alpha_prev = per_sample(|s| s.alpha_prod_prev.sqrt());
        let direction = per_sample(|s| {
            (1.0 - s.alpha_prod_prev - s.std_dev * s.std_dev)
                .max(0.0)
                .sqrt()
        });
        let mean = (scale_per_sample(&pred_original, &sqrt_alpha_prev)?
            + scale_per_sample(&pred_epsilon, &direction)?)?;
        Ok((mean, per_sample(|s| s.std_dev)))
    }
}

/// Per-sample mean over all non-batch dims of the elementwise Gaussian log-density
/// `-(x - mean)^2 / (2 std^2) - ln std - ln sqrt(2 pi)`.
fn gaussian_log_prob(x: &Tensor, mean: &Tensor, stds: &[f64]) -> candle_core::Result<Tensor> {
    let batch = x.dim(0)?;
    let mean_sq = (x - mean)?.sqr()?.flatten_from(1)?.mean(1)?;
    let inv_two_var: Vec<f64> = stds.iter().map(|s| -0.5 / (s * s)).collect();
    let offsets: Vec<f64> = stds.iter().map(|s| -s.ln() - LN_SQRT_2PI).collect();
    let offsets = Tensor::from_vec(offsets, batch, x.device())?.to_dtype(mean_sq.dtype())?;
    scale_per_sample(&mean_sq, &inv_two_var)?.add(&offsets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn ipx2p_config() -> SchedulerConfig {
        SchedulerConfig {
            beta_schedule: "scaled_linear".into(),
            beta_start: 0.00085,
            beta_end: 0.012,
            steps_offset: 1,
            set_alpha_to_one: false,
            clip_sample: false,
            ..Default::default()
        }
    }

    #[test]
    fn leading_timesteps_with_offset() -> Result<()> {
        let s = DdimScheduler::new(&ipx2p_config(), 5, 0.0)?;
        assert_eq!(s.timesteps(), &[801, 601, 401, 201, 1]);
        Ok(())
    }

    #[test]
    fn rejects_unsupported_keys() {
        let cases: Vec<(SchedulerConfig, &str)> = vec![
            (
                SchedulerConfig {
                    trained_betas: Some(serde_json::json!([0.1, 0.2])),
                    ..Default::default()
                },
                "trained_betas",
            ),
            (
                SchedulerConfig {
                    beta_schedule: "sigmoid".into(),
                    ..Default::default()
                },
                "beta_schedule",
            ),
            (
                SchedulerConfig {
                    prediction_type: "flow".into(),
                    ..Default::default()
                },
                "prediction_type",
            ),
            (
                SchedulerConfig {
                    timestep_spacing: Some("karras".into()),
                    ..Default::default()
                },
                "timestep_spacing",
            ),
            (
                SchedulerConfig {
                    thresholding: true,
                    ..Default::default()
                },
                "thresholding",
            ),
        ];
        for (config, key) in cases {
            let message = DdimScheduler::new(&config, 10, 0.0)
                .unwrap_err()
                .to_string();
            assert!(message.contains(key), "{message}");
            assert!(message.contains("scheduler_config.json"), "{message}");
        }
        assert!(DdimScheduler::new(&SchedulerConfig::default(), 0, 0.0).is_err());
        assert!(DdimScheduler::new(&SchedulerConfig::default(), 1001, 0.0).is_err());
        assert!(DdimScheduler::new(&SchedulerConfig::default(), 10, -1.0).is_err());
        assert!(DdimScheduler::new(&SchedulerConfig::default(), 10, 3.0).is_err());
    }

    #[test]
    fn eta_zero_has_no_log_prob() -> candle_core::Result<()> {
        let s = DdimScheduler::new(&ipx2p_config(), 4, 0.0).map_err(candle_core::Error::wrap)?;
        let x = Tensor::ones((2, 1, 2, 2), DType::F32, &Device::Cpu)?;
        let out = s.step_batched(&x, &[0, 1], &x, None)?;
        assert!(out.log_prob.is_none());
        assert!(s.log_prob(&x, &[0, 1], &x, &out.prev_sample).is_err());
        Ok(())
    }

    #[test]
    fn log_prob_is_differentiable() -> candle_core::Result<()> {
        let s = DdimScheduler::new(&ipx2p_config(), 4, 1.0).map_err(candle_core::Error::wrap)?;
        let dev = Device::Cpu;
        let sample = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev)?;
        let noise = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev)?;
        let eps = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &dev)?)?;
        let out = s.step_batched(eps.as_tensor(), &[0, 2], &sample, Some(&noise))?;
        let log_prob = s.log_prob(eps.as_tensor(), &[0, 2], &sample, &out.prev_sample)?;
        let grads = log_prob.sum_all()?.backward()?;
        let grad = grads
            .get(eps.as_tensor())
            .expect("gradient of model_output");
        // At the sampled point the gradient is (prev - mean) / std^2 * d mean / d eps, non-zero.
        assert!(grad.abs()?.sum_all()?.to_scalar::<f32>()? > 0.0);
        Ok(())
    }
}
