//! Per-prompt reward statistics (DDPO's `PerPromptStatTracker`): each prompt's advantage is its
//! reward normalised by the mean and std of that prompt's recent rewards, or by the batch's while
//! the prompt has fewer than `min_count` rewards on record.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

/// Added to the std so a prompt whose rewards are all equal gives advantages of 0, not NaN.
const STD_EPS: f64 = 1e-6;

#[derive(Debug, Clone, PartialEq)]
pub struct PerPromptStatTracker {
    buffer_size: usize,
    min_count: usize,
    buffers: BTreeMap<String, VecDeque<f64>>,
}

/// The tracker's state with every reward as its exact bit pattern (JSON floats may not round-trip
/// to the last bit, and resume must be exact).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatTrackerState {
    pub buffer_size: usize,
    pub min_count: usize,
    pub buffers: BTreeMap<String, Vec<u64>>,
}

impl PerPromptStatTracker {
    pub fn new(buffer_size: usize, min_count: usize) -> Self {
        Self {
            buffer_size: buffer_size.max(1),
            min_count,
            buffers: BTreeMap::new(),
        }
    }

    /// Records the rewards (one per sample, `keys[i]` its prompt) and returns their advantages.
    /// All of a batch's rewards are recorded before any statistics are taken, as in ddpo-pytorch.
    pub fn update(&mut self, keys: &[String], rewards: &[f64]) -> Vec<f64> {
        assert_eq!(keys.len(), rewards.len(), "one key per reward");
        let (batch_mean, batch_std) = mean_std(rewards.iter().copied());
        let mut by_prompt: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
        for (i, key) in keys.iter().enumerate() {
            by_prompt.entry(key.as_str()).or_default().push(i);
        }
        let mut advantages = vec![0.0; rewards.len()];
        for (key, indices) in by_prompt {
            let buffer = self.buffers.entry(key.to_string()).or_default();
            for &i in &indices {
                buffer.push_back(rewards[i]);
                if buffer.len() > self.buffer_size {
                    buffer.pop_front();
                }
            }
            let (mean, std) = if buffer.len() < self.min_count {
                (batch_mean, batch_std)
            } else {
                mean_std(buffer.iter().copied())
            };
            for &i in &indices {
                advantages[i] = (rewards[i] - mean) / (std + STD_EPS);
            }
        }
        advantages
    }

    /// Number of rewards on record for a prompt.
    pub fn count(&self, key: &str) -> usize {
        self.buffers.get(key).map_or(0, VecDeque::len)
    }

    pub fn num_prompts(&self) -> usize {
        self.buffers.len()
    }

    pub fn state(&self) -> StatTrackerState {
        StatTrackerState {
            buffer_size: self.buffer_size,
            min_count: self.min_count,
            buffers: self
                .buffers
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(|x| x.to_bits()).collect()))
                .collect(),
        }
    }

    pub fn from_state(state: &StatTrackerState) -> Self {
        Self {
            buffer_size: state.buffer_size.max(1),
            min_count: state.min_count,
            buffers: state
                .buffers
                .iter()
                .map(|(k, v)| (k.clone(), v.iter().map(|&b| f64::from_bits(b)).collect()))
                .collect(),
        }
    }
}

/// Advantages normalised within each group (`groups[i]` is sample i's group: its prompt):
/// `(r - group mean) / max(group std, floor)`. The floor keeps a group whose rewards barely differ
/// from turning its noise into advantages of +-1.
pub fn group_advantages(groups: &[usize], rewards: &[f64], std_floor: f64) -> Vec<f64> {
    assert_eq!(groups.len(), rewards.len(), "one group per reward");
    let mut members: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    for (i, &g) in groups.iter().enumerate() {
        members.entry(g).or_default().push(i);
    }
    let mut advantages = vec![0.0; rewards.len()];
    for indices in members.values() {
        let (mean, std) = mean_std(indices.iter().map(|&i| rewards[i]));
        let scale = std.max(std_floor) + STD_EPS;
        for &i in indices {
            advantages[i] = (rewards[i] - mean) / scale;
        }
    }
    advantages
}

/// The mean over groups of each group's reward std: the spread the policy can learn from.
pub fn within_group_std(groups: &[usize], rewards: &[f64]) -> f64 {
    let mut members: BTreeMap<usize, Vec<f64>> = BTreeMap::new();
    for (&g, &r) in groups.iter().zip(rewards) {
        members.entry(g).or_default().push(r);
    }
    let stds: Vec<f64> = members
        .values()
        .map(|v| mean_std(v.iter().copied()).1)
        .collect();
    mean_std(stds.into_iter()).0
}

