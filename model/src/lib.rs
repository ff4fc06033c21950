//! rl4pix-model: InstructPix2Pix in Candle.
//!
//! Loads the diffusers on-disk layout (`model_index.json`, `unet/`, `vae/`, `text_encoder/`,
//! `tokenizer/`, `scheduler/`) and edits images exactly as diffusers'
//! `StableDiffusionInstructPix2PixPipeline` does. Everything architectural comes from the config
//! files. See `docs/architecture.md`, "The model".

pub mod config;
pub mod error;
pub mod weights;

/// Full CLIP (vision + text + projections) for the CLIP-T metric.
pub mod clip;
pub mod text_encoder;
pub mod tokenizer;

pub mod resnet;
pub mod sampling;
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
pub mod image_io;
pub mod pipeline;

pub use error::{ModelError, Result};
