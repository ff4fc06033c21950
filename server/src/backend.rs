//! The one narrow seam between the server and the model: a backend describes itself, runs a
//! batch and lends a loader for adapter files. The worker thread owns the only instance; everything it hands back is plain data
//! on the CPU, so no tensor or device handle leaks into the HTTP layer.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::DType;
use image::RgbImage;
use rl4pix_model::adapter::{LoraAdapter, LoraTargets};
use rl4pix_model::lora::ResolvedAdapter;
use rl4pix_model::pipeline::{AttentionMaps, EditParams, EditRequest, InstructPix2Pix};
use rl4pix_model::scheduler::{Scheduler, SchedulerKind};
use rl4pix_model::ModelError;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// `on_step` asked to stop (every request of the batch was abandoned).
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Model(ModelError),
}

impl From<ModelError> for BackendError {
    fn from(e: ModelError) -> Self {
        match e {
            ModelError::Cancelled => Self::Cancelled,
            other => Self::Model(other),
        }
    }
}

/// One edit of a batch.
#[derive(Debug, Clone)]
pub struct BatchItem {
    pub image: Arc<RgbImage>,
    pub instruction: String,
    pub params: EditParams,
}

/// Requests that share the VAE grid, steps, scheduler, eta and adapter.
#[derive(Debug, Clone)]
pub struct Batch {
    pub items: Vec<BatchItem>,
    pub adapter: Option<Arc<ResolvedAdapter>>,
}

/// The instruction's cross-attention, reduced to what `/attention` serves.
#[derive(Debug, Clone)]
pub struct AttentionSummary {
    /// Latent grid of the maps (row-major `height x width`).
    pub height: usize,
    pub width: usize,
    /// Mean over the instruction's own tokens.
    pub instruction_map: Vec<f32>,
    pub words: Vec<WordAttention>,
}

#[derive(Debug, Clone)]
pub struct WordAttention {
    pub word: String,
    /// Token positions in the padded prompt (BOS is position 0).
    pub tokens: Range<usize>,
    pub map: Vec<f32>,
}

pub struct ItemOutput {
    pub image: RgbImage,
    pub attention: Option<AttentionSummary>,
}

/// What `/info` shows about the loaded model.
#[derive(Debug, Clone)]
pub struct BackendInfo {
    /// The model folder's name.
    pub model: String,
    /// The folder as given (logged at start; never shown to clients).
    pub model_dir: String,
    pub device: String,
    pub dtype: String,
    /// Pixels per latent cell; a batch shares the image size rounded down to this grid.
    pub vae_scale_factor: usize,
    pub default_scheduler: String,
    /// Guidance a request gets when it names none: the model's own (`model_index.json` →
    /// `rl4pix.sampling`), else InstructPix2Pix's 7.5 / 1.5.
    pub default_guidance_scale: f64,
    pub default_image_guidance_scale: f64,
    /// LoRA-capable projections of the UNet.
    pub lora_targets: usize,
    pub base_fingerprint: String,
    /// The most denoising steps every scheduler of this model accepts.
    pub max_steps: usize,
    /// The side the model was trained at (`model_index.json`), if it records one.
    pub working_size: Option<u32>,
}

/// A validated adapter, resolved against the loaded base.
#[derive(Debug, Clone)]
pub struct LoadedAdapter {
    pub name: String,
    pub resolved: Arc<ResolvedAdapter>,
    pub rank: usize,
    pub alpha: f64,
    pub target_modules: Vec<String>,
    pub base_fingerprint: Option<String>,
    pub created: Option<String>,
    pub file_bytes: u64,
    /// What its A and B matrices occupy on the device, in the model's dtype.
    pub memory_bytes: u64,
}

/// Validates adapter files against the loaded base from any thread (the folder watcher, admin
/// uploads, reloads after least-recently-used unloading) while the worker keeps running batches.
pub trait AdapterLoader: Send + Sync {
    /// `bytes` is a whole `.safetensors` file; `name` its adapter name. Refuses it whole or not
    /// at all: parse errors, truncation, unknown modules, wrong shapes, another base.
    fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<LoadedAdapter, BackendError>;
}

pub trait Backend: Send + 'static {
    fn info(&self) -> BackendInfo;
    /// Runs one batch; `on_step(step, total)` returning false cancels it at that step.
    fn run_batch(
        &self,
        batch: &Batch,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<ItemOutput>, BackendError>;
    /// A loader the adapter registry may use off the worker thread; None: this backend cannot
    /// load adapters (every adapter file is then refused with that reason).
    fn adapter_loader(&self) -> Option<Arc<dyn AdapterLoader>> {
        None
    }
    /// Whether the backend can still run batches (the worker asks after a batch failed; a
    /// failure turns `/health` and `/ready` red until a later check passes).
    fn health(&self) -> Result<(), BackendError> {
        Ok(())
    }
}

/// The real thing: an InstructPix2Pix pipeline on a Candle device.
pub struct ModelBackend {
    // Shared with the adapter loader, which only reads the UNet's projection table and dtype.
    pipeline: Arc<InstructPix2Pix>,
    info: BackendInfo,
    capture_attention: bool,
}

