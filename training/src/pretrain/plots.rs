//! The loss curve as a PNG: raw loss per logged step (light) and its moving average (dark), loss
//! on a log axis. Built without font support (no system fonts on the build machines), so the
//! axes carry grid lines but no numbers; the ranges go to the log and the command's output.

use std::path::Path;

use plotters::prelude::*;

use super::log::LogRecord;
use super::{PretrainError, Result};

/// What the plot shows, for the caller to print next to it.
#[derive(Debug, Clone, Copy)]
pub struct PlotRanges {
    pub steps: (usize, usize),
    pub loss: (f64, f64),
}

pub fn loss_curve(records: &[LogRecord], path: &Path, window: usize) -> Result<Option<PlotRanges>> {
    let points: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.loss.is_finite() && r.loss > 0.0)
        .map(|r| (r.step as f64, r.loss))
        .collect();
    if points.len() < 2 {
        return Ok(None);
    }
    let plot_error = |e: String| PretrainError::Plot {
        path: path.to_path_buf(),
        message: e,
    };
    let window = window.max(1);
    let smooth: Vec<(f64, f64)> = (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(window - 1);
            let mean = points[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i - lo + 1) as f64;
            (points[i].0, mean)
        })
        .collect();
    let x_min = points[0].0;
    let x_max = points[points.len() - 1].0.max(x_min + 1.0);
    let y_min = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let y_max = points.iter().map(|p| p.1).fold(0.0, f64::max);

    let root = BitMapBackend::new(path, (800, 480)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| plot_error(e.to_string()))?;
    let mut chart = ChartBuilder::on(&root)
        .margin(20)
        .build_cartesian_2d(x_min..x_max, (y_min * 0.9..y_max * 1.1).log_scale())
        .map_err(|e| plot_error(e.to_string()))?;
    chart
        .configure_mesh()
        .x_labels(10)
        .y_labels(10)
        .x_label_formatter(&|_| String::new())
        .y_label_formatter(&|_| String::new())
        .draw()
        .map_err(|e| plot_error(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(points, RGBColor(160, 190, 230)))
        .map_err(|e| plot_error(e.to_string()))?;
    chart
        .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
        .map_err(|e| plot_error(e.to_string()))?;
    root.present().map_err(|e| plot_error(e.to_string()))?;
    Ok(Some(PlotRanges {
        steps: (x_min as usize, x_max as usize),
        loss: (y_min, y_max),
    }))
}
