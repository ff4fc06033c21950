//! Writing diffusers' LoRA format: `unet.`-prefixed f32 A/B tensors, PEFT's `LoraConfig` as
//! `save_lora_weights` stores it, and our own metadata keys.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

use candle_core::DType;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::Value;

use super::peft_config::{derive_target_modules, most_common};
use super::{
    LoraAdapter, BASE_FINGERPRINT_KEY, CREATED_KEY, LORA_ADAPTER_METADATA_KEY, REWARD_SUMMARY_KEY,
    TRAINING_CONFIG_KEY,
};
use crate::error::{ModelError, Result};

impl LoraAdapter {
    /// Serializes in diffusers' format (f32 `unet.<path>.lora_A.weight` / `lora_B.weight`,
    /// `lora_adapter_metadata` as `save_lora_weights` writes it) plus our own metadata keys.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let refuse = |reason: String| ModelError::Adapter {
            name: self.name.clone(),
            reason,
        };
        if self.layers.is_empty() {
            return Err(refuse("cannot write an adapter without layers".to_string()));
        }
        let mut tensors: Vec<(String, Vec<usize>, Vec<u8>)> =
            Vec::with_capacity(2 * self.layers.len());
        let mut ranks = BTreeMap::new();
        for (module, layer) in &self.layers {
            let (rank, in_features) = layer
                .down
                .dims2()
                .map_err(|e| refuse(format!("layer `{module}`: down (A) must be a matrix: {e}")))?;
            let (out_features, up_rank) = layer
                .up
                .dims2()
                .map_err(|e| refuse(format!("layer `{module}`: up (B) must be a matrix: {e}")))?;
            if rank != up_rank || rank == 0 {
                return Err(refuse(format!(
                    "layer `{module}`: down (A) is {rank}x{in_features} but up (B) is \
                     {out_features}x{up_rank}; ranks must agree and be positive"
                )));
            }
            if !layer.scale.is_finite() {
                return Err(refuse(format!(
                    "layer `{module}`: scale {} is not finite",
                    layer.scale
                )));
            }
            for (part, tensor) in [("lora_A", &layer.down), ("lora_B", &layer.up)] {
                let key = format!("unet.{module}.{part}.weight");
                let values = tensor
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?;
                if let Some(index) = values.iter().position(|v| !v.is_finite()) {
                    return Err(refuse(format!(
                        "tensor `{key}` holds a non-finite value at flat index {index}"
                    )));
                }
                let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                tensors.push((key, tensor.dims().to_vec(), bytes));
            }
            ranks.insert(module.as_str(), (rank, layer.scale));
        }

        let mut header = HashMap::new();
        header.insert("format".to_string(), "pt".to_string());
        header.insert(
            LORA_ADAPTER_METADATA_KEY.to_string(),
            self.peft_config_json(&ranks).map_err(refuse)?,
        );
        let meta = &self.metadata;
        if let Some(fingerprint) = &meta.base_fingerprint {
            header.insert(BASE_FINGERPRINT_KEY.to_string(), fingerprint.clone());
        }
        if let Some(created) = &meta.created {
            header.insert(CREATED_KEY.to_string(), created.clone());
        }
        for (key, value) in [
            (TRAINING_CONFIG_KEY, &meta.training_config),
            (REWARD_SUMMARY_KEY, &meta.reward_summary),
        ] {
            if let Some(value) = value {
                let json = serde_json::to_string(value)
                    .map_err(|e| refuse(format!("metadata `{key}` cannot be serialized: {e}")))?;
                header.insert(key.to_string(), json);
            }
        }

        let mut views = Vec::with_capacity(tensors.len());
        for (key, shape, bytes) in &tensors {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
                .map_err(|e| refuse(format!("tensor `{key}`: {e}")))?;
            views.push((key.as_str(), view));
        }
        safetensors::serialize(views, Some(header))
            .map_err(|e| refuse(format!("cannot serialize safetensors: {e}")))
    }

    /// Writes atomically: a temporary file in the same folder, then a rename, so a reader (the
    /// server's registry) never sees a partial file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let bytes = self.to_bytes()?;
        crate::atomic_file::write(path, &bytes).map_err(|cause| ModelError::Io {
            path: path.to_path_buf(),
            cause,
        })
    }

    /// The PEFT `LoraConfig` as diffusers' `save_lora_weights` stores it: every field prefixed
    /// with `unet.`, keys sorted, two-space indent. Only long-standing `LoraConfig` fields are
    /// written, because `LoraConfig(**metadata)` rejects fields an older peft does not know.
    /// Per-layer ranks and alphas that differ from `r` / `lora_alpha` go to `rank_pattern` /
    /// `alpha_pattern`, so every layer's scale survives the round trip.
    fn peft_config_json(
        &self,
        layers: &BTreeMap<&str, (usize, f64)>,
    ) -> std::result::Result<String, String> {
        let meta = &self.metadata;
        let rank = if meta.rank > 0 {
            meta.rank
        } else {
            most_common(layers.values().map(|&(rank, _)| rank)).unwrap_or(1)
        };
        if !meta.alpha.is_finite() {
            return Err(format!("metadata alpha {} is not finite", meta.alpha));
        }
        let mut rank_pattern = serde_json::Map::new();
        let mut alpha_pattern = serde_json::Map::new();
        for (&module, &(layer_rank, scale)) in layers {
            if layer_rank != rank {
                rank_pattern.insert(module.to_string(), Value::from(layer_rank));
            }
            let layer_alpha = scale * layer_rank as f64;
            if (layer_alpha - meta.alpha).abs() > 1e-9 * meta.alpha.abs().max(1.0) {
                alpha_pattern.insert(module.to_string(), json_number(layer_alpha)?);
            }
        }
        let target_modules = if meta.target_modules.is_empty() {
            derive_target_modules(layers.keys().copied())
        } else {
            meta.target_modules.iter().cloned().collect::<BTreeSet<_>>()
        };
        let fields = [
            ("alpha_pattern", Value::Object(alpha_pattern)),
            ("base_model_name_or_path", Value::Null),
            ("bias", Value::from("none")),
            ("fan_in_fan_out", Value::Bool(false)),
            ("inference_mode", Value::Bool(false)),
            ("init_lora_weights", Value::Bool(true)),
            ("layers_pattern", Value::Null),
            ("layers_to_transform", Value::Null),
            ("lora_alpha", json_number(meta.alpha)?),
            ("lora_dropout", Value::from(0.0)),
            ("modules_to_save", Value::Null),
            ("peft_type", Value::from("LORA")),
            ("r", Value::from(rank)),
            ("rank_pattern", Value::Object(rank_pattern)),
            ("revision", Value::Null),
            (
                "target_modules",
                Value::Array(target_modules.into_iter().map(Value::from).collect()),
            ),
            ("task_type", Value::Null),
            ("use_dora", Value::Bool(false)),
            ("use_rslora", Value::Bool(false)),
        ];
        let config: serde_json::Map<String, Value> = fields
            .into_iter()
            .map(|(field, value)| (format!("unet.{field}"), value))
            .collect();
        serde_json::to_string_pretty(&sorted_json(Value::Object(config)))
            .map_err(|e| format!("cannot serialize `{LORA_ADAPTER_METADATA_KEY}`: {e}"))
    }
}

/// Integers are written as integers, as Python's json does for PEFT's int fields.
pub(super) fn json_number(value: f64) -> std::result::Result<Value, String> {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        Ok(Value::from(value as i64))
    } else {
        serde_json::Number::from_f64(value)
            .map(Value::Number)
            .ok_or_else(|| format!("alpha {value} is not finite"))
    }
}

/// Sorts object keys recursively (serde_json keeps insertion order when `preserve_order` is on).
pub(super) fn sorted_json(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let sorted: BTreeMap<String, Value> =
                map.into_iter().map(|(k, v)| (k, sorted_json(v))).collect();
            Value::Object(sorted.into_iter().collect())
        }
        Value::Array(items) => Value::Array(items.into_iter().map(sorted_json).collect()),
        other => other,
    }
}
