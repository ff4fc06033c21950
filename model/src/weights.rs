//! Safetensors weights of one model component (`unet/`, `vae/`, `text_encoder/`).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Shape, Tensor};
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

/// How a component's weight matrices and kernels are held in memory between uses. Vectors
/// (biases, norm scales) always take the compute dtype: they are small and some kernels read
/// them directly.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WeightStorage {
    /// Keep the file's precision when it is narrower than the compute dtype: an f16 or bf16
    /// checkpoint stays half the size of f32 in memory and each layer widens its weight as it
    /// runs ([`crate::ops::widen`]). Exact: every f16 and bf16 value is an f32 value, so the
    /// outputs equal those of converting at load.
    #[default]
    AsStored,
    /// Convert everything to the compute dtype at load: no per-use conversion, twice the memory
    /// for a half-precision checkpoint.
    Compute,
    /// Round matrices and kernels to f16 whatever the file holds: halves an f32 checkpoint's
    /// footprint at the cost of f16 rounding (about 3 significant digits per weight).
    F16,
}

impl WeightStorage {
    /// The dtype a tensor stored as `stored` with `rank` dimensions is kept in, for a model
    /// that computes in `compute`.
    pub fn keep_as(self, stored: DType, rank: usize, compute: DType) -> DType {
        let half = |d: DType| matches!(d, DType::F16 | DType::BF16);
        let float = |d: DType| half(d) || matches!(d, DType::F32 | DType::F64);
        if rank < 2 || !float(stored) || !float(compute) {
            return compute;
        }
        match self {
            Self::Compute => compute,
            Self::AsStored if half(stored) && !half(compute) => stored,
            Self::AsStored => compute,
            Self::F16 if !half(compute) => DType::F16,
            Self::F16 => compute,
        }
    }
}

impl std::str::FromStr for WeightStorage {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "as-stored" | "stored" => Ok(Self::AsStored),
            "compute" | "f32" => Ok(Self::Compute),
            "f16" => Ok(Self::F16),
            other => Err(format!(
                "weight storage must be as-stored, compute or f16, got `{other}`"
            )),
        }
    }
}

/// The weight file of a component folder (see [`find_weight_file`]) and a `VarBuilder` over it
/// whose weights are held as `storage` says.
pub fn component_var_builder(
    dir: &Path,
    dtype: DType,
    storage: WeightStorage,
    device: &Device,
) -> Result<(PathBuf, VarBuilder<'static>)> {
    let file = find_weight_file(dir)?;
    let vb = var_builder_with_storage(&file, dtype, storage, device)?;
    Ok((file, vb))
}

/// A `VarBuilder` over `file`: every tensor is read from the file as it is asked for (plain
/// reads, not a memory map, so the loaded model is the only copy counted in the process's
/// resident memory) and kept in the dtype `storage` picks.
pub fn var_builder_with_storage(
    file: &Path,
    dtype: DType,
    storage: WeightStorage,
    device: &Device,
) -> Result<VarBuilder<'static>> {
    // Validate the header and the file length up front (without reading the data) so that a
    // truncated or corrupt file is reported as such, not as a confusing error on a tensor.
    let header = check_safetensors_layout(file)?;
    let reader = SafetensorsReader::open(file, header, storage)?;
    Ok(VarBuilder::from_backend(
        Box::new(reader),
        dtype,
        device.clone(),
    ))
}

/// One tensor's entry in a safetensors header.
#[derive(Debug, Clone)]
struct TensorEntry {
    dtype: DType,
    shape: Vec<usize>,
    /// Byte range in the file (header included).
    start: u64,
    end: u64,
}

/// Reads tensors from a safetensors file on demand.
struct SafetensorsReader {
    file: std::fs::File,
    path: PathBuf,
    entries: std::collections::HashMap<String, TensorEntry>,
    storage: WeightStorage,
}

impl SafetensorsReader {
    fn open(path: &Path, header: SafetensorsHeader, storage: WeightStorage) -> Result<Self> {
        let invalid = |message: String| ModelError::Weights {
            path: path.to_path_buf(),
            message: format!("not a valid safetensors file: {message}"),
        };
        let data_start = 8 + header.header_len;
        let mut entries = std::collections::HashMap::new();
        for (name, info) in header.tensors {
            let dtype = match info.get("dtype").and_then(|d| d.as_str()) {
                Some("F16") => DType::F16,
                Some("BF16") => DType::BF16,
                Some("F32") => DType::F32,
                Some("F64") => DType::F64,
                Some("U8") => DType::U8,
                Some("U32") => DType::U32,
                Some("I64") => DType::I64,
                other => {
                    return Err(invalid(format!(
                        "tensor `{name}` has dtype {other:?}, which this loader does not read"
                    )))
                }
            };
            let shape: Vec<usize> = info
                .get("shape")
                .and_then(|s| s.as_array())
                .and_then(|dims| {
                    dims.iter()
                        .map(|d| d.as_u64().map(|d| d as usize))
                        .collect()
                })
                .ok_or_else(|| invalid(format!("tensor `{name}` has no valid shape")))?;
            let offsets = info
                .get("data_offsets")
                .and_then(|o| o.as_array())
                .and_then(|o| Some((o.first()?.as_u64()?, o.get(1)?.as_u64()?)))
                .ok_or_else(|| invalid(format!("tensor `{name}` has no valid data_offsets")))?;
            let elements: usize = shape.iter().product();
            let bytes = (elements * dtype.size_in_bytes()) as u64;
            if offsets.1 < offsets.0 || offsets.1 - offsets.0 != bytes {
                return Err(invalid(format!(
                    "tensor `{name}` declares {} bytes for {elements} {dtype:?} values",
                    offsets.1.saturating_sub(offsets.0)
                )));
            }
            entries.insert(
                name,
                TensorEntry {
                    dtype,
                    shape,
                    start: data_start + offsets.0,
                    end: data_start + offsets.1,
                },
            );
        }
        let file = std::fs::File::open(path).map_err(|cause| ModelError::Io {
            path: path.to_path_buf(),
            cause,
        })?;
        Ok(Self {
            file,
            path: path.to_path_buf(),
            entries,
            storage,
        })
    }

