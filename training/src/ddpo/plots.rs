//! The trainer's two charts, `reward.png` and `kl.png` over epochs, drawn by the crate's chart
//! helper ([`crate::plots`]); the y axis is named after the file.

use std::path::Path;

use crate::plots::{ChartSpec, PlotError};

use super::{DdpoError, Result};

impl From<PlotError> for DdpoError {
    fn from(e: PlotError) -> Self {
        DdpoError::Plot {
            path: e.path,
            message: e.message,
        }
    }
}

/// A line with its trailing moving average over `window` points, over a band (e.g. mean +- std;
/// may be empty). Returns false when there is too little to draw.
pub fn line_chart(
    path: &Path,
    line: &[(f64, f64)],
    band: &[(f64, f64, f64)],
    window: usize,
) -> Result<bool> {
    let stem = path.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let y_label = match stem {
        "reward" => "reward (mean ± std)",
        "kl" => "approximate KL",
        other => other,
    };
    let spec = ChartSpec {
        x_label: "epoch",
        y_label,
        log_y: false,
        window,
    };
    Ok(crate::plots::line_chart(path, &spec, line, band)?.is_some())
}
