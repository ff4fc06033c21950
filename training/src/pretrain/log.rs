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

    /// Opens the log of a run resumed at `step`: records past it (written by the run that was
    /// stopped after its last checkpoint, and redone now) are dropped first, so the log and its
    /// plot hold one record per step.
    pub fn resume_at(path: &Path, step: usize) -> Result<Self> {
        if path.is_file() {
            let text = std::fs::read_to_string(path).map_err(io_error(path))?;
            let kept: String = text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<LogRecord>(line).is_ok_and(|r| r.step <= step)
                })
                .flat_map(|line| [line, "\n"])
                .collect();
            if kept.len() != text.len() {
                rl4pix_model::atomic_file::write(path, kept.as_bytes()).map_err(io_error(path))?;
            }
        }
        Self::append(path)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_drops_the_records_past_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.log.jsonl");
        let record = |step: usize| LogRecord {
            step,
            loss: step as f64,
            lr: None,
            grad_norm: None,
            elapsed_s: None,
            eval: None,
        };
        let mut log = JsonlLog::append(&path).unwrap();
        for step in [10, 20, 30] {
            log.write(&record(step)).unwrap();
        }
        drop(log);
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"step\": 4")
            .unwrap();
        let mut log = JsonlLog::resume_at(&path, 20).unwrap();
        log.write(&record(30)).unwrap();
        let steps: Vec<usize> = read_log(&path).unwrap().iter().map(|r| r.step).collect();
        assert_eq!(steps, [10, 20, 30]);
    }
}
