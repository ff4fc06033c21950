//! Reading the JSON config files of the diffusers / transformers on-disk layout.

use std::path::Path;

use serde::de::DeserializeOwned;

use crate::error::{ModelError, Result};

/// Parses a JSON config file, naming the file in every error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    if !path.is_file() {
        return Err(ModelError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| ModelError::Io {
        path: path.to_path_buf(),
        cause: source,
    })?;
    serde_json::from_str(&text).map_err(|e| ModelError::Config {
        file: path.to_path_buf(),
        message: e.to_string(),
    })
}

/// An "unsupported value" error for `key` in `file`.
pub fn unsupported(file: &Path, key: &str, value: impl std::fmt::Display) -> ModelError {
    ModelError::Unsupported {
        file: file.to_path_buf(),
        key: key.to_string(),
        value: value.to_string(),
    }
}