impl ModelBackend {
    pub fn load(
        dir: &Path,
        device_spec: &str,
        dtype_spec: &str,
        capture_attention: bool,
    ) -> Result<Self, BackendError> {
        let device = rl4pix_model::device::parse_device(device_spec)?;
        let dtype = parse_dtype(dtype_spec)?;
        let pipeline = InstructPix2Pix::load_with_dtype(dir, &device, dtype)?;
        let info = BackendInfo {
            model: model_name(dir),
            model_dir: dir.display().to_string(),
            device: device_spec.to_string(),
            dtype: dtype_spec.to_ascii_lowercase(),
            vae_scale_factor: pipeline.vae_scale_factor(),
            default_scheduler: pipeline.default_scheduler.name().to_string(),
            default_guidance_scale: pipeline.guidance_defaults.guidance_scale,
            default_image_guidance_scale: pipeline.guidance_defaults.image_guidance_scale,
            lora_targets: pipeline.unet.projections().entries.len(),
            base_fingerprint: pipeline.unet.fingerprint().to_string(),
            max_steps: max_supported_steps(&pipeline),
            working_size: crate::working_size::recorded_size(dir),
        };
        Ok(Self {
            pipeline: Arc::new(pipeline),
            info,
            capture_attention,
        })
    }
}

/// Step counts past this make a scheduler's timesteps leave the trained range (e.g.
/// `steps_offset` 1 with 1000 steps); checked once so requests are refused before any work.
fn max_supported_steps(pipeline: &InstructPix2Pix) -> usize {
    let kinds = [SchedulerKind::Ddim, SchedulerKind::EulerAncestral];
    (1..=1000)
        .rev()
        .find(|&steps| {
            kinds
                .iter()
                .all(|&kind| Scheduler::new(kind, &pipeline.scheduler_config, steps, 0.0).is_ok())
        })
        .unwrap_or(1)
}

fn model_name(dir: &Path) -> String {
    let canonical = dir.canonicalize().unwrap_or_else(|_| PathBuf::from(dir));
    canonical
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| dir.display().to_string())
}

fn parse_dtype(spec: &str) -> Result<DType, BackendError> {
    match spec.to_ascii_lowercase().as_str() {
        "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(BackendError::Model(ModelError::InvalidArgument(format!(
            "--dtype must be f32, f16 or bf16, got `{other}`"
        )))),
    }
}

impl Backend for ModelBackend {
    fn info(&self) -> BackendInfo {
        self.info.clone()
    }

    /// A small computation on the model's device, read back: a lost or wedged device fails it.
    fn health(&self) -> Result<(), BackendError> {
        let probe = || -> candle_core::Result<f32> {
            let ones = candle_core::Tensor::ones((4, 4), DType::F32, self.pipeline.device())?;
            ones.matmul(&ones)?.sum_all()?.to_scalar::<f32>()
        };
        match probe() {
            Ok(64.0) => Ok(()),
            Ok(sum) => Err(BackendError::Model(ModelError::InvalidArgument(format!(
                "device check: 4x4 ones squared summed to {sum}, not 64"
            )))),
            Err(e) => Err(BackendError::Model(ModelError::InvalidArgument(format!(
                "device check failed: {e}"
            )))),
        }
    }

    fn run_batch(
        &self,
        batch: &Batch,
        on_step: &mut dyn FnMut(usize, usize) -> bool,
    ) -> Result<Vec<ItemOutput>, BackendError> {
        let requests: Vec<EditRequest> = batch
            .items
            .iter()
            .map(|item| EditRequest {
                image: &item.image,
                instruction: &item.instruction,
                params: EditParams {
                    capture_attention: self.capture_attention,
                    ..item.params.clone()
                },
                init_latents: None,
            })
            .collect();
        let adapters: Vec<_> = batch.adapter.iter().cloned().collect();
        let outputs = self.pipeline.edit_batch(&requests, &adapters, on_step)?;
        outputs
            .into_iter()
            .map(|out| {
                let attention = match out.attention {
                    Some(maps) => Some(summarize(&maps)?),
                    None => None,
                };
                Ok(ItemOutput {
                    image: out.image,
                    attention,
                })
            })
            .collect()
    }

    fn adapter_loader(&self) -> Option<Arc<dyn AdapterLoader>> {
        Some(Arc::new(ModelAdapterLoader::new(self.pipeline.clone())))
    }
}

/// Parses and validates with the model crate (`LoraAdapter::from_bytes`), then resolves the
/// layers onto the UNet's projection slots in the model's dtype.
struct ModelAdapterLoader {
    pipeline: Arc<InstructPix2Pix>,
    targets: LoraTargets,
}

impl ModelAdapterLoader {
    fn new(pipeline: Arc<InstructPix2Pix>) -> Self {
        let targets = pipeline.lora_targets();
        Self { pipeline, targets }
    }
}

impl AdapterLoader for ModelAdapterLoader {
    fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<LoadedAdapter, BackendError> {
        let adapter = LoraAdapter::from_bytes(name, bytes, &self.targets, self.pipeline.device())?;
        let resolved = Arc::new(self.pipeline.resolve_adapter(&adapter)?);
        let memory_bytes =
            (adapter.num_parameters() * self.pipeline.dtype().size_in_bytes()) as u64;
        let meta = adapter.metadata;
        Ok(LoadedAdapter {
            name: adapter.name,
            resolved,
            rank: meta.rank,
            alpha: meta.alpha,
            target_modules: meta.target_modules,
            base_fingerprint: meta.base_fingerprint,
            created: meta.created,
            file_bytes: bytes.len() as u64,
            memory_bytes,
        })
    }
}

fn summarize(maps: &AttentionMaps) -> Result<AttentionSummary, BackendError> {
    let mut words = Vec::with_capacity(maps.prompt.words.len());
    for span in &maps.prompt.words {
        if span.tokens.is_empty() {
            continue;
        }
        words.push(WordAttention {
            word: span.word.clone(),
            tokens: span.tokens.clone(),
            map: maps.mean_over(span.tokens.clone())?,
        });
    }
    Ok(AttentionSummary {
        height: maps.height,
        width: maps.width,
        instruction_map: maps.instruction_map()?,
        words,
    })
}
