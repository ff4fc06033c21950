use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::language::{describes, empty_caption, near_miss_description, object_caption, refer};
use super::scene::{all_cells, random_scene, Colour, Object, Shape, Size};
use super::session::{SynthTurn, SynthWorld};
use crate::data::EditKind;

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
