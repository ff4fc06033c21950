//! The reward audit: before a reward term goes into RL, does it know a good edit from a bad one?
//! For each turn, K samples of the base model (the RL policy's sampler, the attention read from the
//! frozen base); for each term: how much it varies within a turn (what group advantages see) and
//! between turns (what they must not see), its per-turn Spearman rank correlation with -L1 to the
//! target, and the metrics of the best-of-K sample it picks, against the mean sample and the
//! oracle's pick (-L1 itself). A term whose best-of-K does not beat the mean sample cannot teach
//! the policy anything.

use std::sync::Arc;

use image::RgbImage;
use rl4pix_model::lora::ResolvedAdapter;
use rl4pix_model::pipeline::InstructPix2Pix;
use rl4pix_model::scheduler::ddim::DdimScheduler;
use serde::Serialize;

use super::config::{DdpoConfig, RewardConfig};
use super::reward::RewardTerms;
use super::sampler::{sample_batch, AttentionSource, Guidance, PromptItem};
use super::stat_tracker::mean_std;
use super::{DdpoError, Result};
use crate::metrics;

/// The metrics of one sample against its turn's target.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct SampleMetrics {
    pub l1: f64,
    pub l2: f64,
    pub psnr: f64,
    pub ssim: f64,
    pub edit_l1: f64,
}

impl SampleMetrics {
    pub fn of(output: &RgbImage, prompt: &PromptItem) -> Result<Self> {
        let err = |e: metrics::MetricError| DdpoError::Invalid(format!("{}: {e}", prompt.key));
        let (w, h) = prompt.target.dimensions();
        let mask = metrics::resize_mask(&prompt.mask, w, h);
        let l2 = metrics::mse(output, &prompt.target).map_err(err)?;
        Ok(Self {
            l1: metrics::l1(output, &prompt.target).map_err(err)?,
            l2,
            psnr: metrics::psnr(l2),
            ssim: metrics::ssim(output, &prompt.target).map_err(err)?,
            edit_l1: metrics::edit_region_l1(output, &prompt.target, &mask)
                .map_err(err)?
                .unwrap_or(0.0),
        })
    }

    fn mean(items: &[SampleMetrics]) -> Self {
        let m = |f: fn(&SampleMetrics) -> f64| mean_std(items.iter().map(f)).0;
        Self {
            l1: m(|s| s.l1),
            l2: m(|s| s.l2),
            psnr: m(|s| s.psnr),
            ssim: m(|s| s.ssim),
            edit_l1: m(|s| s.edit_l1),
        }
    }
}

/// One reward term's audit.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TermAudit {
    pub name: String,
    /// Mean over turns of the term's std across that turn's K samples.
    pub within_turn_std: f64,
    /// Std over turns of the term's per-turn mean.
    pub between_turn_std: f64,
    /// Mean over turns of Spearman's rho between the term and -L1 to the target (turns where
    /// either is constant are left out).
    pub spearman_with_neg_l1: f64,
    /// Metrics of the sample the term ranks first in each turn, averaged over turns.
    pub best_of_k: SampleMetrics,
    /// Whether its best-of-K beats the mean sample on L1.
    pub beats_mean: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditReport {
    pub turns: usize,
    pub samples_per_turn: usize,
    pub sampler: String,
    pub mean_sample: SampleMetrics,
    pub terms: Vec<TermAudit>,
}

/// A reward term read from a sample's terms, "higher is better".
pub type TermScore = Box<dyn Fn(&RewardTerms) -> f64>;

/// The terms audited, each as (name, its score).
pub fn audited_terms(config: &RewardConfig) -> Vec<(String, TermScore)> {
    let configured = config.clone();
    vec![
        (
            "L_att (attention)".into(),
            Box::new(|t: &RewardTerms| t.attention),
        ),
        (
            "-L_clip (MAE to source)".into(),
            Box::new(|t: &RewardTerms| -t.mae),
        ),
        (
            "L_loc (localization)".into(),
            Box::new(|t: &RewardTerms| t.localization),
        ),
        (
            "-L_out (change outside mask)".into(),
            Box::new(|t: &RewardTerms| -t.outside),
        ),
        (
            "paper: L_att - L_clip".into(),
            Box::new(|t: &RewardTerms| t.attention - t.mae),
        ),
        (
            format!("configured: {}", reward_formula(&configured)),
            Box::new(move |t: &RewardTerms| {
                configured.attention_weight * t.attention
                    + configured.alpha * t.clip
                    + configured.localization_weight * t.localization
                    + configured.outside_weight * t.outside
                    - configured.oracle_weight * t.oracle_l1.unwrap_or(0.0)
            }),
        ),
        (
            "ORACLE: -L1 to target".into(),
            Box::new(|t: &RewardTerms| -t.oracle_l1.unwrap_or(0.0)),
        ),
    ]
}

