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
pub fn var_builder_from_file(
    file: &Path,
    dtype: DType,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    // Validate the header and the file length up front (without reading the data) so that a
    // truncated or corrupt file is reported as such, not as a confusing error on a tensor.
    check_safetensors_layout(file)?;
    // SAFETY: the file is opened read-only; we do not mutate it while mapped. A file replaced
    // on disk under us is the operator's problem, as with any mmap-based loader.
    unsafe { VarBuilder::from_mmaped_safetensors(&[file], dtype, device) }.map_err(|e| {
        ModelError::Weights {
            path: file.to_path_buf(),
            message: e.to_string(),
        }
    })
}

/// Checks that `file` has a parseable safetensors header and exactly the data it declares.
pub fn check_safetensors_layout(file: &Path) -> Result<()> {
    use std::io::Read;
    let invalid = |message: String| ModelError::Weights {
        path: file.to_path_buf(),
        message: format!("not a valid safetensors file: {message}"),
    };
    let io = |source| ModelError::Io {
        path: file.to_path_buf(),
        cause: source,
    };
    let mut f = std::fs::File::open(file).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len_bytes = [0u8; 8];
    f.read_exact(&mut len_bytes)
        .map_err(|_| invalid("shorter than its 8-byte header length".into()))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > 100_000_000 || 8 + header_len > file_len {
        return Err(invalid(format!(
            "header length {header_len} does not fit a file of {file_len} bytes"
        )));
    }
    let mut header = vec![0u8; header_len as usize];
    f.read_exact(&mut header).map_err(io)?;
    let header: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| invalid(format!("header is not JSON: {e}")))?;
    let data_end = header
        .iter()
        .filter(|(k, _)| k.as_str() != "__metadata__")
        .filter_map(|(_, v)| v.get("data_offsets")?.get(1)?.as_u64())
        .max()
        .unwrap_or(0);
    let expected = 8 + header_len + data_end;
    if file_len != expected {
        return Err(invalid(format!(
            "the header declares {expected} bytes but the file has {file_len} (truncated or corrupt)"
        )));
    }
    Ok(())
}
