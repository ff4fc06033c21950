//! The paper's four kinds of edit on a scene, with their instruction, local description and the
//! objects they change.

use rand::seq::IndexedRandom;
use rand::Rng;

use super::language::{
    article, empty_caption, new_object_phrase, object_caption, pick, position_phrase, refer,
};
use super::scene::{empty_cells, random_object, Colour, Object, Scene, Shape, Size};
use crate::data::EditKind;

/// Scenes never grow beyond this many objects, so insertions always have room to be told apart.
const MAX_OBJECTS: usize = 5;

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

pub(super) fn feasible_kinds(scene: &Scene) -> Vec<EditKind> {
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

pub(super) fn neighbour(cell: (usize, usize), dr: isize, dc: isize) -> Option<(usize, usize)> {
    let r = cell.0.checked_add_signed(dr)?;
    let c = cell.1.checked_add_signed(dc)?;
    (r < 3 && c < 3).then_some((r, c))
}

/// Where to insert and how to say it: an absolute place, a relation to an object ("above the
/// blue square"), or on purpose an ambiguous one ("next to the blue square", "in a corner").
pub(super) fn insertion_place<R: Rng>(
    scene: &Scene,
    rng: &mut R,
) -> ((usize, usize), String, bool) {
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

/// The edit that makes object `index` of `scene` into `new`.
fn object_changed(
    kind: EditKind,
    mut scene: Scene,
    index: usize,
    new: Object,
    instruction: String,
) -> Edit {
    let old = std::mem::replace(&mut scene.objects[index], new);
    Edit {
        kind,
        instruction,
        local_description: object_caption(&new),
        result: scene,
        changed: vec![old, new],
        ambiguous: false,
    }
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
            object_changed(kind, result, index, new, instruction)
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
            object_changed(kind, result, index, new, instruction)
        }
    };
    Some(edit)
}
