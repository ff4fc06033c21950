//! rl4pix-model: InstructPix2Pix in Candle.
//!
//! Loads the diffusers on-disk layout (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
//! `tokenizer/`, `scheduler/`) and edits images exactly as diffusers'
//! `StableDiffusionInstructPix2PixPipeline` does. Everything architectural comes from the config
//! files. See `docs/architecture.md`, "The model".

pub mod config;
pub mod device;
pub mod error;
pub mod weights;

/// Full CLIP (vision + text + projections) for the CLIP-T metric.
pub mod clip;
pub mod text_encoder;
pub mod tokenizer;

/// The UNet's and VAE's down- and up-sampling layers (strided conv, nearest upsampling + conv).
pub mod resample;
pub mod resnet;
pub mod vae;

pub mod attention;
pub mod embeddings;
pub mod lora;
pub mod unet;
pub mod unet_blocks;

pub mod scheduler;

/// Fused CPU kernels (custom ops with backward) behind the UNet's layers.
pub mod ops;

pub mod adapter;
/// Atomic whole-file writes (temporary file + rename) for everything the crates write.
pub mod atomic_file;
pub mod image_io;
pub mod pipeline;

pub use error::{ModelError, Result};

/// The embedded default model (`model/assets/toy`, diffusers layout), found from where this
/// crate's sources are rather than from the current directory, so every binary finds it from
/// anywhere. An error names the folder when it is not there (a build from a copy without
/// `model/assets`).
pub fn default_model_dir() -> Result<std::path::PathBuf> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/toy");
    let index = dir.join("model_index.json");
    if index.is_file() {
        Ok(dir)
    } else {
        Err(ModelError::MissingFile { path: index })
    }
}

/// The RL-fine-tuned adapter shipped for the default model, beside it in
/// `model/assets/adapters` (its `rl4pix.base_fingerprint` is the default UNet's); the server
/// applies it by default.
pub const SHIPPED_DEFAULT_ADAPTER: &str = "toy-rl";
