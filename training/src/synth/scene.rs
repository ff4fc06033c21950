//! Objects (shape, colour, size, place on the 3x3 grid) and random scenes of them.

use rand::seq::IndexedRandom;
use rand::Rng;

/// Object extent as a fraction of a grid cell (a "radius": half the width of the shape's box).
const LARGE_RADIUS: f32 = 0.44;
const SMALL_RADIUS: f32 = 0.28;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Circle,
    Square,
    Triangle,
    Star,
}

impl Shape {
    pub const ALL: [Shape; 4] = [Shape::Circle, Shape::Square, Shape::Triangle, Shape::Star];

    pub fn name(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Colour {
    Red,
    Green,
    Blue,
    Yellow,
    Purple,
    Orange,
}

impl Colour {
    pub const ALL: [Colour; 6] = [
        Colour::Red,
        Colour::Green,
        Colour::Blue,
        Colour::Yellow,
        Colour::Purple,
        Colour::Orange,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Colour::Red => "red",
            Colour::Green => "green",
            Colour::Blue => "blue",
            Colour::Yellow => "yellow",
            Colour::Purple => "purple",
            Colour::Orange => "orange",
        }
    }

    pub fn rgb(self) -> [f32; 3] {
        match self {
            Colour::Red => [215.0, 35.0, 35.0],
            Colour::Green => [30.0, 160.0, 55.0],
            Colour::Blue => [35.0, 75.0, 215.0],
            Colour::Yellow => [240.0, 205.0, 20.0],
            Colour::Purple => [140.0, 55.0, 180.0],
            Colour::Orange => [245.0, 130.0, 15.0],
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Size {
    Small,
    Large,
}

impl Size {
    pub fn name(self) -> &'static str {
        match self {
            Size::Small => "small",
            Size::Large => "large",
        }
    }

    pub(super) fn radius(self) -> f32 {
        match self {
            Size::Small => SMALL_RADIUS,
            Size::Large => LARGE_RADIUS,
        }
    }

    /// How far (in cells) the centre may move from the cell's centre so the shape stays in its cell.
    pub(super) fn max_jitter(self) -> f32 {
        (0.5 - self.radius() - 0.03).max(0.0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    /// (row, column) on the 3x3 grid.
    pub cell: (usize, usize),
    /// Offset of the centre from the cell's centre, in cells.
    pub jitter: (f32, f32),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Background {
    Plain([f32; 3]),
    /// Linear blend from `from` to `to` along the direction `angle` (radians).
    Graded {
        from: [f32; 3],
        to: [f32; 3],
        angle: f32,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub struct Scene {
    pub background: Background,
    pub objects: Vec<Object>,
}

/// Light, low-saturation tones: every object colour stands out on them.
pub(super) const BACKGROUND_TONES: [[f32; 3]; 6] = [
    [236.0, 236.0, 236.0],
    [246.0, 240.0, 226.0],
    [222.0, 230.0, 240.0],
    [226.0, 238.0, 226.0],
    [208.0, 208.0, 212.0],
    [242.0, 226.0, 230.0],
];

pub(super) fn random_cell<R: Rng>(rng: &mut R) -> (usize, usize) {
    (rng.random_range(0..3), rng.random_range(0..3))
}

pub(super) fn random_tone<R: Rng>(rng: &mut R) -> [f32; 3] {
    let base = *BACKGROUND_TONES.choose(rng).unwrap_or(&BACKGROUND_TONES[0]);
    base.map(|c| (c + rng.random_range(-8.0..8.0f32)).clamp(0.0, 255.0))
}

pub(super) fn random_object<R: Rng>(cell: (usize, usize), rng: &mut R) -> Object {
    let size = if rng.random_bool(0.5) {
        Size::Large
    } else {
        Size::Small
    };
    let j = size.max_jitter();
    Object {
        shape: *Shape::ALL.choose(rng).unwrap_or(&Shape::Circle),
        colour: *Colour::ALL.choose(rng).unwrap_or(&Colour::Red),
        size,
        cell,
        jitter: (rng.random_range(-j..=j), rng.random_range(-j..=j)),
    }
}

pub(super) fn all_cells() -> impl Iterator<Item = (usize, usize)> {
    (0..3).flat_map(|r| (0..3).map(move |c| (r, c)))
}

pub(super) fn empty_cells(objects: &[Object]) -> Vec<(usize, usize)> {
    all_cells()
        .filter(|c| objects.iter().all(|o| o.cell != *c))
        .collect()
}

pub fn random_scene<R: Rng>(rng: &mut R) -> Scene {
    let background = if rng.random_bool(0.5) {
        Background::Plain(random_tone(rng))
    } else {
        let from = random_tone(rng);
        let mut to = random_tone(rng);
        // Keep the gradient soft but visible.
        if from
            .iter()
            .zip(&to)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            < 12.0
        {
            to = to.map(|c| (c - 20.0).max(0.0));
        }
        Background::Graded {
            from,
            to,
            angle: rng.random_range(0.0..std::f32::consts::TAU),
        }
    };
    let count = rng.random_range(1..=3usize);
    let mut cells: Vec<(usize, usize)> = all_cells().collect();
    let mut objects = Vec::with_capacity(count);
    for _ in 0..count {
        let cell = cells.swap_remove(rng.random_range(0..cells.len()));
        objects.push(random_object(cell, rng));
    }
    Scene {
        background,
        objects,
    }
}
