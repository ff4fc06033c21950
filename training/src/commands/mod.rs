//! One module per `rl4pix-train` subcommand: its clap arguments and its `run`.

pub mod edit;
pub mod eval;
pub mod synth;
