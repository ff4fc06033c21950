//! One error enum for the model crate; binaries and the server map it to exit codes / HTTP statuses.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{}: file not found", path.display())]
    MissingFile { path: PathBuf },

    // The cause is in the message, not also a `source()`: error chains print each link once.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{}: invalid config: {message}", file.display())]
    Config { file: PathBuf, message: String },

    #[error("{}: unsupported value for `{key}`: {value}", file.display())]
    Unsupported {
        file: PathBuf,
        key: String,
        value: String,
    },

    #[error("tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    #[error("weights {}: {message}", path.display())]
    Weights { path: PathBuf, message: String },

    #[error("tokenizer: {0}")]
    Tokenizer(String),

    #[error("adapter {name}: {reason}")]
    Adapter { name: String, reason: String },

    #[error("image: {0}")]
    Image(String),

    #[error("cancelled")]
    Cancelled,

    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;
