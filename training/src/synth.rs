//! The synthetic world: small scenes of coloured shapes on a 3x3 grid and the paper's
//! four kinds of edit on them, rendered exactly, with a mask of the changed region, an instruction
//! (several phrasings, some deliberately ambiguous about *where*), a local description for CLIP-T and
//! the edit kind.
//!
//! Everything is drawn from a ChaCha stream chosen by (seed, session index), so a session is the same
//! on every platform and independent of how many threads generate the set.
//!
//! What the world contains and why: `docs/architecture.md`, "The synthetic world".

use image::{Rgb, RgbImage};
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::data::{EditKind, Mask, Session, Turn};

pub const DEFAULT_SIZE: u32 = 32;
/// Scenes never grow beyond this many objects, so insertions always have room to be told apart.
const MAX_OBJECTS: usize = 5;
/// Anti-aliasing by supersampling: SUPERSAMPLE x SUPERSAMPLE samples per pixel.
const SUPERSAMPLE: usize = 4;
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

    fn radius(self) -> f32 {
        match self {
            Size::Small => SMALL_RADIUS,
            Size::Large => LARGE_RADIUS,
        }
    }

    /// How far (in cells) the centre may move from the cell's centre so the shape stays in its cell.
    fn max_jitter(self) -> f32 {
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
const BACKGROUND_TONES: [[f32; 3]; 6] = [
    [236.0, 236.0, 236.0],
    [246.0, 240.0, 226.0],
    [222.0, 230.0, 240.0],
    [226.0, 238.0, 226.0],
    [208.0, 208.0, 212.0],
    [242.0, 226.0, 230.0],
];

fn cell_name(cell: (usize, usize)) -> &'static str {
    const NAMES: [[&str; 3]; 3] = [
        ["top left", "top center", "top right"],
        ["middle left", "center", "middle right"],
        ["bottom left", "bottom center", "bottom right"],
    ];
    NAMES[cell.0][cell.1]
}

/// A phrase placing something in `cell`, in one of a few phrasings.
fn position_phrase<R: Rng>(cell: (usize, usize), rng: &mut R) -> String {
    let name = cell_name(cell);
    let short = match cell {
        (0, 1) => Some("at the top"),
        (1, 0) => Some("on the left"),
        (1, 1) => Some("in the middle"),
        (1, 2) => Some("on the right"),
        (2, 1) => Some("at the bottom"),
        _ => None,
    };
    let corner = cell.0 != 1 && cell.1 != 1;
    match (rng.random_range(0..3u32), short) {
        (0, Some(short)) => short.to_string(),
        (1, _) if corner => format!("in the {name} corner"),
        _ => format!("in the {name}"),
    }
}

fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// "a small red circle" / "a red circle" (large is the default size, so it is often left unsaid).
fn new_object_phrase<R: Rng>(object: &Object, rng: &mut R) -> String {
    let words = match object.size {
        Size::Small => format!("small {} {}", object.colour.name(), object.shape.name()),
        Size::Large if rng.random_bool(0.3) => {
            let big = *["big", "large"].choose(rng).unwrap_or(&"big");
            format!("{big} {} {}", object.colour.name(), object.shape.name())
        }
        Size::Large => format!("{} {}", object.colour.name(), object.shape.name()),
    };
    format!("{} {words}", article(&words))
}

/// Full description, used for captions: "a large red circle in the top left".
fn object_caption(object: &Object) -> String {
    format!(
        "a {} {} {} in the {}",
        object.size.name(),
        object.colour.name(),
        object.shape.name(),
        cell_name(object.cell)
    )
}

/// The local description of a cell a removal emptied.
fn empty_caption(cell: (usize, usize)) -> String {
    format!("empty background in the {}", cell_name(cell))
}

/// Whether `description` (a local description as this world writes them) is true of `scene`: an
/// object of that size, colour and shape in that cell, or nothing in that cell. Most cells of a
/// scene are empty, so "empty background in ..." is true of most scenes.
pub fn describes(scene: &Scene, description: &str) -> bool {
    scene
        .objects
        .iter()
        .any(|object| object_caption(object) == description)
        || (0..3)
            .flat_map(|row| (0..3).map(move |col| (row, col)))
            .any(|cell| {
                description == empty_caption(cell)
                    && scene.objects.iter().all(|object| object.cell != cell)
            })
}

