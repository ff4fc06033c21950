//! PNG line charts of training curves (pretraining loss, DDPO reward and KL): a raw line, its
//! trailing moving average and an optional band (e.g. mean +- std), with numbered, labelled axes.
//! The font is compiled into the binary (a small subset of DejaVu Sans,
//! `training/assets/fonts/`), so charts read the same on machines without system fonts.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::prelude::*;

const FONT: &[u8] = include_bytes!("../assets/fonts/PlotSans.ttf");
const SIZE: (u32, u32) = (800, 480);
const LABEL_FONT_SIZE: u32 = 15;

#[derive(Debug, thiserror::Error)]
#[error("plot {}: {message}", path.display())]
pub struct PlotError {
    pub path: PathBuf,
    pub message: String,
}

/// What a chart shows besides its data.
#[derive(Debug, Clone, Copy)]
pub struct ChartSpec<'a> {
    pub x_label: &'a str,
    pub y_label: &'a str,
    /// Logarithmic y axis (non-positive values are left out).
    pub log_y: bool,
    /// Points in the trailing moving average; 1 draws the raw line only.
    pub window: usize,
}

/// The ranges a chart covers, for the caller to print next to it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ChartRanges {
    pub x: (f64, f64),
    pub y: (f64, f64),
}

/// Draws `line` (medium), its moving average over `spec.window` points (dark) and `band`
/// (light vertical bars, may be empty) into a PNG at `path`. Returns `None`, writing nothing,
/// when fewer than two points are finite (and positive on a log axis).
pub fn line_chart(
    path: &Path,
    spec: &ChartSpec,
    line: &[(f64, f64)],
    band: &[(f64, f64, f64)],
) -> Result<Option<ChartRanges>, PlotError> {
    let shown = |v: f64| v.is_finite() && (!spec.log_y || v > 0.0);
    let line: Vec<(f64, f64)> = line
        .iter()
        .copied()
        .filter(|&(x, y)| x.is_finite() && shown(y))
        .collect();
    if line.len() < 2 {
        return Ok(None);
    }
    let band: Vec<(f64, f64, f64)> = band
        .iter()
        .copied()
        .filter(|&(x, lo, hi)| x.is_finite() && shown(lo) && shown(hi))
        .collect();
    let x_min = line[0].0;
    let x_max = line[line.len() - 1].0.max(x_min + 1.0);
    let (y_min, y_max) = line
        .iter()
        .map(|p| p.1)
        .chain(band.iter().flat_map(|b| [b.1, b.2]))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), y| {
            (lo.min(y), hi.max(y))
        });
    let ranges = ChartRanges {
        x: (x_min, x_max),
        y: (y_min, y_max),
    };
    let error = |e: &dyn std::fmt::Display| PlotError {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    register_font();
    // Drawn into memory and encoded by the `image` crate the workspace already uses (plotters'
    // own PNG encoder would build a second, older `image`).
    let mut pixels = vec![0u8; (SIZE.0 * SIZE.1 * 3) as usize];
    draw_chart(
        &mut pixels,
        spec,
        &line,
        &band,
        (x_min, x_max),
        (y_min, y_max),
    )
    .map_err(|message| PlotError {
        path: path.to_path_buf(),
        message,
    })?;
    let picture = image::RgbImage::from_raw(SIZE.0, SIZE.1, pixels)
        .ok_or_else(|| error(&"the pixel buffer does not match the chart size"))?;
    picture
        .save_with_format(path, image::ImageFormat::Png)
        .map_err(|e| error(&e))?;
    Ok(Some(ranges))
}

