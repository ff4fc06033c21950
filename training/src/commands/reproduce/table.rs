//! The tables `reproduce` writes: rows (base, the RL adapters, identity) per test set, the verdict
//! of each adapter against the base, and their markdown.

use std::path::PathBuf;

use serde::Serialize;
use serde_json::Value;

use super::spec::{SamplerSpec, SynthSpec};
use super::EvalSampler;
use crate::eval::SettingSummary;

/// The pass condition: CLIP-T may fall by at most this much against the base.
pub const CLIP_T_TOLERANCE: f64 = 0.005;

/// One DDPO run of a table: its reward and what training did.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// `attn`, `clip`, `both`, `ours` or `oracle`.
    pub name: String,
    pub run_dir: PathBuf,
    /// The adapter evaluated: the validation's best when the run validated, else the last.
    pub adapter: PathBuf,
    /// The reward as a formula.
    pub reward: String,
    pub epochs: usize,
    /// The epoch of the evaluated adapter (the validation's best), when the run validated and an
    /// epoch beat the base; `None`: the last adapter is evaluated.
    pub selected_epoch: Option<usize>,
    pub reward_first_tenth: Option<f64>,
    pub reward_last_tenth: Option<f64>,
    /// The samples' L1 to their targets, first and last tenth (the policy's true training error).
    pub train_l1_first_tenth: Option<f64>,
    pub train_l1_last_tenth: Option<f64>,
    pub seconds_per_epoch: Option<f64>,
}

/// One row of a table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `base`, `identity`, or the run's name.
    pub name: String,
    pub label: String,
    pub all_turn: SettingSummary,
    pub final_turn: SettingSummary,
    /// Against the base (adapter rows only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
}

/// An adapter row against the base row, all-turn setting: which of the paper's four metrics it
/// wins, whether its edit-region L1 is no worse than the base's and CLIP-T within 0.005 of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Of `l1`, `l2`, `ssim`, `psnr`.
    pub wins: Vec<String>,
    pub edit_l1: Option<f64>,
    pub base_edit_l1: Option<f64>,
    /// Adapter edit-region L1 / base edit-region L1.
    pub edit_l1_ratio: Option<f64>,
    pub edit_l1_no_worse: bool,
    /// Base CLIP-T - adapter CLIP-T (positive: the adapter lost some).
    pub clip_t_drop: Option<f64>,
    pub clip_t_kept: bool,
    /// At least 3 of the 4 won, edit-region L1 no worse, CLIP-T within 0.005.
    pub pass: bool,
}

/// Compares an adapter's all-turn summary with the base's.
pub fn verdict(adapter: &SettingSummary, base: &SettingSummary) -> Verdict {
    let lower = |a: Option<f64>, b: Option<f64>| matches!((a, b), (Some(a), Some(b)) if a < b);
    let mut wins = Vec::new();
    for (name, won) in [
        ("l1", lower(adapter.l1, base.l1)),
        ("l2", lower(adapter.l2, base.l2)),
        ("ssim", lower(base.ssim, adapter.ssim)),
        ("psnr", lower(base.psnr, adapter.psnr)),
    ] {
        if won {
            wins.push(name.to_string());
        }
    }
    let edit_l1_ratio = match (adapter.edit_l1, base.edit_l1) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let edit_l1_no_worse = matches!((adapter.edit_l1, base.edit_l1), (Some(a), Some(b)) if a <= b);
    let clip_t_drop = match (adapter.clip_t, base.clip_t) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    // Without CLIP-T measured there is nothing to lose.
    let clip_t_kept = clip_t_drop.is_none_or(|d| d <= CLIP_T_TOLERANCE);
    Verdict {
        pass: wins.len() >= 3 && edit_l1_no_worse && clip_t_kept,
        wins,
        edit_l1: adapter.edit_l1,
        base_edit_l1: base.edit_l1,
        edit_l1_ratio,
        edit_l1_no_worse,
        clip_t_drop,
        clip_t_kept,
    }
}

/// The rows of one test set.
#[derive(Debug, Serialize)]
pub struct TestTable {
    pub path: String,
    #[serde(flatten)]
    pub spec: SynthSpec,
    pub rows: Vec<Row>,
}