/// The reward as a formula, e.g. `1·L_att - 1·L_clip - 4·L_out`.
pub fn reward_formula(r: &RewardConfig) -> String {
    let mut out = String::new();
    for (w, name) in [
        (r.attention_weight, "L_att"),
        (r.alpha, "L_clip"),
        (r.localization_weight, "L_loc"),
        (r.outside_weight, "L_out"),
        (-r.oracle_weight, "L1(target)"),
    ] {
        if w == 0.0 {
            continue;
        }
        let sign = if w < 0.0 {
            "-"
        } else if out.is_empty() {
            ""
        } else {
            "+"
        };
        let sep = if out.is_empty() { "" } else { " " };
        out.push_str(&format!("{sep}{sign}{}·{name}", w.abs()));
    }
    if out.is_empty() {
        out.push('0');
    }
    out
}

/// Spearman's rho of two equally long slices (average ranks for ties); `None` when either is
/// constant.
pub fn spearman(a: &[f64], b: &[f64]) -> Option<f64> {
    assert_eq!(a.len(), b.len(), "spearman of slices of different lengths");
    let ra = ranks(a);
    let rb = ranks(b);
    let (ma, sa) = mean_std(ra.iter().copied());
    let (mb, sb) = mean_std(rb.iter().copied());
    if sa == 0.0 || sb == 0.0 {
        return None;
    }
    let cov = ra
        .iter()
        .zip(&rb)
        .map(|(x, y)| (x - ma) * (y - mb))
        .sum::<f64>()
        / a.len() as f64;
    Some(cov / (sa * sb))
}

fn ranks(values: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&i, &j| values[i].total_cmp(&values[j]));
    let mut ranks = vec![0.0; values.len()];
    let mut start = 0;
    while start < order.len() {
        let mut end = start;
        while end + 1 < order.len() && values[order[end + 1]] == values[order[start]] {
            end += 1;
        }
        let rank = (start + end) as f64 / 2.0;
        for &i in &order[start..=end] {
            ranks[i] = rank;
        }
        start = end + 1;
    }
    ranks
}

