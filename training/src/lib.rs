//! rl4pix-training: data sets, the synthetic world, metrics, evaluation and the offline commands.

pub mod commands;
pub mod data;
pub mod ddpo;
pub mod eval;
pub mod metrics;
/// AdamW with saved moments, gradient clipping and EMA weights, for every training loop.
pub mod optim;
/// PNG charts of training curves with an embedded font.
pub mod plots;
pub mod pretrain;
pub mod publish;
pub mod synth;
