//! rl4pix-training: data sets, the synthetic world, metrics, evaluation and the offline commands.

pub mod commands;
pub mod data;
pub mod ddpo;
pub mod eval;
pub mod metrics;
pub mod pretrain;
pub mod publish;
pub mod synth;