#[derive(Debug, Serialize)]
pub struct SetInfo {
    pub path: String,
    #[serde(flatten)]
    pub spec: SynthSpec,
}

#[derive(Debug, Serialize)]
pub struct Table {
    pub table: u8,
    pub model: String,
    pub base_fingerprint: String,
    pub train_world: SetInfo,
    pub validation_set: Option<SetInfo>,
    pub sampler: SamplerSpec,
    pub clip: Option<String>,
    /// Before each run's reward setting and folder.
    pub ddpo_config: Value,
    pub runs: Vec<RunSummary>,
    pub test_sets: Vec<TestTable>,
    /// Adapter rows that pass on every test set.
    pub passing: Vec<String>,
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.decimals$}"))
}

/// What a run is called in the tables.
pub fn variant_title(name: &str) -> &'static str {
    match name {
        "attn" => "attention only",
        "clip" => "clip only",
        "both" => "the paper's reward (attention + clip)",
        "oracle" => "ORACLE ablation (-L1 to the target; not the paper's method)",
        _ => "ours",
    }
}

impl Table {
    pub fn to_markdown(&self) -> String {
        let mut md = match self.table {
            1 => String::from("# Table 1 in miniature: base vs + RL adapters vs identity\n\n"),
            _ => String::from("# Table 2 in miniature: the reward ablation\n\n"),
        };
        md.push_str(&format!(
            "Model `{}` (UNet fingerprint `{}`). Training world `{}`: {} sessions, seed {}, {}x{}.",
            self.model,
            self.base_fingerprint
                .get(..12)
                .unwrap_or(&self.base_fingerprint),
            self.train_world.path,
            self.train_world.spec.count,
            self.train_world.spec.seed,
            self.train_world.spec.size,
            self.train_world.spec.size,
        ));
        if let Some(v) = &self.validation_set {
            md.push_str(&format!(
                " Validation world (model selection) `{}`: {} sessions, seed {}.",
                v.path, v.spec.count, v.spec.seed
            ));
        }
        md.push_str("\n\n");
        let s = &self.sampler;
        md.push_str(&format!(
            "Every row sampled alike ({} sampler): scheduler {}, eta {}, {} steps, guidance {} / {}, \
             per-turn seeds from base seed {}. CLIP-T: {}.\n\n",
            match s.kind {
                EvalSampler::Eval => "eval's default",
                EvalSampler::Policy => "the DDPO policy's",
            },
            s.scheduler.as_deref().unwrap_or("the model's own"),
            s.eta,
            s.steps
                .map_or("the pipeline's default".to_string(), |n| n.to_string()),
            s.guidance_scale,
            s.image_guidance_scale,
            s.seed,
            self.clip
                .as_deref()
                .map_or("not measured".to_string(), |c| format!("`{c}`")),
        ));
        for test in &self.test_sets {
            md.push_str(&format!(
                "## Test set `{}` (unseen seed {}, {} sessions)\n\n",
                test.path, test.spec.seed, test.spec.count
            ));
            for (title, final_turn) in [
                (
                    "All turns (each turn edited from its ground-truth source)",
                    false,
                ),
                ("Final turn (each session edited iteratively)", true),
            ] {
                md.push_str(&format!("{title}:\n\n"));
                md.push_str(
                    "| model | turns | L1 ↓ | L2 ↓ | SSIM ↑ | PSNR ↑ | CLIP-T ↑ | edit-region L1 ↓ | preservation L1 ↓ |\n\
                     | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
                );
                for row in &test.rows {
                    let m = if final_turn {
                        &row.final_turn
                    } else {
                        &row.all_turn
                    };
                    md.push_str(&format!(
                        "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                        row.label,
                        m.count,
                        cell(m.l1, 4),
                        cell(m.l2, 4),
                        cell(m.ssim, 4),
                        cell(m.psnr, 2),
                        cell(m.clip_t, 4),
                        cell(m.edit_l1, 4),
                        cell(m.preserve_l1, 4),
                    ));
                }
                md.push('\n');
            }
            for row in &test.rows {
                if let Some(v) = &row.verdict {
                    md.push_str(&format!("- {}\n", verdict_line(&row.label, v)));
                }
            }
            md.push('\n');
        }
        md.push_str(
            "DDPO training (mean of the first and of the last tenth of the epochs; train L1: the \
             samples' L1 to their targets):\n\n\
             | run | reward | epochs | selected epoch | reward, first tenth | reward, last tenth | train L1, first tenth | train L1, last tenth | s / epoch | folder |\n\
             | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |\n",
        );
        for run in &self.runs {
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} | {} | `{}` |\n",
                variant_title(&run.name),
                run.reward,
                run.epochs,
                run.selected_epoch
                    .map_or("last".to_string(), |e| e.to_string()),
                cell(run.reward_first_tenth, 4),
                cell(run.reward_last_tenth, 4),
                cell(run.train_l1_first_tenth, 4),
                cell(run.train_l1_last_tenth, 4),
                cell(run.seconds_per_epoch, 1),
                run.run_dir.display(),
            ));
        }
        md.push('\n');
        md.push_str(&format!(
            "Passing on every test set: {}.\n",
            if self.passing.is_empty() {
                "none".to_string()
            } else {
                self.passing.join(", ")
            }
        ));
        md
    }
}

