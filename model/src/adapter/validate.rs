//! Reading an adapter file completely (keys, shapes, dtypes, ranks, scales) against the loaded
//! base before any tensor is created.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use super::keys::{classify_key, KeyClass, ModuleRef, Part};
use super::peft_config::{
    derive_target_modules, lookup_pattern, most_common, parse_peft_config, PeftConfig,
};
use super::{
    AdapterFormat, AdapterMetadata, LoraTargets, BASE_FINGERPRINT_KEY, CREATED_KEY,
    LORA_ADAPTER_METADATA_KEY, REWARD_SUMMARY_KEY, TRAINING_CONFIG_KEY,
};

/// Tensors found for one module, before validation.
#[derive(Default)]
pub(super) struct FoundParts<'d> {
    pub(super) down: Option<(String, TensorView<'d>)>,
    pub(super) up: Option<(String, TensorView<'d>)>,
    pub(super) alpha: Option<(String, TensorView<'d>)>,
    pub(super) format: Option<AdapterFormat>,
}

pub(super) struct ValidLayer {
    pub(super) module: String,
    pub(super) down: Vec<f32>,
    pub(super) down_shape: (usize, usize),
    pub(super) up: Vec<f32>,
    pub(super) up_shape: (usize, usize),
    pub(super) rank: usize,
    pub(super) alpha: f64,
    pub(super) scale: f64,
}

pub(super) struct ParsedAdapter {
    pub(super) metadata: AdapterMetadata,
    pub(super) layers: Vec<ValidLayer>,
}

/// Everything that can be wrong with a file is found here, before any device tensor exists.
pub(super) fn parse_and_validate(
    bytes: &[u8],
    targets: &LoraTargets,
) -> std::result::Result<ParsedAdapter, String> {
    let not_safetensors = |e: safetensors::SafeTensorError| {
        format!("not a valid safetensors file (truncated or corrupt?): {e}")
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(not_safetensors)?;
    let file = SafeTensors::deserialize(bytes).map_err(not_safetensors)?;
    let header: HashMap<String, String> = header.metadata().clone().unwrap_or_default();

    let mut keys: Vec<&str> = file.names();
    keys.sort_unstable();
    if keys.is_empty() {
        return Err("no LoRA keys: the file holds no tensors".to_string());
    }

    let mut text_encoder_keys = Vec::new();
    let mut dora_keys = Vec::new();
    let mut unrecognized = Vec::new();
    let mut by_path: BTreeMap<String, FoundParts> = BTreeMap::new();
    let mut by_kohya: BTreeMap<String, FoundParts> = BTreeMap::new();
    for &key in &keys {
        let (module, part, format) = match classify_key(key) {
            KeyClass::Lora {
                module,
                part,
                format,
            } => (module, part, format),
            KeyClass::TextEncoder => {
                text_encoder_keys.push(key);
                continue;
            }
            KeyClass::Dora => {
                dora_keys.push(key);
                continue;
            }
            KeyClass::Unrecognized => {
                unrecognized.push(key);
                continue;
            }
        };
        let view = file
            .tensor(key)
            .map_err(|e| format!("tensor `{key}` cannot be read: {e}"))?;
        let parts = match &module {
            ModuleRef::Path(path) => by_path.entry(path.clone()).or_default(),
            ModuleRef::Kohya(name) => by_kohya.entry(name.clone()).or_default(),
        };
        let slot = match part {
            Part::Down => &mut parts.down,
            Part::Up => &mut parts.up,
            Part::Alpha => &mut parts.alpha,
        };
        if let Some((previous, _)) = slot {
            return Err(format!(
                "keys `{previous}` and `{key}` give the same weight twice"
            ));
        }
        *slot = Some((key.to_string(), view));
        if parts.format.is_none() {
            parts.format = format;
        }
    }

    if let Some(key) = text_encoder_keys.first() {
        return Err(format!(
            "holds text-encoder LoRA weights (e.g. `{key}`, {} such keys); only UNet adapters \
             are supported",
            text_encoder_keys.len()
        ));
    }
    if let Some(key) = dora_keys.first() {
        return Err(format!(
            "holds DoRA weights (e.g. `{key}`); DoRA adapters are not supported"
        ));
    }
    if by_path.is_empty() && by_kohya.is_empty() {
        return Err(format!(
            "no LoRA keys (expected e.g. `unet.<module>.lora_A.weight`); found {} tensors such as `{}`",
            keys.len(),
            keys[0]
        ));
    }
    if let Some(key) = unrecognized.first() {
        return Err(format!(
            "unrecognized key `{key}` ({} such keys); expected LoRA weights like \
             `unet.<module>.lora_A.weight`",
            unrecognized.len()
        ));
    }

    // Kohya names lost the dots; the targets say where they were.
    let mut kohya_index: HashMap<String, Vec<&str>> = HashMap::new();
    if !by_kohya.is_empty() {
        for module in targets.modules.keys() {
            kohya_index
                .entry(module.replace('.', "_"))
                .or_default()
                .push(module);
        }
    }
    for (name, parts) in by_kohya {
        let first_key = [&parts.down, &parts.up, &parts.alpha]
            .into_iter()
            .flatten()
            .map(|(key, _)| key.clone())
            .next()
            .unwrap_or_default();
        let module = match kohya_index.get(&name).map(Vec::as_slice) {
            Some([module]) => module.to_string(),
            Some(candidates) => {
                return Err(format!(
                "key `{first_key}`: kohya name `{name}` is ambiguous among modules {candidates:?}"
            ))
            }
            None => {
                return Err(format!(
                    "key `{first_key}`: kohya module `lora_unet_{name}` is not a LoRA target of \
                     the loaded UNet"
                ))
            }
        };
        if let Some(other) = by_path.get(&module) {
            let other_key = [&other.down, &other.up, &other.alpha]
                .into_iter()
                .flatten()
                .map(|(key, _)| key.clone())
                .next()
                .unwrap_or_default();
            return Err(format!(
                "keys `{first_key}` and `{other_key}` both adapt module `{module}`"
            ));
        }
        by_path.insert(module, parts);
    }

    let config = match header.get(LORA_ADAPTER_METADATA_KEY) {
        Some(json) => parse_peft_config(json)?,
        None => PeftConfig::default(),
    };

    let mut layers = Vec::with_capacity(by_path.len());
    let mut format = None;
    for (module, parts) in by_path {
        let layer = validate_layer(&module, parts.down, parts.up, parts.alpha, targets, &config)?;
        format = format.or(parts.format);
        layers.push(layer);
    }

    let base_fingerprint = header
        .get(BASE_FINGERPRINT_KEY)
        .filter(|f| !f.is_empty())
        .cloned();
    if let (Some(ours), Some(base)) = (&base_fingerprint, &targets.fingerprint) {
        if !base.is_empty() && ours != base {
            return Err(format!(
                "was trained on base model `{ours}` (metadata `{BASE_FINGERPRINT_KEY}`) but the \
                 loaded base is `{base}`"
            ));
        }
    }
    let json_field = |key: &str| -> std::result::Result<Option<Value>, String> {
        header
            .get(key)
            .map(|text| {
                serde_json::from_str(text)
                    .map_err(|e| format!("metadata `{key}` is not valid JSON: {e}"))
            })
            .transpose()
    };

    let rank = config
        .r
        .or_else(|| most_common(layers.iter().map(|l| l.rank)))
        .unwrap_or(1);
    let alpha = config.lora_alpha.unwrap_or_else(|| {
        most_common(layers.iter().map(|l| l.alpha.to_bits()))
            .map(f64::from_bits)
            .unwrap_or(rank as f64)
    });
    let target_modules = config.target_modules.unwrap_or_else(|| {
        derive_target_modules(layers.iter().map(|l| l.module.as_str()))
            .into_iter()
            .collect()
    });
    let metadata = AdapterMetadata {
        rank,
        alpha,
        target_modules,
        base_fingerprint,
        created: header.get(CREATED_KEY).cloned(),
        training_config: json_field(TRAINING_CONFIG_KEY)?,
        reward_summary: json_field(REWARD_SUMMARY_KEY)?,
        format: format.unwrap_or(AdapterFormat::DiffusersPeft),
    };
    Ok(ParsedAdapter { metadata, layers })
}

pub(super) fn validate_layer(
    module: &str,
    down: Option<(String, TensorView)>,
    up: Option<(String, TensorView)>,
    alpha: Option<(String, TensorView)>,
    targets: &LoraTargets,
    config: &PeftConfig,
) -> std::result::Result<ValidLayer, String> {
    let (down_key, down_view, up_key, up_view) = match (down, up) {
        (Some((dk, dv)), Some((uk, uv))) => (dk, dv, uk, uv),
        (Some((key, _)), None) => {
            return Err(format!(
                "key `{key}` is the down (A) weight of module `{module}` but its up (B) weight is missing"
            ))
        }
        (None, Some((key, _))) => {
            return Err(format!(
                "key `{key}` is the up (B) weight of module `{module}` but its down (A) weight is missing"
            ))
        }
        (None, None) => {
            let key = alpha.map(|(key, _)| key).unwrap_or_default();
            return Err(format!("key `{key}` gives an alpha for module `{module}`, which has no LoRA weights"));
        }
    };
    let &(in_features, out_features) = targets.modules.get(module).ok_or_else(|| {
        format!("key `{down_key}`: module `{module}` is not a LoRA target of the loaded UNet")
    })?;

    let down_shape = matrix_shape(&down_view).ok_or_else(|| {
        format!(
            "tensor `{down_key}` has shape {:?}; expected a matrix",
            down_view.shape()
        )
    })?;
    let up_shape = matrix_shape(&up_view).ok_or_else(|| {
        format!(
            "tensor `{up_key}` has shape {:?}; expected a matrix",
            up_view.shape()
        )
    })?;
    let rank = down_shape.0;
    if rank == 0 || down_shape.1 != in_features {
        return Err(format!(
            "tensor `{down_key}` has shape {:?}, but module `{module}` takes {in_features} input \
             features: down (A) must be (rank, {in_features})",
            down_view.shape()
        ));
    }
    if up_shape.0 != out_features {
        return Err(format!(
            "tensor `{up_key}` has shape {:?}, but module `{module}` gives {out_features} output \
             features: up (B) must be ({out_features}, rank)",
            up_view.shape()
        ));
    }
    if up_shape.1 != rank {
        return Err(format!(
            "module `{module}`: `{down_key}` has rank {rank} but `{up_key}` has rank {}",
            up_shape.1
        ));
    }
    if let Some(expected) = lookup_pattern(&config.rank_pattern, module).or(config.r) {
        if expected != rank {
            return Err(format!(
                "module `{module}`: metadata `{LORA_ADAPTER_METADATA_KEY}` says rank {expected} but \
                 `{down_key}` has rank {rank}"
            ));
        }
    }

    let layer_alpha = match alpha {
        Some((key, view)) => {
            let values = to_f32_values(&key, &view)?;
            match values.as_slice() {
                [value] if value.is_finite() => *value as f64,
                [value] => return Err(format!("tensor `{key}` holds a non-finite alpha {value}")),
                _ => {
                    return Err(format!(
                        "tensor `{key}` has shape {:?}; an alpha must be a scalar",
                        view.shape()
                    ))
                }
            }
        }
        None => lookup_pattern(&config.alpha_pattern, module)
            .or(config.lora_alpha)
            .unwrap_or(rank as f64),
    };
    let scale = if config.use_rslora {
        layer_alpha / (rank as f64).sqrt()
    } else {
        layer_alpha / rank as f64
    };

    let down = to_f32_values(&down_key, &down_view)?;
    let up = to_f32_values(&up_key, &up_view)?;
    for (key, values) in [(&down_key, &down), (&up_key, &up)] {
        if let Some(index) = values.iter().position(|v| !v.is_finite()) {
            return Err(format!(
                "tensor `{key}` holds a non-finite value ({}) at flat index {index}",
                values[index]
            ));
        }
    }
    Ok(ValidLayer {
        module: module.to_string(),
        down,
        down_shape,
        up,
        up_shape,
        rank,
        alpha: layer_alpha,
        scale,
    })
}

/// (rows, cols) of a weight matrix; kohya stores 1x1-conv LoRA weights as (r, in, 1, 1).
pub(super) fn matrix_shape(view: &TensorView) -> Option<(usize, usize)> {
    match *view.shape() {
        [rows, cols] => Some((rows, cols)),
        [rows, cols, 1, 1] => Some((rows, cols)),
        _ => None,
    }
}

pub(super) fn to_f32_values(key: &str, view: &TensorView) -> std::result::Result<Vec<f32>, String> {
    let data = view.data();
    let values = match view.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]) as f32)
            .collect(),
        other => {
            return Err(format!(
                "tensor `{key}` has dtype {other:?}; expected a float type"
            ))
        }
    };
    Ok(values)
}
