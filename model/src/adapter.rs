//! LoRA adapter files for the UNet: reading the spellings found in the wild, validating them
//! against the loaded base before anything is kept, and writing diffusers' own format.
//!
//! This is bookkeeping only; the UNet applies `W x + scale * B (A x)` in its linear layers.
//! The file format is described in `docs/architecture.md`, "Adapter files".

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// Safetensors metadata key under which diffusers stores the PEFT `LoraConfig` as JSON.
pub const LORA_ADAPTER_METADATA_KEY: &str = "lora_adapter_metadata";
/// Our own safetensors metadata keys (strings; the last two hold JSON).
pub const BASE_FINGERPRINT_KEY: &str = "rl4pix.base_fingerprint";
pub const CREATED_KEY: &str = "rl4pix.created";
pub const TRAINING_CONFIG_KEY: &str = "rl4pix.training_config";
pub const REWARD_SUMMARY_KEY: &str = "rl4pix.reward_summary";

/// One adapted projection: `W x + scale * up (down x)`.
#[derive(Debug, Clone)]
pub struct LoraLayer {
    /// A: (rank, in_features).
    pub down: Tensor,
    /// B: (out_features, rank).
    pub up: Tensor,
    /// alpha / rank for this layer (alpha / sqrt(rank) for rsLoRA files).
    pub scale: f64,
}

impl LoraLayer {
    pub fn rank(&self) -> usize {
        self.down.dims().first().copied().unwrap_or(0)
    }
}

/// The key spelling a file was read from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdapterFormat {
    /// `unet.<path>.lora_A.weight` / `lora_B.weight` (what diffusers writes today, and what we write).
    DiffusersPeft,
    /// `<path>.lora.down.weight` / `lora.up.weight` (or `lora_down` / `lora_up`).
    DiffusersLegacy,
    /// `<attn path>.processor.to_q_lora.down.weight` (diffusers' old attention processors).
    AttnProcessor,
    /// `lora_unet_<path with '_'>.lora_down.weight` with per-layer `.alpha`.
    Kohya,
}

#[derive(Debug, Clone, PartialEq)]
pub struct AdapterMetadata {
    /// The most common rank (PEFT's `r`); layers may differ (`LoraLayer::rank`).
    pub rank: usize,
    /// The most common alpha (PEFT's `lora_alpha`); per-layer truth is `LoraLayer::scale`.
    pub alpha: f64,
    /// PEFT target module names, e.g. `["to_k", "to_out.0", "to_q", "to_v"]`.
    pub target_modules: Vec<String>,
    pub base_fingerprint: Option<String>,
    pub created: Option<String>,
    pub training_config: Option<Value>,
    pub reward_summary: Option<Value>,
    pub format: AdapterFormat,
}

