//! PNG charts of the per-epoch reward and approximate KL. Like the pretraining loss plot, built
//! without font support (the build machines have no system fonts): grid lines but no numbers; the
//! values are in the JSONL log.

use std::path::Path;

use plotters::prelude::*;

use super::{DdpoError, Result};

/// A line (medium) with its trailing moving average over `window` points (dark), over a light band
/// (e.g. mean +- std; may be empty). Returns false when there is too little to draw.
pub fn line_chart(
    path: &Path,
    line: &[(f64, f64)],
    band: &[(f64, f64, f64)],
    window: usize,
) -> Result<bool> {
    let finite = |v: f64| v.is_finite();
    let line: Vec<(f64, f64)> = line
        .iter()
        .copied()
        .filter(|p| finite(p.0) && finite(p.1))
        .collect();
    if line.len() < 2 {
        return Ok(false);
    }
    let plot_error = |e: String| DdpoError::Plot {
        path: path.to_path_buf(),
        message: e,
    };
    let x_min = line[0].0;
    let x_max = line[line.len() - 1].0.max(x_min + 1.0);
    let ys = line
        .iter()
        .map(|p| p.1)
        .chain(band.iter().flat_map(|b| [b.1, b.2]).filter(|v| finite(*v)));
    let (y_min, y_max) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
        (lo.min(y), hi.max(y))
    });
    let pad = ((y_max - y_min) * 0.05).max(1e-12);
    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .build_cartesian_2d(x_min..x_max, (y_min - pad)..(y_max + pad))
        .map_err(|e| plot_error(e.to_string()))?;
    chart
        .configure_mesh()
        .x_labels(10)
        .y_labels(10)
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|_| String::new())
        .draw()
        .map_err(|e| plot_error(e.to_string()))?;
    for (x, lo, hi) in band.iter().copied() {
        if finite(lo) && finite(hi) {
            chart
                .draw_series(LineSeries::new(
                    [(x, lo), (x, hi)],
                    RGBColor(190, 210, 240).stroke_width(3),
                ))
                .map_err(|e| plot_error(e.to_string()))?;
        }
    }
    let window = window.max(1);
    let smooth: Vec<(f64, f64)> = (0..line.len())
        .map(|i| {
            let lo = i.saturating_sub(window - 1);
            let mean = line[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i - lo + 1) as f64;
            (line[i].0, mean)
        })
        .collect();
    chart
        .draw_series(LineSeries::new(line, RGBColor(110, 140, 220)))
        .map_err(|e| plot_error(e.to_string()))?;
    if window > 1 {
        chart
            .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
            .map_err(|e| plot_error(e.to_string()))?;
    }
    root.present().map_err(|e| plot_error(e.to_string()))?;
    Ok(true)
}