/// Samples `samples_per_turn` edits of every prompt with the base model under `config`'s policy
/// sampler and audits every term.
pub fn audit(
    pipeline: &InstructPix2Pix,
    config: &DdpoConfig,
    prompts: &[PromptItem],
    samples_per_turn: usize,
    seed: u64,
    mut progress: impl FnMut(usize, usize),
) -> Result<AuditReport> {
    if prompts.is_empty() || samples_per_turn < 2 {
        return Err(DdpoError::Invalid(
            "the audit needs at least one turn and two samples per turn".into(),
        ));
    }
    let scheduler = DdimScheduler::new(
        &pipeline.scheduler_config,
        config.sample.num_steps,
        config.sample.eta,
    )?;
    let guidance = Guidance::of_policy(&config.sample, pipeline);
    let base = Arc::new(ResolvedAdapter {
        name: "base".into(),
        deltas: vec![None; pipeline.unet.projections().entries.len()],
    });
    let source =
        AttentionSource::parse(&config.reward.attention_source).unwrap_or(AttentionSource::Base);
    // Sample i of turn p: index p, seed derived from both.
    let all: Vec<(usize, u64)> = (0..prompts.len())
        .flat_map(|p| {
            (0..samples_per_turn).map(move |k| {
                (
                    p,
                    seed ^ ((p as u64) << 20) ^ (k as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
                )
            })
        })
        .collect();
    let mut per_turn: Vec<Vec<(RewardTerms, SampleMetrics)>> = vec![Vec::new(); prompts.len()];
    let batch = config.sample.batch_size.max(1);
    let mut done = 0;
    for chunk in all.chunks(batch) {
        let indices: Vec<usize> = chunk.iter().map(|c| c.0).collect();
        let seeds: Vec<u64> = chunk.iter().map(|c| c.1).collect();
        let t = sample_batch(
            pipeline, &scheduler, prompts, &indices, &seeds, guidance, &base, source,
        )?;
        for (i, &p) in indices.iter().enumerate() {
            let prompt = &prompts[p];
            let terms = prompt.reward(&config.reward, &t.attention[i], t.grid, &t.images[i]);
            per_turn[p].push((terms, SampleMetrics::of(&t.images[i], prompt)?));
        }
        done += chunk.len();
        progress(done, all.len());
    }
    let all_metrics: Vec<SampleMetrics> = per_turn.iter().flatten().map(|s| s.1).collect();
    let mean_sample = SampleMetrics::mean(&all_metrics);
    let mut terms = Vec::new();
    for (name, value) in audited_terms(&config.reward) {
        let mut within = Vec::new();
        let mut turn_means = Vec::new();
        let mut rhos = Vec::new();
        let mut picks = Vec::new();
        for samples in &per_turn {
            let values: Vec<f64> = samples.iter().map(|s| value(&s.0)).collect();
            let neg_l1: Vec<f64> = samples.iter().map(|s| -s.1.l1).collect();
            let (m, s) = mean_std(values.iter().copied());
            within.push(s);
            turn_means.push(m);
            if let Some(rho) = spearman(&values, &neg_l1) {
                rhos.push(rho);
            }
            let best = (0..values.len())
                .max_by(|&i, &j| values[i].total_cmp(&values[j]))
                .unwrap_or(0);
            picks.push(samples[best].1);
        }
        let best_of_k = SampleMetrics::mean(&picks);
        terms.push(TermAudit {
            name,
            within_turn_std: mean_std(within.into_iter()).0,
            between_turn_std: mean_std(turn_means.into_iter()).1,
            spearman_with_neg_l1: mean_std(rhos.into_iter()).0,
            beats_mean: best_of_k.l1 < mean_sample.l1,
            best_of_k,
        });
    }
    Ok(AuditReport {
        turns: prompts.len(),
        samples_per_turn,
        sampler: format!(
            "DDIM eta {}, {} steps, guidance {} / {}, attention from the {}",
            config.sample.eta,
            config.sample.num_steps,
            guidance.text,
            guidance.image,
            match source {
                AttentionSource::Base => "frozen base",
                AttentionSource::Policy => "policy",
            }
        ),
        mean_sample,
        terms,
    })
}

impl AuditReport {
    pub fn to_markdown(&self) -> String {
        let mut md = format!(
            "Reward audit: {} turns x {} samples of the base model ({}).\n\n\
             | term | within-turn std | between-turn std | Spearman with -L1 | best-of-K L1 ↓ | L2 ↓ | SSIM ↑ | PSNR ↑ | edit-region L1 ↓ | beats the mean |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
            self.turns, self.samples_per_turn, self.sampler
        );
        let m = &self.mean_sample;
        md.push_str(&format!(
            "| (mean sample) | | | | {:.4} | {:.4} | {:.4} | {:.2} | {:.4} | |\n",
            m.l1, m.l2, m.ssim, m.psnr, m.edit_l1
        ));
        for t in &self.terms {
            let b = &t.best_of_k;
            md.push_str(&format!(
                "| {} | {:.4} | {:.4} | {:+.3} | {:.4} | {:.4} | {:.4} | {:.2} | {:.4} | {} |\n",
                t.name,
                t.within_turn_std,
                t.between_turn_std,
                t.spearman_with_neg_l1,
                b.l1,
                b.l2,
                b.ssim,
                b.psnr,
                b.edit_l1,
                if t.beats_mean { "yes" } else { "no" }
            ));
        }
        md
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_ranks_with_ties() {
        assert_eq!(spearman(&[1.0, 2.0, 3.0], &[10.0, 20.0, 30.0]), Some(1.0));
        let rho = spearman(&[1.0, 2.0, 3.0], &[3.0, 2.0, 1.0]).unwrap();
        assert!((rho + 1.0).abs() < 1e-12);
        assert_eq!(spearman(&[1.0, 1.0], &[1.0, 2.0]), None);
        // Ties get average ranks: [0.5, 0.5, 2] vs [0, 1, 2].
        let rho = spearman(&[5.0, 5.0, 9.0], &[1.0, 2.0, 3.0]).unwrap();
        assert!((rho - 0.866_025_403_784_438_6).abs() < 1e-9, "{rho}");
    }

    #[test]
    fn formulas_name_the_weights() {
        let mut r = RewardConfig::default_weights();
        r.attention_weight = 1.0;
        r.alpha = -1.0;
        r.outside_weight = -4.0;
        assert_eq!(reward_formula(&r), "1·L_att -1·L_clip -4·L_out");
        assert_eq!(reward_formula(&RewardConfig::default_weights()), "0");
    }
}