impl AdapterMetadata {
    /// Metadata for a freshly created adapter (written as diffusers' format).
    pub fn new(rank: usize, alpha: f64, target_modules: Vec<String>) -> Self {
        Self {
            rank,
            alpha,
            target_modules,
            base_fingerprint: None,
            created: None,
            training_config: None,
            reward_summary: None,
            format: AdapterFormat::DiffusersPeft,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LoraAdapter {
    pub name: String,
    pub metadata: AdapterMetadata,
    /// Keyed by diffusers UNet module path without prefix, e.g.
    /// `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub layers: BTreeMap<String, LoraLayer>,
}

/// What the loaded base UNet offers: module path -> (in_features, out_features) for every
/// LoRA-capable projection, plus the base's fingerprint.
#[derive(Debug, Clone, Default)]
pub struct LoraTargets {
    pub modules: BTreeMap<String, (usize, usize)>,
    pub fingerprint: Option<String>,
}

impl LoraAdapter {
    /// Parses any supported spelling and validates it completely against `targets` before any
    /// tensor is created, so a bad file never half-loads.
    pub fn from_bytes(
        name: &str,
        bytes: &[u8],
        targets: &LoraTargets,
        device: &Device,
    ) -> Result<Self> {
        let refuse = |reason: String| ModelError::Adapter {
            name: name.to_string(),
            reason,
        };
        let parsed = parse_and_validate(bytes, targets).map_err(refuse)?;
        let mut layers = BTreeMap::new();
        for layer in parsed.layers {
            let down = Tensor::from_vec(layer.down, layer.down_shape, device)?;
            let up = Tensor::from_vec(layer.up, layer.up_shape, device)?;
            layers.insert(
                layer.module,
                LoraLayer {
                    down,
                    up,
                    scale: layer.scale,
                },
            );
        }
        Ok(Self {
            name: name.to_string(),
            metadata: parsed.metadata,
            layers,
        })
    }

    /// Reads an adapter file; its name is the file stem.
    pub fn load(path: &Path, targets: &LoraTargets, device: &Device) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                ModelError::MissingFile {
                    path: path.to_path_buf(),
                }
            } else {
                ModelError::Io {
                    path: path.to_path_buf(),
                    cause: source,
                }
            }
        })?;
        let name = path
            .file_stem()
            .map(|stem| stem.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self::from_bytes(&name, &bytes, targets, device)
    }

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
        static SAVE_COUNTER: AtomicU64 = AtomicU64::new(0);
        let bytes = self.to_bytes()?;
        let file_name = path.file_name().ok_or_else(|| {
            ModelError::InvalidArgument(format!("adapter path {} has no file name", path.display()))
        })?;
        let dir = match path.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let tmp = dir.join(format!(
            ".{}.{}-{}.tmp",
            file_name.to_string_lossy(),
            std::process::id(),
            SAVE_COUNTER.fetch_add(1, Ordering::Relaxed)
        ));
        let io_error = |path: &Path, source| ModelError::Io {
            path: path.to_path_buf(),
            cause: source,
        };
        let written = (|| {
            use std::io::Write;
            let mut file = std::fs::File::create(&tmp)?;
            file.write_all(&bytes)?;
            file.sync_all()
        })();
        if let Err(source) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_error(&tmp, source));
        }
        if let Err(source) = std::fs::rename(&tmp, path) {
            let _ = std::fs::remove_file(&tmp);
            return Err(io_error(path, source));
        }
        Ok(())
    }

    /// Number of A and B entries.
    pub fn num_parameters(&self) -> usize {
        self.layers
            .values()
            .map(|layer| layer.down.elem_count() + layer.up.elem_count())
            .sum()
    }

    /// Memory the A and B tensors occupy as held (f32 after loading).
    pub fn size_bytes(&self) -> usize {
        self.layers
            .values()
            .map(|layer| {
                layer.down.elem_count() * layer.down.dtype().size_in_bytes()
                    + layer.up.elem_count() * layer.up.dtype().size_in_bytes()
            })
            .sum()
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
fn json_number(value: f64) -> std::result::Result<Value, String> {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        Ok(Value::from(value as i64))
    } else {
        serde_json::Number::from_f64(value)
            .map(Value::Number)
            .ok_or_else(|| format!("alpha {value} is not finite"))
    }
}