/// A local description of the form this world writes that is false of `scene` but one attribute
/// away from a true one (another colour, shape, size or cell of a shown object; an occupied cell
/// called empty): the hard negatives a small CLIP needs to learn to bind attributes.
pub fn near_miss_description<R: Rng>(scene: &Scene, rng: &mut R) -> String {
    for _ in 0..16 {
        let candidate = if scene.objects.is_empty() || rng.random_bool(0.2) {
            match scene
                .objects
                .get(rng.random_range(0..scene.objects.len().max(1)))
            {
                // An occupied cell called empty.
                Some(object) => empty_caption(object.cell),
                // An empty scene: any object anywhere is false.
                None => object_caption(&random_object(random_cell(rng), rng)),
            }
        } else {
            let mut object = scene.objects[rng.random_range(0..scene.objects.len())];
            match rng.random_range(0..4) {
                0 => object.colour = Colour::ALL[rng.random_range(0..Colour::ALL.len())],
                1 => object.shape = Shape::ALL[rng.random_range(0..Shape::ALL.len())],
                2 => {
                    object.size = match object.size {
                        Size::Small => Size::Large,
                        Size::Large => Size::Small,
                    }
                }
                _ => object.cell = random_cell(rng),
            }
            object_caption(&object)
        };
        if !describes(scene, &candidate) {
            return candidate;
        }
    }
    // Every mutation happened to be true (a crowded scene of look-alikes): any false object.
    loop {
        let candidate = object_caption(&random_object(random_cell(rng), rng));
        if !describes(scene, &candidate) {
            return candidate;
        }
    }
}

fn random_cell<R: Rng>(rng: &mut R) -> (usize, usize) {
    (rng.random_range(0..3), rng.random_range(0..3))
}

/// A referring expression ("the circle", "the red circle", "the small red circle",
/// "the red circle in the top left") that picks `objects[index]` out of the scene unambiguously:
/// the shortest unique one, or sometimes a longer unique one.
fn refer<R: Rng>(objects: &[Object], index: usize, rng: &mut R) -> String {
    let o = objects[index];
    let others = || {
        objects
            .iter()
            .enumerate()
            .filter(move |(i, _)| *i != index)
            .map(|(_, x)| x)
    };
    let options = [
        (
            others().all(|x| x.shape != o.shape),
            format!("the {}", o.shape.name()),
        ),
        (
            others().all(|x| (x.shape, x.colour) != (o.shape, o.colour)),
            format!("the {} {}", o.colour.name(), o.shape.name()),
        ),
        (
            others().all(|x| (x.shape, x.colour, x.size) != (o.shape, o.colour, o.size)),
            format!(
                "the {} {} {}",
                o.size.name(),
                o.colour.name(),
                o.shape.name()
            ),
        ),
        (
            true,
            format!(
                "the {} {} in the {}",
                o.colour.name(),
                o.shape.name(),
                cell_name(o.cell)
            ),
        ),
    ];
    let unique: Vec<&String> = options
        .iter()
        .filter(|(ok, _)| *ok)
        .map(|(_, s)| s)
        .collect();
    let pick = if rng.random_bool(0.3) {
        rng.random_range(0..unique.len())
    } else {
        0
    };
    unique[pick].clone()
}

fn random_tone<R: Rng>(rng: &mut R) -> [f32; 3] {
    let base = *BACKGROUND_TONES.choose(rng).unwrap_or(&BACKGROUND_TONES[0]);
    base.map(|c| (c + rng.random_range(-8.0..8.0f32)).clamp(0.0, 255.0))
}

