//! The rasteriser (supersampled shapes on plain or graded backgrounds) and the mask of a change.

use image::{Rgb, RgbImage};

use super::scene::{Background, Object, Scene, Shape};
use crate::data::Mask;

/// Anti-aliasing by supersampling: SUPERSAMPLE x SUPERSAMPLE samples per pixel.
const SUPERSAMPLE: usize = 4;

/// Outline of a shape of radius 1 centred at the origin (y down), for the polygonal shapes.
pub(super) fn polygon(shape: Shape) -> Vec<(f32, f32)> {
    match shape {
        Shape::Triangle => {
            // Equilateral, pointing up, shifted so its box is centred.
            let r = 1.1f32;
            let h = r * 1.5;
            let top = -h / 2.0;
            let half_base = r * 3f32.sqrt() / 2.0;
            vec![(0.0, top), (half_base, top + h), (-half_base, top + h)]
        }
        Shape::Star => {
            let (outer, inner) = (1.12f32, 0.5f32);
            let shift = outer * (1.0 - (std::f32::consts::PI / 5.0).cos()) / 2.0;
            (0..10)
                .map(|k| {
                    let angle =
                        -std::f32::consts::FRAC_PI_2 + k as f32 * std::f32::consts::PI / 5.0;
                    let r = if k % 2 == 0 { outer } else { inner };
                    (r * angle.cos(), r * angle.sin() + shift)
                })
                .collect()
        }
        Shape::Circle | Shape::Square => Vec::new(),
    }
}

pub(super) fn inside_polygon(points: &[(f32, f32)], x: f32, y: f32) -> bool {
    let mut inside = false;
    let mut j = points.len() - 1;
    for i in 0..points.len() {
        let (xi, yi) = points[i];
        let (xj, yj) = points[j];
        if (yi > y) != (yj > y) && x < (xj - xi) * (y - yi) / (yj - yi) + xi {
            inside = !inside;
        }
        j = i;
    }
    inside
}

/// Anti-aliased coverage of one object: a box of pixels and the fraction of each pixel covered.
pub(super) struct Coverage {
    x0: u32,
    y0: u32,
    width: u32,
    height: u32,
    values: Vec<f32>,
}

pub(super) fn coverage(object: &Object, size: u32) -> Coverage {
    let cell = size as f32 / 3.0;
    let cx = (object.cell.1 as f32 + 0.5 + object.jitter.0) * cell;
    let cy = (object.cell.0 as f32 + 0.5 + object.jitter.1) * cell;
    let radius = object.size.radius() * cell;
    let reach = radius * 1.2 + 1.0;
    let x0 = (cx - reach).floor().max(0.0) as u32;
    let y0 = (cy - reach).floor().max(0.0) as u32;
    let x1 = ((cx + reach).ceil() as u32).min(size);
    let y1 = ((cy + reach).ceil() as u32).min(size);
    let outline = polygon(object.shape);
    let inside = |u: f32, v: f32| match object.shape {
        Shape::Circle => u * u + v * v <= 0.95 * 0.95,
        Shape::Square => u.abs() <= 0.82 && v.abs() <= 0.82,
        Shape::Triangle | Shape::Star => inside_polygon(&outline, u, v),
    };
    let (width, height) = (x1.saturating_sub(x0), y1.saturating_sub(y0));
    let step = 1.0 / SUPERSAMPLE as f32;
    let mut values = Vec::with_capacity((width * height) as usize);
    for py in y0..y1 {
        for px in x0..x1 {
            let mut hits = 0u32;
            for sy in 0..SUPERSAMPLE {
                let v = (py as f32 + (sy as f32 + 0.5) * step - cy) / radius;
                for sx in 0..SUPERSAMPLE {
                    let u = (px as f32 + (sx as f32 + 0.5) * step - cx) / radius;
                    hits += u32::from(inside(u, v));
                }
            }
            values.push(hits as f32 / (SUPERSAMPLE * SUPERSAMPLE) as f32);
        }
    }
    Coverage {
        x0,
        y0,
        width,
        height,
        values,
    }
}

pub(super) fn background_pixel(background: &Background, x: u32, y: u32, size: u32) -> [f32; 3] {
    match *background {
        Background::Plain(rgb) => rgb,
        Background::Graded { from, to, angle } => {
            let (dx, dy) = (angle.cos(), angle.sin());
            let centre = size as f32 / 2.0;
            let half_extent = centre * (dx.abs() + dy.abs());
            let along = ((x as f32 + 0.5 - centre) * dx + (y as f32 + 0.5 - centre) * dy)
                / half_extent.max(1e-6);
            let t = (along * 0.5 + 0.5).clamp(0.0, 1.0);
            [0, 1, 2].map(|c| from[c] + (to[c] - from[c]) * t)
        }
    }
}

/// Renders a scene at `size` x `size` pixels.
pub fn render(scene: &Scene, size: u32) -> RgbImage {
    let mut pixels: Vec<[f32; 3]> = (0..size * size)
        .map(|i| background_pixel(&scene.background, i % size, i / size, size))
        .collect();
    for object in &scene.objects {
        let cover = coverage(object, size);
        let colour = object.colour.rgb();
        for dy in 0..cover.height {
            for dx in 0..cover.width {
                let a = cover.values[(dy * cover.width + dx) as usize];
                if a > 0.0 {
                    let p = &mut pixels[((cover.y0 + dy) * size + cover.x0 + dx) as usize];
                    for c in 0..3 {
                        p[c] = p[c] * (1.0 - a) + colour[c] * a;
                    }
                }
            }
        }
    }
    RgbImage::from_fn(size, size, |x, y| {
        let p = pixels[(y * size + x) as usize];
        Rgb(p.map(|v| v.round().clamp(0.0, 255.0) as u8))
    })
}

/// White where any of `objects` covers a pixel, grown by one pixel so anti-aliased edges are inside.
pub fn change_mask(objects: &[Object], size: u32) -> Mask {
    let mut hit = vec![false; (size * size) as usize];
    for object in objects {
        let cover = coverage(object, size);
        for dy in 0..cover.height {
            for dx in 0..cover.width {
                if cover.values[(dy * cover.width + dx) as usize] > 0.0 {
                    hit[((cover.y0 + dy) * size + cover.x0 + dx) as usize] = true;
                }
            }
        }
    }
    Mask::from_fn(size, size, |x, y| {
        let near = (y.saturating_sub(1)..=(y + 1).min(size - 1)).any(|ny| {
            (x.saturating_sub(1)..=(x + 1).min(size - 1)).any(|nx| hit[(ny * size + nx) as usize])
        });
        image::Luma([if near { 1.0 } else { 0.0 }])
    })
}