/// Sorts object keys recursively (serde_json keeps insertion order when `preserve_order` is on).
fn sorted_json(value: Value) -> Value {
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

/// PEFT-style short names (`to_q`, `to_out.0`): what follows the attention module, or the last
/// component (with its parent when the last one is an index).
fn derive_target_modules<'a>(modules: impl Iterator<Item = &'a str>) -> BTreeSet<String> {
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

fn most_common<T: Ord + Copy>(values: impl Iterator<Item = T>) -> Option<T> {
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

// ---------------------------------------------------------------------------------------------
// Reading

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Down,
    Up,
    Alpha,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum ModuleRef {
    /// A dotted diffusers path (prefix already stripped).
    Path(String),
    /// A kohya name: the path with every '.' replaced by '_', resolved against the targets.
    Kohya(String),
}

#[derive(Debug, PartialEq, Eq)]
enum KeyClass {
    Lora {
        module: ModuleRef,
        part: Part,
        /// `None` for `.alpha`, which every spelling shares.
        format: Option<AdapterFormat>,
    },
    TextEncoder,
    Dora,
    Unrecognized,
}

fn classify_key(key: &str) -> KeyClass {
    if key.starts_with("text_encoder") || key.starts_with("lora_te") {
        return KeyClass::TextEncoder;
    }
    if key.contains("lora_magnitude_vector") || key.ends_with(".dora_scale") {
        return KeyClass::Dora;
    }
    if let Some(rest) = key.strip_prefix("lora_unet_") {
        let Some((name, suffix)) = rest.split_once('.') else {
            return KeyClass::Unrecognized;
        };
        let part = match suffix {
            "lora_down.weight" => Part::Down,
            "lora_up.weight" => Part::Up,
            "alpha" => Part::Alpha,
            _ => return KeyClass::Unrecognized,
        };
        let format = (part != Part::Alpha).then_some(AdapterFormat::Kohya);
        return KeyClass::Lora {
            module: ModuleRef::Kohya(name.to_string()),
            part,
            format,
        };
    }

    let path = key.strip_prefix("base_model.model.").unwrap_or(key);
    let path = path.strip_prefix("unet.").unwrap_or(path);

    if let Some((owner, tail)) = path.split_once(".processor.") {
        let Some((projection, rest)) = tail.split_once("_lora.") else {
            return KeyClass::Unrecognized;
        };
        let module = match projection {
            "to_q" | "to_k" | "to_v" => format!("{owner}.{projection}"),
            "to_out" => format!("{owner}.to_out.0"),
            _ => return KeyClass::Unrecognized,
        };
        let part = match rest {
            "down.weight" => Part::Down,
            "up.weight" => Part::Up,
            _ => return KeyClass::Unrecognized,
        };
        return KeyClass::Lora {
            module: ModuleRef::Path(module),
            part,
            format: Some(AdapterFormat::AttnProcessor),
        };
    }

    const SUFFIXES: [(&str, Part, Option<AdapterFormat>); 7] = [
        (
            ".lora_A.weight",
            Part::Down,
            Some(AdapterFormat::DiffusersPeft),
        ),
        (
            ".lora_B.weight",
            Part::Up,
            Some(AdapterFormat::DiffusersPeft),
        ),
        (
            ".lora.down.weight",
            Part::Down,
            Some(AdapterFormat::DiffusersLegacy),
        ),
        (
            ".lora.up.weight",
            Part::Up,
            Some(AdapterFormat::DiffusersLegacy),
        ),
        (
            ".lora_down.weight",
            Part::Down,
            Some(AdapterFormat::DiffusersLegacy),
        ),
        (
            ".lora_up.weight",
            Part::Up,
            Some(AdapterFormat::DiffusersLegacy),
        ),
        (".alpha", Part::Alpha, None),
    ];
    for (suffix, part, format) in SUFFIXES {
        if let Some(module) = path.strip_suffix(suffix) {
            if module.is_empty() {
                return KeyClass::Unrecognized;
            }
            return KeyClass::Lora {
                module: ModuleRef::Path(module.to_string()),
                part,
                format,
            };
        }
    }
    KeyClass::Unrecognized
}

/// The fields of a PEFT `LoraConfig` that decide ranks and scales.
#[derive(Debug, Default)]
struct PeftConfig {
    r: Option<usize>,
    lora_alpha: Option<f64>,
    target_modules: Option<Vec<String>>,
    rank_pattern: Vec<(PatternMatcher, usize)>,
    alpha_pattern: Vec<(PatternMatcher, f64)>,
    use_rslora: bool,
}

/// PEFT matches a pattern key `k` against a module name with `(.*\.)?(k)$`.
#[derive(Debug)]
enum PatternMatcher {
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

fn lookup_pattern<T: Copy>(patterns: &[(PatternMatcher, T)], module: &str) -> Option<T> {
    patterns
        .iter()
        .find(|(matcher, _)| matcher.matches(module))
        .map(|&(_, value)| value)
}

/// Reads `lora_adapter_metadata`. Fields are `unet.`-prefixed when written by a pipeline's
/// `save_lora_weights` and bare when written by the model's `save_lora_adapter`.
fn parse_peft_config(json: &str) -> std::result::Result<PeftConfig, String> {
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

/// Tensors found for one module, before validation.
#[derive(Default)]
struct FoundParts<'d> {
    down: Option<(String, TensorView<'d>)>,
    up: Option<(String, TensorView<'d>)>,
    alpha: Option<(String, TensorView<'d>)>,
    format: Option<AdapterFormat>,
}

struct ValidLayer {
    module: String,
    down: Vec<f32>,
    down_shape: (usize, usize),
    up: Vec<f32>,
    up_shape: (usize, usize),
    rank: usize,
    alpha: f64,
    scale: f64,
}

struct ParsedAdapter {
    metadata: AdapterMetadata,
    layers: Vec<ValidLayer>,
}

/// Everything that can be wrong with a file is found here, before any device tensor exists.
fn parse_and_validate(
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

fn validate_layer(
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
fn matrix_shape(view: &TensorView) -> Option<(usize, usize)> {
    match *view.shape() {
        [rows, cols] => Some((rows, cols)),
        [rows, cols, 1, 1] => Some((rows, cols)),
        _ => None,
    }
}

fn to_f32_values(key: &str, view: &TensorView) -> std::result::Result<Vec<f32>, String> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn lora(module: &str, part: Part, format: Option<AdapterFormat>) -> KeyClass {
        KeyClass::Lora {
            module: ModuleRef::Path(module.to_string()),
            part,
            format,
        }
    }

    #[test]
    fn classifies_every_spelling() {
        let attn = "down_blocks.0.attentions.0.transformer_blocks.0.attn1";
        let q = format!("{attn}.to_q");
        let peft = Some(AdapterFormat::DiffusersPeft);
        let legacy = Some(AdapterFormat::DiffusersLegacy);
        assert_eq!(
            classify_key(&format!("unet.{q}.lora_A.weight")),
            lora(&q, Part::Down, peft)
        );
        assert_eq!(
            classify_key(&format!("{q}.lora_B.weight")),
            lora(&q, Part::Up, peft)
        );
        assert_eq!(
            classify_key(&format!("base_model.model.{q}.lora_A.weight")),
            lora(&q, Part::Down, peft)
        );
        assert_eq!(
            classify_key(&format!("unet.{q}.lora.down.weight")),
            lora(&q, Part::Down, legacy)
        );
        assert_eq!(
            classify_key(&format!("{q}.lora_up.weight")),
            lora(&q, Part::Up, legacy)
        );
        assert_eq!(
            classify_key(&format!("unet.{q}.alpha")),
            lora(&q, Part::Alpha, None)
        );
        assert_eq!(
            classify_key(&format!("unet.{attn}.processor.to_out_lora.up.weight")),
            lora(
                &format!("{attn}.to_out.0"),
                Part::Up,
                Some(AdapterFormat::AttnProcessor)
            )
        );
        assert_eq!(
            classify_key("lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"),
            KeyClass::Lora {
                module: ModuleRef::Kohya("mid_block_attentions_0_proj_in".to_string()),
                part: Part::Down,
                format: Some(AdapterFormat::Kohya),
            }
        );
        assert_eq!(
            classify_key("text_encoder.text_model.x.lora_A.weight"),
            KeyClass::TextEncoder
        );
        assert_eq!(
            classify_key("lora_te1_text_model_x.lora_down.weight"),
            KeyClass::TextEncoder
        );
        assert_eq!(
            classify_key(&format!("unet.{q}.lora_magnitude_vector")),
            KeyClass::Dora
        );
        assert_eq!(
            classify_key(&format!("unet.{q}.weight")),
            KeyClass::Unrecognized
        );
        assert_eq!(
            classify_key(&format!("unet.{q}.lora_B.bias")),
            KeyClass::Unrecognized
        );
    }

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