/// Mean and population std (numpy's default).
pub fn mean_std(values: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let n = values.clone().count();
    if n == 0 {
        return (0.0, 0.0);
    }
    let mean = values.clone().sum::<f64>() / n as f64;
    let var = values.map(|v| (v - mean) * (v - mean)).sum::<f64>() / n as f64;
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn falls_back_to_the_batch_without_enough_history() {
        let mut t = PerPromptStatTracker::new(16, 3);
        let rewards = [1.0, 2.0, 3.0, 6.0];
        let adv = t.update(&keys(&["a", "a", "b", "c"]), &rewards);
        // batch mean 3, population std sqrt((4 + 1 + 0 + 9) / 4) = sqrt(3.5)
        let std = 3.5f64.sqrt() + 1e-6;
        let want = [-2.0 / std, -1.0 / std, 0.0, 3.0 / std];
        for (a, w) in adv.iter().zip(want) {
            assert!((a - w).abs() < 1e-12, "{adv:?}");
        }
        assert_eq!(t.count("a"), 2);
    }

    #[test]
    fn uses_the_prompts_own_history_once_it_has_enough() {
        let mut t = PerPromptStatTracker::new(4, 3);
        t.update(&keys(&["a", "a"]), &[0.0, 10.0]);
        // "a" now has 3 values [0, 10, 4]: mean 14/3, std of those; "b" has one: batch stats.
        let adv = t.update(&keys(&["a", "b"]), &[4.0, 100.0]);
        let (m, s) = mean_std([0.0, 10.0, 4.0].into_iter());
        assert!((adv[0] - (4.0 - m) / (s + 1e-6)).abs() < 1e-12);
        let (bm, bs) = mean_std([4.0, 100.0].into_iter());
        assert!((adv[1] - (100.0 - bm) / (bs + 1e-6)).abs() < 1e-12);
        // The buffer keeps the last 4 only.
        t.update(&keys(&["a", "a", "a"]), &[1.0, 2.0, 3.0]);
        assert_eq!(t.count("a"), 4);
        let adv = t.update(&keys(&["a"]), &[5.0]);
        let (m, s) = mean_std([2.0, 3.0, 5.0, 1.0].into_iter());
        assert!((adv[0] - (5.0 - m) / (s + 1e-6)).abs() < 1e-12);
    }

    #[test]
    fn state_round_trips_exactly() {
        let mut t = PerPromptStatTracker::new(16, 2);
        t.update(&keys(&["x", "y"]), &[0.1 + 0.2, 1.0 / 3.0]);
        let json = serde_json::to_string(&t.state()).unwrap();
        let back = PerPromptStatTracker::from_state(&serde_json::from_str(&json).unwrap());
        assert_eq!(back, t);
    }

    #[test]
    fn group_advantages_normalise_within_each_group_with_a_floor() {
        // Group 0: rewards 1 and 3 (mean 2, std 1); group 1: 10 and 10.002 (std 0.001 < floor).
        let adv = group_advantages(&[0, 1, 0, 1], &[1.0, 10.0, 3.0, 10.002], 0.01);
        assert!(
            (adv[0] + 1.0).abs() < 1e-5 && (adv[2] - 1.0).abs() < 1e-5,
            "{adv:?}"
        );
        // 0.001 / 0.01 = 0.1, not 1: the floor shrinks a near-constant group's advantages.
        assert!(
            (adv[1] + 0.1).abs() < 1e-4 && (adv[3] - 0.1).abs() < 1e-4,
            "{adv:?}"
        );
        // A hard prompt (group 1, rewards ~10) gets no advantage for being hard.
        assert!((adv.iter().sum::<f64>()).abs() < 1e-9);
        // Without a floor the same group is +-1.
        let adv = group_advantages(&[0, 1, 0, 1], &[1.0, 10.0, 3.0, 10.002], 0.0);
        assert!((adv[3] - 1.0).abs() < 1e-3, "{adv:?}");
        let spread = within_group_std(&[0, 1, 0, 1], &[1.0, 10.0, 3.0, 10.002]);
        assert!((spread - (1.0 + 0.001) / 2.0).abs() < 1e-9, "{spread}");
    }
}
