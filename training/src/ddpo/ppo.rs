//! DDPO's clipped surrogate loss over one denoising step of a minibatch.

use candle_core::{Result, Tensor};

/// Loss and diagnostics of one PPO term.
pub struct PpoTerm {
    /// mean(max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))), differentiable.
    pub loss: Tensor,
    /// 0.5 * mean((logp_new - logp_old)^2).
    pub approx_kl: f64,
    /// Share of samples whose ratio left [1 - eps, 1 + eps].
    pub clip_fraction: f64,
}

/// `log_prob_new` (B,) under the current weights (carries the graph), `log_prob_old` (B,) from
/// sampling, `advantages` (B,) already normalised; advantages are clipped to +-`adv_clip_max`.
pub fn ppo_loss(
    log_prob_new: &Tensor,
    log_prob_old: &Tensor,
    advantages: &Tensor,
    clip_range: f64,
    adv_clip_max: f64,
) -> Result<PpoTerm> {
    let log_prob_old = log_prob_old.detach();
    let advantages = advantages.detach().clamp(-adv_clip_max, adv_clip_max)?;
    let diff = (log_prob_new - &log_prob_old)?;
    let ratio = diff.exp()?;
    let unclipped = (advantages.neg()? * &ratio)?;
    let clipped = (advantages.neg()? * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)?)?;
    let loss = unclipped.maximum(&clipped)?.mean_all()?;

    let diff = diff
        .detach()
        .to_dtype(candle_core::DType::F64)?
        .to_vec1::<f64>()?;
    let n = diff.len().max(1) as f64;
    let approx_kl = 0.5 * diff.iter().map(|d| d * d).sum::<f64>() / n;
    let clip_fraction = diff
        .iter()
        .filter(|d| (d.exp() - 1.0).abs() > clip_range)
        .count() as f64
        / n;
    Ok(PpoTerm {
        loss,
        approx_kl,
        clip_fraction,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn t(v: &[f32]) -> Tensor {
        Tensor::new(v, &Device::Cpu).unwrap()
    }

    #[test]
    fn equal_log_probs_give_minus_mean_advantage() {
        let lp = t(&[-1.0, -2.0, -3.0]);
        let term = ppo_loss(&lp, &lp, &t(&[1.0, -2.0, 0.5]), 1e-4, 5.0).unwrap();
        let loss = term.loss.to_scalar::<f32>().unwrap();
        assert!((loss - (-(1.0 - 2.0 + 0.5) / 3.0)).abs() < 1e-6);
        assert_eq!(term.approx_kl, 0.0);
        assert_eq!(term.clip_fraction, 0.0);
    }

    #[test]
    fn hand_computed_clipping() {
        // eps = 0.2. Sample 1: ratio e^0.5 = 1.6487 with A = 1: max(-1.6487, -1.2) = -1.2 (clipped).
        // Sample 2: ratio e^-0.5 = 0.6065 with A = 1: max(-0.6065, -0.8) = -0.6065 (unclipped side).
        // Sample 3: ratio e^0.5 with A = -2: max(3.2974, 2.4) = 3.2974.
        // Sample 4: advantage 10 clipped to 3, ratio 1: -3.
        let new = t(&[0.5, -0.5, 0.5, 0.0]);
        let old = t(&[0.0, 0.0, 0.0, 0.0]);
        let adv = t(&[1.0, 1.0, -2.0, 10.0]);
        let term = ppo_loss(&new, &old, &adv, 0.2, 3.0).unwrap();
        let e = 0.5f64.exp();
        let want = (-1.2 - 1.0 / e + 2.0 * e - 3.0) / 4.0;
        let got = term.loss.to_scalar::<f32>().unwrap() as f64;
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
        assert!((term.approx_kl - 0.5 * (0.25 * 3.0) / 4.0).abs() < 1e-9);
        assert_eq!(term.clip_fraction, 0.75);
    }

    #[test]
    fn clipped_samples_carry_no_gradient() {
        let new = Var::new(&[0.5f32, 0.0], &Device::Cpu).unwrap();
        let old = t(&[0.0, 0.0]);
        let adv = t(&[1.0, 1.0]);
        let term = ppo_loss(new.as_tensor(), &old, &adv, 0.2, 5.0).unwrap();
        let grads = term.loss.backward().unwrap();
        let g = grads
            .get(new.as_tensor())
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        // d/dx of -A * e^x / 2 at x = 0 is -0.5; the clipped sample's gradient is 0.
        assert_eq!(g[0], 0.0);
        assert!((g[1] + 0.5).abs() < 1e-6, "{g:?}");
    }
}