fn draw_chart(
    pixels: &mut [u8],
    spec: &ChartSpec,
    line: &[(f64, f64)],
    band: &[(f64, f64, f64)],
    (x_min, x_max): (f64, f64),
    (y_min, y_max): (f64, f64),
) -> Result<(), String> {
    let error = |e: &dyn std::fmt::Display| e.to_string();
    let root = BitMapBackend::with_buffer(pixels, SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(|e| error(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .margin(20)
        .x_label_area_size(45)
        .y_label_area_size(75);
    let window = spec.window.max(1);
    let smooth = moving_average(line, window);
    let raw_colour = RGBColor(130, 160, 225);
    let band_colour = RGBColor(190, 210, 240);
    // The two axis kinds are different types in plotters, so each builds its own chart.
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart.map_err(|e| error(&e))?;
            chart
                .configure_mesh()
                .x_labels(10)
                .y_labels(8)
                .x_desc(spec.x_label)
                .y_desc(spec.y_label)
                .axis_desc_style(("sans-serif", LABEL_FONT_SIZE))
                .label_style(("sans-serif", LABEL_FONT_SIZE - 2))
                .x_label_formatter(&|x| tick_label(*x))
                .y_label_formatter(&|y| tick_label(*y))
                .draw()
                .map_err(|e| error(&e))?;
            for &(x, lo, hi) in band {
                chart
                    .draw_series(LineSeries::new(
                        [(x, lo), (x, hi)],
                        band_colour.stroke_width(3),
                    ))
                    .map_err(|e| error(&e))?;
            }
            chart
                .draw_series(LineSeries::new(line.iter().copied(), raw_colour))
                .map_err(|e| error(&e))?;
            if window > 1 {
                chart
                    .draw_series(LineSeries::new(smooth, BLUE.stroke_width(2)))
                    .map_err(|e| error(&e))?;
            }
        }};
    }
    if spec.log_y {
        draw!(builder.build_cartesian_2d(x_min..x_max, (y_min * 0.9..y_max * 1.1).log_scale()));
    } else {
        let pad = ((y_max - y_min) * 0.05).max(1e-12);
        draw!(builder.build_cartesian_2d(x_min..x_max, (y_min - pad)..(y_max + pad)));
    }
    root.present().map_err(|e| error(&e))?;
    Ok(())
}

/// Trailing mean over up to `window` points ending at each point.
fn moving_average(points: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    (0..points.len())
        .map(|i| {
            let lo = i.saturating_sub(window - 1);
            let mean = points[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i - lo + 1) as f64;
            (points[i].0, mean)
        })
        .collect()
}

/// About three significant digits, without trailing zeros (0.0125, 0.5, 12, 3400).
fn tick_label(value: f64) -> String {
    if value == 0.0 || !value.is_finite() {
        return format!("{value}");
    }
    let decimals = (2 - value.abs().log10().floor() as i32).clamp(0, 8) as usize;
    let text = format!("{value:.decimals$}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        text
    }
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is part of the binary and was checked when it was added; a parse failure
        // would be a broken build, and the chart then fails with plotters' own font error.
        let _ =
            plotters::style::register_font("sans-serif", plotters::style::FontStyle::Normal, FONT);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_labels_keep_three_significant_digits() {
        assert_eq!(tick_label(0.0), "0");
        assert_eq!(tick_label(0.012_345), "0.0123");
        assert_eq!(tick_label(0.5), "0.5");
        assert_eq!(tick_label(12.0), "12");
        assert_eq!(tick_label(3400.0), "3400");
        assert_eq!(tick_label(-1.25), "-1.25");
    }

    #[test]
    fn embedded_font_parses() {
        assert!(plotters::style::register_font(
            "rl4pix-test",
            plotters::style::FontStyle::Normal,
            FONT
        )
        .is_ok());
    }

    #[test]
    fn draws_numbered_axes_and_skips_too_little_data() {
        let dir = tempfile::tempdir().unwrap();
        let spec = ChartSpec {
            x_label: "step",
            y_label: "loss",
            log_y: true,
            window: 3,
        };
        let path = dir.path().join("loss.png");
        let line: Vec<(f64, f64)> = (0..50)
            .map(|i| (i as f64, 1.0 / (1.0 + i as f64)))
            .collect();
        let ranges = line_chart(&path, &spec, &line, &[]).unwrap().unwrap();
        assert_eq!(ranges.x, (0.0, 49.0));
        assert_eq!(ranges.y, (0.02, 1.0));
        let image = image::open(&path).unwrap().to_rgb8();
        assert_eq!(image.dimensions(), SIZE);
        // Text is drawn in black (plotters' default), which no series uses: its pixels in the
        // label areas show the numbers and labels were rendered.
        let dark_in_left_margin = image
            .enumerate_pixels()
            .filter(|(x, _, p)| *x < 90 && p.0.iter().all(|&c| c < 100))
            .count();
        assert!(
            dark_in_left_margin > 100,
            "{dark_in_left_margin} dark pixels"
        );

        let negative = [(0.0, -1.0), (1.0, -2.0), (2.0, 0.5)];
        let none = line_chart(&dir.path().join("none.png"), &spec, &negative, &[]).unwrap();
        assert!(none.is_none());
        assert!(!dir.path().join("none.png").exists());
    }
}
