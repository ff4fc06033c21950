//! Every sentence of the world: places, referring expressions, descriptions and captions, and
//! whether a description fits a scene.

use rand::seq::IndexedRandom;
use rand::Rng;

use super::scene::{random_cell, random_object, Background, Colour, Object, Scene, Shape, Size};

pub(super) fn cell_name(cell: (usize, usize)) -> &'static str {
    const NAMES: [[&str; 3]; 3] = [
        ["top left", "top center", "top right"],
        ["middle left", "center", "middle right"],
        ["bottom left", "bottom center", "bottom right"],
    ];
    NAMES[cell.0][cell.1]
}

/// A phrase placing something in `cell`, in one of a few phrasings.
pub(super) fn position_phrase<R: Rng>(cell: (usize, usize), rng: &mut R) -> String {
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

pub(super) fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// "a small red circle" / "a red circle" (large is the default size, so it is often left unsaid).
pub(super) fn new_object_phrase<R: Rng>(object: &Object, rng: &mut R) -> String {
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
pub(super) fn object_caption(object: &Object) -> String {
    format!(
        "a {} {} {} in the {}",
        object.size.name(),
        object.colour.name(),
        object.shape.name(),
        cell_name(object.cell)
    )
}

/// The local description of a cell a removal emptied.
pub(super) fn empty_caption(cell: (usize, usize)) -> String {
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

/// A referring expression ("the circle", "the red circle", "the small red circle",
/// "the red circle in the top left") that picks `objects[index]` out of the scene unambiguously:
/// the shortest unique one, or sometimes a longer unique one.
pub(super) fn refer<R: Rng>(objects: &[Object], index: usize, rng: &mut R) -> String {
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

pub(super) fn pick<R: Rng>(rng: &mut R, phrasings: &[&'static str]) -> &'static str {
    phrasings.choose(rng).copied().unwrap_or(phrasings[0])
}