    fn read(&self, name: &str, compute: DType, device: &Device) -> candle_core::Result<Tensor> {
        use std::os::unix::fs::FileExt;
        let entry = self
            .entries
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor {
                path: name.to_string(),
            })?;
        let mut bytes = vec![0u8; (entry.end - entry.start) as usize];
        self.file
            .read_exact_at(&mut bytes, entry.start)
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "reading `{name}` from {}: {e}",
                    self.path.display()
                ))
            })?;
        let keep = self
            .storage
            .keep_as(entry.dtype, entry.shape.len(), compute);
        Tensor::from_raw_buffer(&bytes, entry.dtype, &entry.shape, &Device::Cpu)?
            .to_dtype(keep)?
            .to_device(device)
    }
}

impl candle_nn::var_builder::SimpleBackend for SafetensorsReader {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.read(name, dtype, device)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("shape mismatch for {name}"),
                expected: shape,
                got: tensor.shape().clone(),
            }
            .bt());
        }
        Ok(tensor)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.read(name, dtype, device)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }
}

/// A safetensors header: its length and each tensor's JSON entry.
pub struct SafetensorsHeader {
    header_len: u64,
    tensors: serde_json::Map<String, serde_json::Value>,
}

/// Checks that `file` has a parseable safetensors header and exactly the data it declares.
pub fn check_safetensors_layout(file: &Path) -> Result<SafetensorsHeader> {
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
    let mut header: serde_json::Map<String, serde_json::Value> =
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
    header.remove("__metadata__");
    Ok(SafetensorsHeader {
        header_len,
        tensors: header,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_keeps_half_matrices_and_widens_vectors() {
        use DType::{BF16, F16, F32};
        let s = WeightStorage::AsStored;
        assert_eq!(s.keep_as(F16, 2, F32), F16);
        assert_eq!(s.keep_as(BF16, 4, F32), BF16);
        assert_eq!(
            s.keep_as(F16, 1, F32),
            F32,
            "vectors take the compute dtype"
        );
        assert_eq!(s.keep_as(F32, 2, F32), F32);
        assert_eq!(
            s.keep_as(F32, 2, F16),
            F16,
            "never wider than the compute dtype"
        );
        assert_eq!(WeightStorage::Compute.keep_as(F16, 2, F32), F32);
        assert_eq!(WeightStorage::F16.keep_as(F32, 2, F32), F16);
        assert_eq!(WeightStorage::F16.keep_as(F32, 1, F32), F32);
        assert_eq!(WeightStorage::F16.keep_as(F32, 2, BF16), BF16);
        assert_eq!(s.keep_as(DType::I64, 2, F32), F32);
        assert_eq!("as-stored".parse(), Ok(WeightStorage::AsStored));
        assert_eq!(" F16 ".parse(), Ok(WeightStorage::F16));
        assert!("half"
            .parse::<WeightStorage>()
            .unwrap_err()
            .contains("as-stored"));
    }

    #[test]
    fn the_reader_hands_out_each_tensor_in_the_dtype_storage_picks() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("w.safetensors");
        let matrix = Tensor::new(&[[1.5f32, -2.0], [0.25, 3.0]], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        let bias = Tensor::new(&[0.5f32, 1.0], &Device::Cpu)
            .unwrap()
            .to_dtype(DType::F16)
            .unwrap();
        candle_core::safetensors::save(
            &std::collections::HashMap::from([("m", matrix), ("b", bias)]),
            &file,
        )
        .unwrap();
        for (storage, matrix_dtype) in [
            (WeightStorage::AsStored, DType::F16),
            (WeightStorage::Compute, DType::F32),
        ] {
            let vb = var_builder_with_storage(&file, DType::F32, storage, &Device::Cpu).unwrap();
            let m = vb.get((2, 2), "m").unwrap();
            let b = vb.get(2, "b").unwrap();
            assert_eq!(
                (m.dtype(), b.dtype()),
                (matrix_dtype, DType::F32),
                "{storage:?}"
            );
            assert_eq!(
                m.to_dtype(DType::F32).unwrap().to_vec2::<f32>().unwrap(),
                [[1.5, -2.0], [0.25, 3.0]]
            );
            assert_eq!(b.to_vec1::<f32>().unwrap(), [0.5, 1.0]);
            assert!(vb.contains_tensor("m") && !vb.contains_tensor("x"));
            let missing = vb.get(2, "x").unwrap_err().to_string();
            assert!(missing.contains("cannot find tensor x"), "{missing}");
            let wrong = vb.get((2, 3), "m").unwrap_err().to_string();
            assert!(wrong.contains("shape mismatch for m"), "{wrong}");
        }
    }

    #[test]
    fn widen_matches_candle_conversion() {
        let values: Vec<f32> = (0..70_000)
            .map(|i| (i as f32 * 0.37).sin() * 40.0)
            .collect();
        let t = Tensor::from_vec(values, (350, 200), &Device::Cpu).unwrap();
        for half in [DType::F16, DType::BF16] {
            let stored = t.to_dtype(half).unwrap();
            let widened = crate::ops::widen(&stored, DType::F32).unwrap();
            let reference = stored.to_dtype(DType::F32).unwrap();
            assert_eq!(widened.dims(), reference.dims());
            assert_eq!(
                widened.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                reference.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                "{half:?}"
            );
        }
    }
}
