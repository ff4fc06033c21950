//! The JSONL training log: one JSON object per line, appended, so a resumed run continues the
//! same file and the plot can be redrawn from it at any time.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{io_error, Result};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LogRecord {
    pub step: usize,
    pub loss: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_norm: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub elapsed_s: Option<f64>,
    /// Held-out figures (e.g. validation loss, PSNR), logged now and then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eval: Option<serde_json::Value>,
}

pub struct JsonlLog {
    path: PathBuf,
    file: std::fs::File,
}

impl JsonlLog {
    pub fn append(path: &Path) -> Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io_error(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    pub fn write(&mut self, record: &LogRecord) -> Result<()> {
        let line = serde_json::to_string(record).map_err(|e| super::PretrainError::Json {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        writeln!(self.file, "{line}").map_err(io_error(&self.path))
    }
}

/// Reads a log; lines that do not parse (e.g. one cut short by a kill) are skipped.
pub fn read_log(path: &Path) -> Result<Vec<LogRecord>> {
    let text = std::fs::read_to_string(path).map_err(io_error(path))?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect())
}
