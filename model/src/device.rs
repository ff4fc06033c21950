//! The compute device from a spec string: `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.

use candle_core::Device;

use crate::{ModelError, Result};

/// The environment variable that names the device (the server's `--device` and the tests read
/// it); unset means the CPU.
pub const DEVICE_ENV: &str = "RL4PIX_DEVICE";

/// Opens the device `spec` names. A CUDA device needs a build with `--features cuda` and a
/// driver; without either the error says so.
pub fn parse_device(spec: &str) -> Result<Device> {
    let spec = spec.trim();
    if spec.eq_ignore_ascii_case("cpu") {
        return Ok(Device::Cpu);
    }
    let ordinal = spec
        .strip_prefix("cuda:")
        .or_else(|| (spec == "cuda").then_some("0"))
        .and_then(|n| n.parse::<usize>().ok())
        .ok_or_else(|| {
            ModelError::InvalidArgument(format!("device must be cpu or cuda:N, got `{spec}`"))
        })?;
    Device::new_cuda(ordinal).map_err(|e| {
        ModelError::InvalidArgument(format!(
            "cannot open {spec}: {e} (CUDA needs a build with `--features cuda`)"
        ))
    })
}

/// The device [`DEVICE_ENV`] names, or the CPU when it is unset or empty. Opened once per
/// process: candle tells CUDA devices apart by the call that opened them, so tensors from two
/// `new_cuda(0)` calls could not be combined.
pub fn device_from_env() -> Result<Device> {
    static DEVICE: std::sync::OnceLock<std::result::Result<Device, String>> =
        std::sync::OnceLock::new();
    DEVICE
        .get_or_init(|| match std::env::var(DEVICE_ENV) {
            Ok(spec) if !spec.trim().is_empty() => {
                parse_device(&spec).map_err(|e| format!("{DEVICE_ENV}: {e}"))
            }
            _ => Ok(Device::Cpu),
        })
        .clone()
        .map_err(ModelError::InvalidArgument)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_and_malformed_specs() {
        assert!(parse_device("cpu").unwrap().is_cpu());
        assert!(parse_device(" CPU ").unwrap().is_cpu());
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", ""] {
            let err = parse_device(bad).unwrap_err().to_string();
            assert!(err.contains("cpu or cuda:N"), "{bad}: {err}");
        }
    }

    #[cfg(not(feature = "cuda"))]
    #[test]
    fn cuda_without_the_feature_says_how_to_get_it() {
        let err = parse_device("cuda:0").unwrap_err().to_string();
        assert!(err.contains("--features cuda"), "{err}");
    }
}
