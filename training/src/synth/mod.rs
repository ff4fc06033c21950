//! The synthetic world: small scenes of coloured shapes on a 3x3 grid and the paper's
//! four kinds of edit on them, rendered exactly, with a mask of the changed region, an instruction
//! (several phrasings, some deliberately ambiguous about *where*), a local description for CLIP-T and
//! the edit kind.
//!
//! Everything is drawn from a ChaCha stream chosen by (seed, session index), so a session is the same
//! on every platform and independent of how many threads generate the set.
//!
//! What the world contains and why: `docs/architecture.md`, "The synthetic world".
//!
//! [`scene`] holds the objects and scenes, [`edit`] the four edit kinds on them, [`language`]
//! every sentence (instructions, descriptions, captions), [`render`] the rasteriser and masks,
//! [`session`] the seeded generator of sessions, [`magicbrush`] the writer of a MagicBrush-style
//! folder.

mod edit;
mod language;
mod magicbrush;
mod render;
mod scene;
mod session;
#[cfg(test)]
mod tests;

pub use edit::{random_edit, Edit};
pub use language::{describes, near_miss_description, scene_caption};
pub use magicbrush::{write_folder, WriteSummary};
pub use render::{change_mask, render};
pub use scene::{random_scene, Background, Colour, Object, Scene, Shape, Size};
pub use session::{SynthTurn, SynthWorld};

pub const DEFAULT_SIZE: u32 = 32;
