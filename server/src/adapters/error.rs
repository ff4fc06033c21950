//! Why the registry refuses an operation; the service layer says what each means to a client.

/// Why an adapter cannot be served, added, removed or made the default.
#[derive(Debug, Clone, thiserror::Error)]
pub enum AdapterError {
    #[error("{0}")]
    InvalidName(String),
    #[error("no adapter named `{name}`; available: [{available}]")]
    NotFound { name: String, available: String },
    #[error("adapter `{name}` was refused: {reason}")]
    Refused { name: String, reason: String },
    /// Transient: e.g. its file is being written while it had to be read again.
    #[error("adapter `{name}` is not available right now: {reason}")]
    Unavailable { name: String, reason: String },
    #[error("the server has no adapters folder: start it with --adapters DIR (RL4PIX_ADAPTERS)")]
    NoFolder,
    #[error("{0}")]
    PathOutside(String),
    #[error("{0}")]
    MissingFile(String),
    #[error("{0}")]
    Io(String),
}
