//! LoRA adapter files for the UNet: reading the spellings found in the wild, validating them
//! against the loaded base before anything is kept, and writing diffusers' own format.
//!
//! This is bookkeeping only; the UNet applies `W x + scale * B (A x)` in its linear layers.
//! The file format is described in `docs/architecture.md`, "Adapter files".
//!
//! [`keys`] names the tensor-key spellings (diffusers PEFT and legacy, kohya), [`peft_config`]
//! reads PEFT's `LoraConfig` metadata, [`validate`] checks a file against the base, [`writer`]
//! writes diffusers' format.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde_json::Value;

use crate::error::{ModelError, Result};

mod keys;
mod peft_config;
mod validate;
mod writer;

use validate::parse_and_validate;

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
}