fn random_object<R: Rng>(cell: (usize, usize), rng: &mut R) -> Object {
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

fn all_cells() -> impl Iterator<Item = (usize, usize)> {
    (0..3).flat_map(|r| (0..3).map(move |c| (r, c)))
}

fn empty_cells(objects: &[Object]) -> Vec<(usize, usize)> {
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

/// One edit of a scene: the edited scene, what to tell the model, and which objects changed
/// (before and after), from which the mask follows.
#[derive(Debug, Clone)]
pub struct Edit {
    pub kind: EditKind,
    pub instruction: String,
    pub local_description: String,
    pub result: Scene,
    pub changed: Vec<Object>,
    /// The instruction leaves more than one place open (the mask says which one was chosen).
    pub ambiguous: bool,
}

fn feasible_kinds(scene: &Scene) -> Vec<EditKind> {
    let mut kinds = Vec::with_capacity(4);
    if scene.objects.len() < MAX_OBJECTS && !empty_cells(&scene.objects).is_empty() {
        kinds.push(EditKind::Insertion);
    }
    if !scene.objects.is_empty() {
        kinds.extend([
            EditKind::Removal,
            EditKind::Replacement,
            EditKind::Transformation,
        ]);
    }
    kinds
}

fn neighbour(cell: (usize, usize), dr: isize, dc: isize) -> Option<(usize, usize)> {
    let r = cell.0.checked_add_signed(dr)?;
    let c = cell.1.checked_add_signed(dc)?;
    (r < 3 && c < 3).then_some((r, c))
}

/// Where to insert and how to say it: an absolute place, a relation to an object ("above the
/// blue square"), or on purpose an ambiguous one ("next to the blue square", "in a corner").
fn insertion_place<R: Rng>(scene: &Scene, rng: &mut R) -> ((usize, usize), String, bool) {
    let empty = empty_cells(&scene.objects);
    let mut options: Vec<((usize, usize), String, bool)> = Vec::new();
    let style = rng.random_range(0..4u32);
    if style == 1 && !scene.objects.is_empty() {
        let index = rng.random_range(0..scene.objects.len());
        let anchor = scene.objects[index].cell;
        let reference = refer(&scene.objects, index, rng);
        const RELATIONS: [(isize, isize, &str); 4] = [
            (-1, 0, "above"),
            (1, 0, "below"),
            (0, -1, "to the left of"),
            (0, 1, "to the right of"),
        ];
        for (dr, dc, word) in RELATIONS {
            if let Some(cell) = neighbour(anchor, dr, dc).filter(|c| empty.contains(c)) {
                options.push((cell, format!("{word} {reference}"), false));
            }
        }
    } else if style == 2 && !scene.objects.is_empty() {
        let index = rng.random_range(0..scene.objects.len());
        let anchor = scene.objects[index].cell;
        let reference = refer(&scene.objects, index, rng);
        let beside: Vec<_> = [(0, -1), (0, 1)]
            .iter()
            .filter_map(|&(dr, dc)| neighbour(anchor, dr, dc))
            .filter(|c| empty.contains(c))
            .collect();
        if let Some(&cell) = beside.choose(rng) {
            let words = *["next to", "beside"].choose(rng).unwrap_or(&"next to");
            options.push((cell, format!("{words} {reference}"), beside.len() > 1));
        }
    } else if style == 3 {
        type Region = (&'static str, fn((usize, usize)) -> bool);
        const REGIONS: [Region; 5] = [
            ("in a corner", |c| c.0 != 1 && c.1 != 1),
            ("somewhere on the left", |c| c.1 == 0),
            ("somewhere on the right", |c| c.1 == 2),
            ("somewhere along the top", |c| c.0 == 0),
            ("somewhere along the bottom", |c| c.0 == 2),
        ];
        let (words, inside) = REGIONS[rng.random_range(0..REGIONS.len())];
        let candidates: Vec<_> = empty.iter().copied().filter(|c| inside(*c)).collect();
        if let Some(&cell) = candidates.choose(rng) {
            options.push((cell, words.to_string(), candidates.len() > 1));
        }
    }
    match options.choose(rng) {
        Some(option) => option.clone(),
        None => {
            let cell = empty[rng.random_range(0..empty.len())];
            (cell, position_phrase(cell, rng), false)
        }
    }
}

fn pick<R: Rng>(rng: &mut R, phrasings: &[&'static str]) -> &'static str {
    phrasings.choose(rng).copied().unwrap_or(phrasings[0])
}

/// Draws one feasible edit of `scene`; `None` only for a scene that allows none (never happens:
/// an empty scene still allows insertion).
pub fn random_edit<R: Rng>(scene: &Scene, rng: &mut R) -> Option<Edit> {
    let kind = *feasible_kinds(scene).choose(rng)?;
    let mut result = scene.clone();
    let edit = match kind {
        EditKind::Insertion => {
            let (cell, place, ambiguous) = insertion_place(scene, rng);
            let object = random_object(cell, rng);
            let thing = new_object_phrase(&object, rng);
            let instruction = match rng.random_range(0..6u32) {
                0 => format!("add {thing} {place}"),
                1 => format!("put {thing} {place}"),
                2 => format!("place {thing} {place}"),
                3 => format!("draw {thing} {place}"),
                4 => format!("insert {thing} {place}"),
                _ => format!("there should be {thing} {place}"),
            };
            result.objects.push(object);
            Edit {
                kind,
                instruction,
                local_description: object_caption(&object),
                result,
                changed: vec![object],
                ambiguous,
            }
        }
        EditKind::Removal => {
            let index = rng.random_range(0..scene.objects.len());
            let object = scene.objects[index];
            let target = refer(&scene.objects, index, rng);
            let verb = pick(
                rng,
                &["remove", "delete", "erase", "take away", "get rid of"],
            );
            result.objects.remove(index);
            Edit {
                kind,
                instruction: format!("{verb} {target}"),
                local_description: empty_caption(object.cell),
                result,
                changed: vec![object],
                ambiguous: false,
            }
        }
        EditKind::Replacement => {
            let index = rng.random_range(0..scene.objects.len());
            let old = scene.objects[index];
            let target = refer(&scene.objects, index, rng);
            let shapes: Vec<Shape> = Shape::ALL.into_iter().filter(|s| *s != old.shape).collect();
            let new = Object {
                shape: *shapes.choose(rng).unwrap_or(&Shape::Circle),
                colour: *Colour::ALL.choose(rng).unwrap_or(&Colour::Red),
                ..old
            };
            let thing = format!(
                "{} {} {}",
                article(new.colour.name()),
                new.colour.name(),
                new.shape.name()
            );
            let instruction = match rng.random_range(0..5u32) {
                0 => format!("replace {target} with {thing}"),
                1 => format!("swap {target} for {thing}"),
                2 => format!("turn {target} into {thing}"),
                3 => format!("change {target} into {thing}"),
                _ => format!("put {thing} where {target} is"),
            };
            result.objects[index] = new;
            Edit {
                kind,
                instruction,
                local_description: object_caption(&new),
                result,
                changed: vec![old, new],
                ambiguous: false,
            }
        }
        EditKind::Transformation => {
            let index = rng.random_range(0..scene.objects.len());
            let old = scene.objects[index];
            let target = refer(&scene.objects, index, rng);
            let (new, instruction) = if rng.random_bool(0.5) {
                let colours: Vec<Colour> = Colour::ALL
                    .into_iter()
                    .filter(|c| *c != old.colour)
                    .collect();
                let colour = *colours.choose(rng).unwrap_or(&Colour::Red);
                let name = colour.name();
                let instruction = match rng.random_range(0..5u32) {
                    0 => format!("make {target} {name}"),
                    1 => format!("colour {target} {name}"),
                    2 => format!("paint {target} {name}"),
                    3 => format!("turn {target} {name}"),
                    _ => format!("change the colour of {target} to {name}"),
                };
                (Object { colour, ..old }, instruction)
            } else {
                let (size, phrasings): (Size, &[&str]) = match old.size {
                    Size::Small => (
                        Size::Large,
                        &[
                            "make {} bigger",
                            "make {} larger",
                            "enlarge {}",
                            "increase the size of {}",
                        ],
                    ),
                    Size::Large => (
                        Size::Small,
                        &["make {} smaller", "shrink {}", "reduce the size of {}"],
                    ),
                };
                let j = size.max_jitter();
                let new = Object {
                    size,
                    jitter: (old.jitter.0.clamp(-j, j), old.jitter.1.clamp(-j, j)),
                    ..old
                };
                (new, pick(rng, phrasings).replace("{}", &target))
            };
            result.objects[index] = new;
            Edit {
                kind,
                instruction,
                local_description: object_caption(&new),
                result,
                changed: vec![old, new],
                ambiguous: false,
            }
        }
    };
    Some(edit)
}

// ---------------------------------------------------------------- rendering

/// Outline of a shape of radius 1 centred at the origin (y down), for the polygonal shapes.
fn polygon(shape: Shape) -> Vec<(f32, f32)> {
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

fn inside_polygon(points: &[(f32, f32)], x: f32, y: f32) -> bool {
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
struct Coverage {
    x0: u32,
    y0: u32,
    width: u32,
    height: u32,
    values: Vec<f32>,
}

fn coverage(object: &Object, size: u32) -> Coverage {
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

fn background_pixel(background: &Background, x: u32, y: u32, size: u32) -> [f32; 3] {
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

/// Caption of a whole scene ("a red circle in the top left and a small blue star in the center on a
/// plain background").
pub fn scene_caption(scene: &Scene) -> String {
    let background = match scene.background {
        Background::Plain(_) => "a plain background",
        Background::Graded { .. } => "a graded background",
    };
    if scene.objects.is_empty() {
        return format!("an empty scene on {background}");
    }
    let objects: Vec<String> = scene.objects.iter().map(object_caption).collect();
    format!("{} on {background}", objects.join(" and "))
}

// ---------------------------------------------------------------- sessions

/// A turn of a generated session, with the scene before and after (for captions and analysis).
#[derive(Debug, Clone)]
pub struct SynthTurn {
    pub turn: Turn,
    pub before: Scene,
    pub after: Scene,
    pub ambiguous: bool,
}

/// Generator of the synthetic world; cheap to clone and share between threads.
#[derive(Debug, Clone, Copy)]
pub struct SynthWorld {
    pub size: u32,
    pub seed: u64,
}

impl SynthWorld {
    pub fn new(size: u32, seed: u64) -> Self {
        SynthWorld { size, seed }
    }

    /// The id of session `index`, as the folder writer names it.
    pub fn session_id(index: u64) -> String {
        format!("{index:06}")
    }

    /// The RNG of session `index`: its own ChaCha stream under the world's seed.
    pub fn session_rng(&self, index: u64) -> ChaCha8Rng {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(index);
        rng
    }

    /// Session `index` (1-3 turns), the same for the same (seed, index, size) everywhere.
    pub fn session(&self, index: u64) -> Session {
        let turns = self.session_turns(index);
        Session {
            id: Self::session_id(index),
            turns: turns.into_iter().map(|t| t.turn).collect(),
        }
    }

    /// Session `index` with its scenes.
    pub fn session_turns(&self, index: u64) -> Vec<SynthTurn> {
        let mut rng = self.session_rng(index);
        let count = rng.random_range(1..=3usize);
        self.generate(&Self::session_id(index), count, &mut rng)
    }

    /// One random turn (a fresh scene and one edit) drawn from `rng`, for training loops that draw
    /// samples directly.
    pub fn random_turn<R: Rng>(&self, rng: &mut R) -> SynthTurn {
        let mut turns = self.generate("sample", 1, rng);
        turns.remove(0)
    }

    fn generate<R: Rng>(&self, id: &str, count: usize, rng: &mut R) -> Vec<SynthTurn> {
        let mut scene = random_scene(rng);
        let mut source = render(&scene, self.size);
        let mut turns = Vec::with_capacity(count);
        for turn_index in 1..=count {
            let Some(edit) = random_edit(&scene, rng) else {
                break;
            };
            let target = render(&edit.result, self.size);
            let mask = change_mask(&edit.changed, self.size);
            turns.push(SynthTurn {
                turn: Turn {
                    session_id: id.to_string(),
                    turn_index,
                    instruction: edit.instruction,
                    source: source.clone(),
                    target: target.clone(),
                    mask,
                    local_description: Some(edit.local_description),
                    edit_kind: Some(edit.kind),
                },
                before: scene,
                after: edit.result.clone(),
                ambiguous: edit.ambiguous,
            });
            scene = edit.result;
            source = target;
        }
        turns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_are_deterministic_and_chained() {
        let world = SynthWorld::new(32, 7);
        for index in 0..50 {
            let a = world.session(index);
            let b = world.session(index);
            assert_eq!(a.turns.len(), b.turns.len());
            assert!((1..=3).contains(&a.turns.len()));
            for (x, y) in a.turns.iter().zip(&b.turns) {
                assert_eq!(x.instruction, y.instruction);
                assert_eq!(x.target, y.target);
            }
            for pair in a.turns.windows(2) {
                assert_eq!(pair[0].target, pair[1].source);
            }
        }
        assert_ne!(
            SynthWorld::new(32, 8).session(0).turns[0].instruction,
            world.session(0).turns[0].instruction
        );
    }

    #[test]
    fn mask_covers_every_changed_pixel() {
        let world = SynthWorld::new(32, 3);
        for index in 0..200 {
            for turn in world.session(index).turns {
                let mut changed = 0;
                for (x, y, src) in turn.source.enumerate_pixels() {
                    if src != turn.target.get_pixel(x, y) {
                        changed += 1;
                        assert_eq!(turn.mask.get_pixel(x, y).0[0], 1.0, "{}", turn.instruction);
                    }
                }
                assert!(changed > 0, "edit changed nothing: {}", turn.instruction);
            }
        }
    }

    #[test]
    fn all_kinds_and_ambiguity_occur() {
        let world = SynthWorld::new(32, 11);
        let turns: Vec<SynthTurn> = (0..300).flat_map(|i| world.session_turns(i)).collect();
        for kind in EditKind::ALL {
            assert!(
                turns.iter().any(|t| t.turn.edit_kind == Some(kind)),
                "{kind:?}"
            );
        }
        assert!(turns.iter().any(|t| t.ambiguous));
        let phrasings: std::collections::HashSet<&str> = turns
            .iter()
            .map(|t| t.turn.instruction.split(' ').next().unwrap_or(""))
            .collect();
        assert!(phrasings.len() >= 10, "{phrasings:?}");
    }

    #[test]
    fn referring_expressions_are_unique() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let red_circle = |cell| Object {
            shape: Shape::Circle,
            colour: Colour::Red,
            size: Size::Large,
            cell,
            jitter: (0.0, 0.0),
        };
        let objects = [red_circle((0, 0)), red_circle((2, 2))];
        for _ in 0..20 {
            assert_eq!(
                refer(&objects, 0, &mut rng),
                "the red circle in the top left"
            );
        }
    }

    #[test]
    fn near_misses_are_false_and_one_attribute_from_a_true_description() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        // "a SIZE COLOUR SHAPE in the CELL" -> its four slots.
        let slots = |s: &str| -> Option<[String; 4]> {
            let (object, cell) = s.strip_prefix("a ")?.split_once(" in the ")?;
            let mut w = object.split(' ').map(str::to_owned);
            Some([w.next()?, w.next()?, w.next()?, cell.to_owned()])
        };
        let mut kinds = std::collections::HashSet::new();
        for _ in 0..300 {
            let scene = random_scene(&mut rng);
            let miss = near_miss_description(&scene, &mut rng);
            assert!(!describes(&scene, &miss), "{miss:?} holds in {scene:?}");
            let truths: Vec<String> = scene
                .objects
                .iter()
                .map(object_caption)
                .chain(all_cells().map(empty_caption))
                .filter(|d| describes(&scene, d))
                .collect();
            // One slot away from a true object description, or an occupied cell called empty.
            let close = truths.iter().any(|t| match (slots(t), slots(&miss)) {
                (Some(a), Some(b)) => a.iter().zip(&b).filter(|(x, y)| x != y).count() == 1,
                _ => false,
            });
            if !scene.objects.is_empty() {
                assert!(close || miss.starts_with("empty"), "{miss:?} vs {truths:?}");
            }
            kinds.insert(miss.split(' ').next().unwrap_or("").to_owned());
        }
        assert!(kinds.contains("empty") && kinds.contains("a"), "{kinds:?}");
    }
}

// ---------------------------------------------------------------- MagicBrush folder writer

/// What [`write_folder`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSummary {
    pub sessions: u64,
    pub turns: u64,
}

/// One session's entries in the index files.
struct WrittenSession {
    id: String,
    turns: Vec<serde_json::Value>,
    local: serde_json::Map<String, serde_json::Value>,
    global: serde_json::Map<String, serde_json::Value>,
}

fn write_png<P, C>(
    image: &image::ImageBuffer<P, C>,
    path: &std::path::Path,
) -> crate::data::Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let io = |source| crate::data::DataError::Io {
        path: path.to_path_buf(),
        cause: source,
    };
    let file = std::fs::File::create(path).map_err(io)?;
    let encoder = image::codecs::png::PngEncoder::new_with_quality(
        std::io::BufWriter::new(file),
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    image
        .write_with_encoder(encoder)
        .map_err(|e| crate::data::DataError::Image {
            what: path.display().to_string(),
            message: e.to_string(),
        })
}

fn write_session(
    world: &SynthWorld,
    index: u64,
    images: &std::path::Path,
) -> crate::data::Result<WrittenSession> {
    let id = SynthWorld::session_id(index);
    let turns = world.session_turns(index);
    let dir = images.join(&id);
    std::fs::create_dir_all(&dir).map_err(|source| crate::data::DataError::Io {
        path: dir.clone(),
        cause: source,
    })?;
    let input = format!("{id}-input.png");
    let mut written = WrittenSession {
        id: id.clone(),
        turns: Vec::with_capacity(turns.len()),
        local: serde_json::Map::new(),
        global: serde_json::Map::new(),
    };
    if let Some(first) = turns.first() {
        write_png(&first.turn.source, &dir.join(&input))?;
        written
            .global
            .insert(input.clone(), scene_caption(&first.before).into());
    }
    let mut previous = input;
    for t in &turns {
        let k = t.turn.turn_index;
        let output = format!("{id}-output{k}.png");
        let mask = format!("{id}-mask{k}.png");
        write_png(&t.turn.target, &dir.join(&output))?;
        write_png(&crate::data::mask_to_luma8(&t.turn.mask), &dir.join(&mask))?;
        written.turns.push(serde_json::json!({
            "input": previous,
            "mask": mask,
            "instruction": t.turn.instruction,
            "output": output,
            "edit_kind": t.turn.edit_kind.map(|k| k.as_str()),
            "ambiguous": t.ambiguous,
        }));
        if let Some(text) = &t.turn.local_description {
            written.local.insert(output.clone(), text.clone().into());
        }
        written
            .global
            .insert(output.clone(), scene_caption(&t.after).into());
        previous = output;
    }
    Ok(written)
}

fn write_json(path: &std::path::Path, value: &serde_json::Value) -> crate::data::Result<()> {
    let text = serde_json::to_string(value).map_err(|e| crate::data::DataError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|source| crate::data::DataError::Io {
        path: path.to_path_buf(),
        cause: source,
    })
}

/// Writes sessions `0..count` of `world` to `out` in MagicBrush's folder layout
/// (`images/<id>/…`, `edit_sessions.json` with an extra `edit_kind` and `ambiguous` per turn,
/// `local_descriptions.json`, `global_descriptions.json`), on `threads` threads; `progress` is called
/// once per session written.
pub fn write_folder(
    world: &SynthWorld,
    out: &std::path::Path,
    count: u64,
    threads: usize,
    progress: &(dyn Fn() + Sync),
) -> crate::data::Result<WriteSummary> {
    let images = out.join("images");
    std::fs::create_dir_all(&images).map_err(|source| crate::data::DataError::Io {
        path: images.clone(),
        cause: source,
    })?;
    let threads = threads.max(1) as u64;
    let mut parts: Vec<crate::data::Result<Vec<WrittenSession>>> = Vec::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let images = &images;
                scope.spawn(move || {
                    let mut written = Vec::new();
                    let mut index = t;
                    while index < count {
                        written.push(write_session(world, index, images)?);
                        progress();
                        index += threads;
                    }
                    Ok(written)
                })
            })
            .collect();
        for handle in handles {
            parts.push(handle.join().unwrap_or_else(|_| {
                Err(crate::data::DataError::Invalid {
                    path: out.to_path_buf(),
                    message: "a generator thread panicked".into(),
                })
            }));
        }
    });
    let mut sessions = serde_json::Map::new();
    let mut local = serde_json::Map::new();
    let mut global = serde_json::Map::new();
    let mut turns = 0u64;
    for part in parts {
        for s in part? {
            turns += s.turns.len() as u64;
            sessions.insert(s.id.clone(), s.turns.into());
            local.insert(s.id.clone(), s.local.into());
            global.insert(s.id, s.global.into());
        }
    }
    write_json(&out.join(crate::data::SESSIONS_FILE), &sessions.into())?;
    write_json(
        &out.join(crate::data::LOCAL_DESCRIPTIONS_FILE),
        &local.into(),
    )?;
    write_json(&out.join("global_descriptions.json"), &global.into())?;
    Ok(WriteSummary {
        sessions: count,
        turns,
    })
}
