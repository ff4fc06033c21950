//! Memory-mapped safetensors weights of one model component (`unet/`, `vae/`, `text_encoder/`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

use crate::error::{ModelError, Result};

/// Weight file names diffusers and transformers write, in the order we prefer them.
pub const WEIGHT_FILE_NAMES: &[&str] = &[
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
];

/// Finds the weight file of a component folder; names the folder when none is there.
pub fn find_weight_file(dir: &Path) -> Result<PathBuf> {
    WEIGHT_FILE_NAMES
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ModelError::MissingFile {
            path: dir.join(WEIGHT_FILE_NAMES[0]),
        })
}

/// Memory-maps `file` as a `VarBuilder` whose tensors are converted to `dtype` on load
/// (so f16 checkpoints are upcast to f32 on CPU).
pub fn var_builder_from_file(file: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    // Validate the header up front so a truncated or corrupt file is reported as such,
    // not as a confusing error on the first tensor.
    let data = std::fs::read(file).map_err(|source| ModelError::Io {
        path: file.to_path_buf(),
        source,
    })?;
    safetensors::SafeTensors::deserialize(&data).map_err(|e| ModelError::Weights {
        path: file.to_path_buf(),
        message: format!("not a valid safetensors file: {e}"),
    })?;
    drop(data);
    // SAFETY: the file is opened read-only; we do not mutate it while mapped. A file replaced
    // on disk under us is the operator's problem, as with any mmap-based loader.
    unsafe { VarBuilder::from_mmaped_safetensors(&[file], dtype, device) }.map_err(|e| {
        ModelError::Weights {
            path: file.to_path_buf(),
            message: e.to_string(),
        }
    })
}

/// `VarBuilder` for the weight file inside a component folder.
pub fn component_var_builder(dir: &Path, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
    var_builder_from_file(&find_weight_file(dir)?, dtype, device)
}
