//! One module per `rl4pix-train` subcommand: its clap arguments and its `run`.

pub mod ddpo;
pub mod edit;
pub mod eval;
pub mod pretrain;
pub mod pretrain_clip;
pub mod pretrain_vae;
pub mod reproduce;
pub mod reward_audit;
pub mod synth;