pub fn verdict_line(label: &str, v: &Verdict) -> String {
    let wins = if v.wins.is_empty() {
        "none".to_string()
    } else {
        v.wins
            .iter()
            .map(|w| w.to_uppercase())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let edit = match (v.edit_l1, v.base_edit_l1, v.edit_l1_ratio) {
        (Some(ours), Some(base), Some(ratio)) => format!(
            "edit-region L1 {ours:.4} against the base's {base:.4} (x{ratio:.3}, {})",
            if v.edit_l1_no_worse {
                "no worse"
            } else {
                "worse"
            }
        ),
        _ => "edit-region L1 not measured".to_string(),
    };
    let clip = match v.clip_t_drop {
        Some(d) => format!("CLIP-T {:+.4}", -d),
        None => "CLIP-T not measured".to_string(),
    };
    format!(
        "**{label}** beats the base on {} of L1, L2, SSIM, PSNR ({wins}); {edit}; {clip}. \
         Pass (>= 3 of 4, edit-region L1 no worse, CLIP-T down at most {CLIP_T_TOLERANCE}): **{}**.",
        v.wins.len(),
        if v.pass { "pass" } else { "fail" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(l1: f64, l2: f64, ssim: f64, psnr: f64, edit: f64, clip: f64) -> SettingSummary {
        SettingSummary {
            count: 1,
            l1: Some(l1),
            l2: Some(l2),
            psnr: Some(psnr),
            ssim: Some(ssim),
            edit_l1: Some(edit),
            preserve_l1: Some(0.0),
            clip_t: Some(clip),
        }
    }

    #[test]
    fn verdict_counts_wins_edit_region_and_clip_t() {
        let base = summary(0.05, 0.02, 0.7, 19.0, 0.100, 0.30);
        let better = summary(0.04, 0.01, 0.8, 20.0, 0.099, 0.296);
        let v = verdict(&better, &base);
        assert_eq!(v.wins, ["l1", "l2", "ssim", "psnr"]);
        assert!(v.edit_l1_no_worse && v.clip_t_kept && v.pass, "{v:?}");
        // Wins the four by editing less, losing the edit region: fails.
        let lazy = summary(0.04, 0.01, 0.8, 20.0, 0.101, 0.30);
        let v = verdict(&lazy, &base);
        assert!(!v.edit_l1_no_worse && !v.pass);
        // Loses CLIP-T by more than 0.005: fails.
        let off_text = summary(0.04, 0.01, 0.8, 20.0, 0.09, 0.294);
        let v = verdict(&off_text, &base);
        assert!(!v.clip_t_kept && !v.pass, "{v:?}");
        let worse = summary(0.06, 0.01, 0.6, 20.0, 0.09, 0.30);
        let v = verdict(&worse, &base);
        assert_eq!(v.wins, ["l2", "psnr"]);
        assert!(!v.pass);
    }
}
