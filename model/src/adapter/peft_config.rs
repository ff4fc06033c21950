//! PEFT's `LoraConfig` as adapter files carry it (`lora_adapter_metadata`): rank, alpha and
//! their per-module patterns.

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use super::LORA_ADAPTER_METADATA_KEY;

/// The fields of a PEFT `LoraConfig` that decide ranks and scales.
#[derive(Debug, Default)]
pub(super) struct PeftConfig {
    pub(super) r: Option<usize>,
    pub(super) lora_alpha: Option<f64>,
    pub(super) target_modules: Option<Vec<String>>,
    pub(super) rank_pattern: Vec<(PatternMatcher, usize)>,
    pub(super) alpha_pattern: Vec<(PatternMatcher, f64)>,
    pub(super) use_rslora: bool,
}

/// PEFT matches a pattern key `k` against a module name with `(.*\.)?(k)$`.
#[derive(Debug)]
pub(super) enum PatternMatcher {
    Regex(regex::Regex),
    /// Python regex syntax Rust's engine rejects: fall back to a literal suffix match.
    Literal(String),
}

impl PatternMatcher {
    fn new(pattern: &str) -> Self {
        match regex::Regex::new(&format!(r"^(?:.*\.)?(?:{pattern})$")) {
            Ok(regex) => Self::Regex(regex),
            Err(_) => Self::Literal(pattern.to_string()),
        }
    }

    fn matches(&self, module: &str) -> bool {
        match self {
            Self::Regex(regex) => regex.is_match(module),
            Self::Literal(pattern) => module == pattern || module.ends_with(&format!(".{pattern}")),
        }
    }
}

pub(super) fn lookup_pattern<T: Copy>(patterns: &[(PatternMatcher, T)], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(matcher, _)| matcher.matches(module))
        .map(|&(_, value)| value)
}

/// Reads `lora_adapter_metadata`. Fields are `unet.`-prefixed when written by a pipeline's
/// `save_lora_weights` and bare when written by the model's `save_lora_adapter`.
pub(super) fn parse_peft_config(json: &str) -> std::result::Result<PeftConfig, String> {
    let value: Value = serde_json::from_str(json)
        .map_err(|e| format!("metadata `{LORA_ADAPTER_METADATA_KEY}` is not valid JSON: {e}"))?;
    let Value::Object(object) = value else {
        return Err(format!(
            "metadata `{LORA_ADAPTER_METADATA_KEY}` is not a JSON object"
        ));
    };
    let field = |name: &str| -> Option<(String, &Value)> {
        [format!("unet.{name}"), name.to_string()]
            .into_iter()
            .find_map(|key| object.get(&key).filter(|v| !v.is_null()).map(|v| (key, v)))
    };
    let bad = |key: &str, what: &str, value: &Value| {
        format!("metadata `{LORA_ADAPTER_METADATA_KEY}`: `{key}` must be {what}, found {value}")
    };
    let as_rank = |key: &str, value: &Value| {
        value
            .as_u64()
            .filter(|&r| r > 0)
            .and_then(|r| usize::try_from(r).ok())
            .ok_or_else(|| bad(key, "a positive integer", value))
    };
    let as_alpha = |key: &str, value: &Value| {
        value
            .as_f64()
            .filter(|a| a.is_finite())
            .ok_or_else(|| bad(key, "a finite number", value))
    };

    let mut config = PeftConfig::default();
    if let Some((key, value)) = field("r") {
        config.r = Some(as_rank(&key, value)?);
    }
    if let Some((key, value)) = field("lora_alpha") {
        config.lora_alpha = Some(as_alpha(&key, value)?);
    }
    if let Some((key, value)) = field("target_modules") {
        config.target_modules = Some(match value {
            // A string is a regex over full module names in PEFT; keep it as given.
            Value::String(pattern) => vec![pattern.clone()],
            Value::Array(items) => items
                .iter()
                .map(|item| item.as_str().map(str::to_string))
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| bad(&key, "a list of strings", value))?,
            _ => return Err(bad(&key, "a list of strings", value)),
        });
    }
    if let Some((key, value)) = field("rank_pattern") {
        let map = value
            .as_object()
            .ok_or_else(|| bad(&key, "an object", value))?;
        for (pattern, rank) in map {
            let rank = as_rank(&format!("{key}.{pattern}"), rank)?;
            config
                .rank_pattern
                .push((PatternMatcher::new(pattern), rank));
        }
    }
    if let Some((key, value)) = field("alpha_pattern") {
        let map = value
            .as_object()
            .ok_or_else(|| bad(&key, "an object", value))?;
        for (pattern, alpha) in map {
            let alpha = as_alpha(&format!("{key}.{pattern}"), alpha)?;
            config
                .alpha_pattern
                .push((PatternMatcher::new(pattern), alpha));
        }
    }
    for flag in ["use_rslora", "use_dora"] {
        if let Some((key, value)) = field(flag) {
            let on = value
                .as_bool()
                .ok_or_else(|| bad(&key, "true or false", value))?;
            match flag {
                "use_rslora" => config.use_rslora = on,
                _ if on => return Err(format!("`{key}` is true: DoRA adapters are not supported")),
                _ => {}
            }
        }
    }
    Ok(config)
}

/// PEFT-style short names (`to_q`, `to_out.0`): what follows the attention module, or the last
/// component (with its parent when the last one is an index).
pub(super) fn derive_target_modules<'a>(
    modules: impl Iterator<Item = &'a str>,
) -> BTreeSet<String> {
    modules
        .map(|module| {
            let parts: Vec<&str> = module.split('.').collect();
            let start = match parts.iter().rposition(|p| p.starts_with("attn")) {
                Some(attn) if attn + 1 < parts.len() => attn + 1,
                _ if parts.len() >= 2 && parts[parts.len() - 1].parse::<usize>().is_ok() => {
                    parts.len() - 2
                }
                _ => parts.len().saturating_sub(1),
            };
            parts[start..].join(".")
        })
        .collect()
}

pub(super) fn most_common<T: Ord + Copy>(values: impl Iterator<Item = T>) -> Option<T> {
    let mut counts: BTreeMap<T, usize> = BTreeMap::new();
    for value in values {
        *counts.entry(value).or_default() += 1;
    }
    // Ties go to the smallest value so the result does not depend on iteration order.
    counts
        .into_iter()
        .max_by(|(va, ca), (vb, cb)| ca.cmp(cb).then(vb.cmp(va)))
        .map(|(value, _)| value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peft_patterns_match_module_suffixes() {
        let matcher = PatternMatcher::new("attn1.to_q");
        assert!(matcher.matches("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"));
        assert!(matcher.matches("attn1.to_q"));
        assert!(!matcher.matches("down_blocks.0.attentions.0.transformer_blocks.0.xattn1.to_q"));
        assert!(!matcher.matches("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qk"));
    }

    #[test]
    fn short_target_names() {
        let names = derive_target_modules(
            [
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_out.0",
                "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
                "mid_block.attentions.0.proj_in",
            ]
            .into_iter(),
        );
        let names: Vec<_> = names.into_iter().collect();
        assert_eq!(names, ["proj_in", "to_k", "to_out.0"]);
    }

    #[test]
    fn most_common_breaks_ties_by_smallest() {
        assert_eq!(most_common([4, 8, 8, 4, 2].into_iter()), Some(4));
        assert_eq!(most_common([4, 8, 8].into_iter()), Some(8));
        assert_eq!(most_common(std::iter::empty::<usize>()), None);
    }
}
