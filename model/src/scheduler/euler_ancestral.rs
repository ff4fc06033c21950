//! Euler ancestral sampling (k-diffusion's `sample_euler_ancestral`) with diffusers'
//! `EulerAncestralDiscreteScheduler` semantics: sigma-space steps with fractional timesteps
//! interpolated from the training schedule, and fresh noise added at every step.

use candle_core::Tensor;

use super::{
    check_batch, check_same_shape, scale_per_sample, spaced_timesteps, to_working_dtype,
    PredictionType, SchedulerConfig, TimestepSpacing,
};
use crate::config::unsupported;
use crate::error::Result;

#[derive(Debug, Clone)]
pub struct EulerAncestralScheduler {
    timesteps: Vec<f64>,
    /// One per step plus the final 0.
    sigmas: Vec<f64>,
    init_noise_sigma: f64,
    prediction: PredictionType,
}

impl EulerAncestralScheduler {
    pub fn new(config: &SchedulerConfig, num_inference_steps: usize) -> Result<Self> {
        let file = config.file();
        let prediction = match config.prediction()? {
            PredictionType::Sample => return Err(unsupported(file, "prediction_type", "sample")),
            p => p,
        };
        let spacing = config.spacing_or(TimestepSpacing::Linspace)?;
        let mut alphas_cumprod = config.train_alphas_cumprod()?;
        config.check_inference_steps(num_inference_steps)?;
        if config.rescale_betas_zero_snr {
            // A zero last alpha would make its sigma infinite; diffusers uses 2^-24 instead.
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let train_sigmas: Vec<f64> = alphas_cumprod
            .iter()
            .map(|&a| f64::from(((1.0 - a) / a).sqrt()))
            .collect();

        // diffusers keeps timesteps (and sigmas) as f32.
        let timesteps: Vec<f64> = spaced_timesteps(
            spacing,
            config.num_train_timesteps,
            num_inference_steps,
            config.steps_offset,
            false,
        )
        .into_iter()
        .map(|t| t as f32 as f64)
        .collect();
        let mut sigmas: Vec<f64> = timesteps
            .iter()
            .map(|&t| interp(t, &train_sigmas) as f32 as f64)
            .collect();
        sigmas.push(0.0);

        let max_sigma = sigmas.iter().cloned().fold(0.0, f64::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max_sigma,
            TimestepSpacing::Leading => (max_sigma * max_sigma + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps,
            sigmas,
            init_noise_sigma,
            prediction,
        })
    }

    /// Fractional timesteps fed to the UNet, first step first.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// Noise levels: one per step, then 0.
    pub fn sigmas(&self) -> &[f64] {
        &self.sigmas
    }

    pub fn init_noise_sigma(&self) -> f64 {
        self.init_noise_sigma
    }

    /// Divides by sqrt(sigma^2 + 1) so the UNet sees unit-variance input.
    pub fn scale_model_input(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> candle_core::Result<Tensor> {
        self.scale_model_input_batched(sample, &vec![step_index; sample.dim(0)?])
    }

    /// `scale_model_input` with one step index per sample.
    pub fn scale_model_input_batched(
        &self,
        sample: &Tensor,
        step_indices: &[usize],
    ) -> candle_core::Result<Tensor> {
        check_batch(step_indices, sample, self.timesteps.len())?;
        let factors: Vec<f64> = step_indices
            .iter()
            .map(|&i| 1.0 / (self.sigmas[i] * self.sigmas[i] + 1.0).sqrt())
            .collect();
        scale_per_sample(sample, &factors)
    }

    /// One ancestral Euler step; `noise` (sample's shape) is always required, though the last
    /// step multiplies it by 0.
    pub fn step(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let indices = vec![step_index; sample.dim(0)?];
        self.step_batched(model_output, &indices, sample, Some(noise))
    }

    /// `step` with one step index per sample.
    pub fn step_batched(
        &self,
        model_output: &Tensor,
        step_indices: &[usize],
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> candle_core::Result<Tensor> {
        check_batch(step_indices, sample, self.timesteps.len())?;
        check_same_shape("model_output", model_output, sample)?;
        let Some(noise) = noise else {
            candle_core::bail!("Euler ancestral needs noise for its step");
        };
        check_same_shape("noise", noise, sample)?;
        let out_dtype = model_output.dtype();
        let model_output = to_working_dtype(model_output)?;
        let sample = to_working_dtype(sample)?;
        let noise = to_working_dtype(noise)?;

        let mut sigma = Vec::with_capacity(step_indices.len());
        let mut dt = Vec::with_capacity(step_indices.len());
        let mut sigma_up = Vec::with_capacity(step_indices.len());
        for &i in step_indices {
            let (from, to) = (self.sigmas[i], self.sigmas[i + 1]);
            let up = (to * to * (from * from - to * to) / (from * from)).sqrt();
            let down = (to * to - up * up).max(0.0).sqrt();
            sigma.push(from);
            dt.push(down - from);
            sigma_up.push(up);
        }
        let pred_original = match self.prediction {
            PredictionType::Epsilon => (&sample - scale_per_sample(&model_output, &sigma)?)?,
            PredictionType::VPrediction => {
                let c_out: Vec<f64> = sigma.iter().map(|s| -s / (s * s + 1.0).sqrt()).collect();
                let c_skip: Vec<f64> = sigma.iter().map(|s| 1.0 / (s * s + 1.0)).collect();
                (scale_per_sample(&model_output, &c_out)? + scale_per_sample(&sample, &c_skip)?)?
            }
            // Rejected in `new`.
            PredictionType::Sample => {
                candle_core::bail!("Euler ancestral cannot use sample prediction")
            }
        };
        let inv_sigma: Vec<f64> = sigma.iter().map(|s| 1.0 / s).collect();
        let derivative = scale_per_sample(&(&sample - pred_original)?, &inv_sigma)?;
        let prev = ((&sample + scale_per_sample(&derivative, &dt)?)?
            + scale_per_sample(&noise, &sigma_up)?)?;
        prev.to_dtype(out_dtype)
    }
}

/// `numpy.interp(x, arange(len(values)), values)`: linear, clamped at both ends.
fn interp(x: f64, values: &[f64]) -> f64 {
    let last = values.len() - 1;
    if x <= 0.0 {
        return values[0];
    }
    if x >= last as f64 {
        return values[last];
    }
    let j = x.floor() as usize;
    let slope = values[j + 1] - values[j];
    slope * (x - j as f64) + values[j]
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scheduler::numpy_linspace;

    #[test]
    fn interp_matches_numpy_at_edges() {
        let v = [1.0, 2.0, 4.0];
        assert_eq!(interp(-1.0, &v), 1.0);
        assert_eq!(interp(0.5, &v), 1.5);
        assert_eq!(interp(1.25, &v), 2.5);
        assert_eq!(interp(2.0, &v), 4.0);
        assert_eq!(interp(7.0, &v), 4.0);
    }

    #[test]
    fn linspace_timesteps_are_fractional() -> Result<()> {
        let s = EulerAncestralScheduler::new(&SchedulerConfig::default(), 4)?;
        let expected: Vec<f64> = numpy_linspace(0.0, 999.0, 4)
            .into_iter()
            .rev()
            .map(|t| t as f32 as f64)
            .collect();
        assert_eq!(s.timesteps(), expected.as_slice());
        assert_eq!(s.timesteps()[1], 666.0);
        assert_eq!(s.sigmas().len(), 5);
        assert_eq!(s.sigmas()[4], 0.0);
        Ok(())
    }

    #[test]
    fn rejects_sample_prediction() {
        let config = SchedulerConfig {
            prediction_type: "sample".into(),
            ..Default::default()
        };
        let message = EulerAncestralScheduler::new(&config, 4)
            .unwrap_err()
            .to_string();
        assert!(message.contains("prediction_type"), "{message}");
    }
}
