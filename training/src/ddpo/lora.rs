//! Trainable LoRA on the UNet's attention projections: A and B are candle `Var`s (the base stays
//! frozen), turned into a `ResolvedAdapter` for every forward pass so gradients reach them through
//! the model's own LoRA path, and exported as a diffusers-format adapter file.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor, Var};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use rl4pix_model::adapter::{AdapterMetadata, LoraAdapter, LoraLayer};
use rl4pix_model::lora::{LoraDelta, ResolvedAdapter};
use rl4pix_model::pipeline::InstructPix2Pix;

use super::{DdpoError, Result};

/// One adapted projection.
pub struct TrainableLayer {
    /// Module path, e.g. `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`.
    pub path: String,
    /// Its slot in the UNet's projection table.
    pub slot: usize,
    /// A: (rank, in).
    pub down: Var,
    /// B: (out, rank).
    pub up: Var,
}

pub struct TrainableLora {
    pub layers: Vec<TrainableLayer>,
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    num_slots: usize,
}

impl TrainableLora {
    /// A ~ N(0, (1/rank)^2) (diffusers' and PEFT's Gaussian init), B = 0, on every projection whose
    /// name is one of `target_modules` (`to_q`, `to_k`, `to_v`, `to_out.0`).
    pub fn new(
        pipeline: &InstructPix2Pix,
        rank: usize,
        alpha: f64,
        target_modules: &[String],
        rng: &mut ChaCha8Rng,
    ) -> Result<Self> {
        let table = pipeline.unet.projections();
        let device = pipeline.device();
        let dtype = pipeline.dtype();
        let normal = Normal::new(0.0f32, 1.0 / rank as f32).map_err(|e| DdpoError::Config {
            key: "lora.rank".into(),
            message: e.to_string(),
        })?;
        let mut layers = Vec::new();
        for (slot, entry) in table.entries.iter().enumerate() {
            let targeted = target_modules
                .iter()
                .any(|m| entry.path.ends_with(&format!(".{m}")));
            if !targeted {
                continue;
            }
            let a: Vec<f32> = (0..rank * entry.in_features)
                .map(|_| normal.sample(rng))
                .collect();
            let down = Tensor::from_vec(a, (rank, entry.in_features), &Device::Cpu)?
                .to_dtype(dtype)?
                .to_device(device)?;
            let up = Tensor::zeros((entry.out_features, rank), dtype, device)?;
            layers.push(TrainableLayer {
                path: entry.path.clone(),
                slot,
                down: Var::from_tensor(&down)?,
                up: Var::from_tensor(&up)?,
            });
        }
        if layers.is_empty() {
            return Err(DdpoError::Config {
                key: "lora.target_modules".into(),
                message: format!("{target_modules:?} match no projection of this UNet"),
            });
        }
        Ok(Self {
            layers,
            rank,
            alpha,
            target_modules: target_modules.to_vec(),
            num_slots: table.entries.len(),
        })
    }

    /// alpha / rank.
    pub fn scale(&self) -> f64 {
        self.alpha / self.rank as f64
    }

    /// The adapter for a forward pass that gradients flow through (rebuild after every update:
    /// it holds prepared copies of A and B).
    pub fn resolved(&self) -> Result<Arc<ResolvedAdapter>> {
        self.build(|v| v.as_tensor().clone())
    }

    /// The same without an autograd graph, for sampling.
    pub fn resolved_detached(&self) -> Result<Arc<ResolvedAdapter>> {
        self.build(|v| v.as_tensor().detach())
    }

    fn build(&self, get: impl Fn(&Var) -> Tensor) -> Result<Arc<ResolvedAdapter>> {
        let mut deltas = vec![None; self.num_slots];
        for layer in &self.layers {
            deltas[layer.slot] = Some(LoraDelta::new(
                &get(&layer.down),
                &get(&layer.up),
                self.scale(),
            )?);
        }
        Ok(Arc::new(ResolvedAdapter {
            name: "ddpo".into(),
            deltas,
        }))
    }

    /// (name, var) pairs in a fixed order: `<path>.lora_A`, `<path>.lora_B`.
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        self.layers
            .iter()
            .flat_map(|l| {
                [
                    (format!("{}.lora_A", l.path), l.down.clone()),
                    (format!("{}.lora_B", l.path), l.up.clone()),
                ]
            })
            .collect()
    }

    pub fn tensors(&self) -> HashMap<String, Tensor> {
        self.named_vars()
            .into_iter()
            .map(|(name, var)| (name, var.as_tensor().detach()))
            .collect()
    }

    /// Restores A and B saved by [`TrainableLora::tensors`]; every layer must be there, shaped.
    pub fn load_tensors(&self, saved: &HashMap<String, Tensor>) -> Result<()> {
        if saved.len() != 2 * self.layers.len() {
            return Err(DdpoError::Checkpoint {
                path: Default::default(),
                message: format!(
                    "the checkpoint holds {} LoRA tensors, this run has {} (another rank, target set or base?)",
                    saved.len(),
                    2 * self.layers.len()
                ),
            });
        }
        for (name, var) in self.named_vars() {
            let tensor = saved.get(&name).ok_or_else(|| DdpoError::Checkpoint {
                path: Default::default(),
                message: format!("no LoRA tensor `{name}`"),
            })?;
            if tensor.dims() != var.dims() {
                return Err(DdpoError::Checkpoint {
                    path: Default::default(),
                    message: format!(
                        "LoRA tensor `{name}` is {:?}, this run needs {:?}",
                        tensor.dims(),
                        var.dims()
                    ),
                });
            }
            var.set(&tensor.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        Ok(())
    }

    /// The adapter as a file-ready `LoraAdapter` (f32), with diffusers' metadata and ours.
    pub fn to_adapter(
        &self,
        name: &str,
        base_fingerprint: &str,
        training_config: serde_json::Value,
        reward_summary: serde_json::Value,
    ) -> Result<LoraAdapter> {
        let mut layers = std::collections::BTreeMap::new();
        for l in &self.layers {
            layers.insert(
                l.path.clone(),
                LoraLayer {
                    down: l.down.as_tensor().detach().to_dtype(DType::F32)?,
                    up: l.up.as_tensor().detach().to_dtype(DType::F32)?,
                    scale: self.scale(),
                },
            );
        }
        let mut metadata = AdapterMetadata::new(self.rank, self.alpha, self.target_modules.clone());
        metadata.base_fingerprint = Some(base_fingerprint.to_string());
        metadata.training_config = Some(training_config);
        metadata.reward_summary = Some(reward_summary);
        metadata.created = Some(utc_now_rfc3339());
        Ok(LoraAdapter {
            name: name.to_string(),
            metadata,
            layers,
        })
    }
}

/// The current UTC time as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn utc_now_rfc3339() -> String {
    chrono::DateTime::<chrono::Utc>::from(std::time::SystemTime::now())
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}
