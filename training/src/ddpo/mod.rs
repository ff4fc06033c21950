//! DDPO (PPO over the denoising chain) fine-tuning of the UNet's LoRA with the InstructRL4Pix
//! reward. Read top to bottom, [`trainer::Trainer::run_epoch`] is the algorithm: sample with
//! log-probs ([`sampler`]) -> reward ([`reward`]) -> per-prompt advantages ([`stat_tracker`]) ->
//! inner epochs of PPO ([`ppo`]) over shuffled timesteps, on LoRA variables only ([`lora`]).
//! See `docs/architecture.md`, "Reward and RL fine-tuning".

pub mod config;
pub mod lora;
pub mod optim;
pub mod plots;
pub mod ppo;
pub mod prompts;
pub mod reward;
pub mod sampler;
pub mod stat_tracker;
pub mod trainer;

use std::path::PathBuf;

pub use config::DdpoConfig;
pub use trainer::{EpochLog, Trainer};

#[derive(Debug, thiserror::Error)]
pub enum DdpoError {
    #[error("config `{key}`: {message}")]
    Config { key: String, message: String },

    // The cause is in the message, not also a `source()`: error chains print each link once.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("checkpoint {}: {message}", path.display())]
    Checkpoint { path: PathBuf, message: String },

    #[error("training stopped at epoch {epoch}: {what} is not finite; {}", match last_checkpoint {
        Some(dir) => format!("the last good checkpoint is {} (resume from it, e.g. with a lower train.learning_rate)", dir.display()),
        None => "no checkpoint was written before it".to_string(),
    })]
    NonFinite {
        what: String,
        epoch: usize,
        last_checkpoint: Option<PathBuf>,
    },

    #[error("data set: {0}")]
    Dataset(String),

    #[error("{0}")]
    Invalid(String),

    #[error("plot {}: {message}", path.display())]
    Plot { path: PathBuf, message: String },

    #[error(transparent)]
    Data(#[from] crate::data::DataError),

    #[error(transparent)]
    Model(#[from] rl4pix_model::ModelError),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DdpoError>;

pub(crate) fn io_error(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> DdpoError + '_ {
    move |source| DdpoError::Io {
        path: path.to_path_buf(),
        cause: source,
    }
}
