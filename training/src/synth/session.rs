//! The seeded generator of multi-turn editing sessions.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::edit::random_edit;
use super::render::{change_mask, render};
use super::scene::{random_scene, Scene};
use crate::data::{Session, Turn};

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
