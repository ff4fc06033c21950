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
    /// A request would need an unloaded adapter read again, and reloads are over their rate or
    /// would unload versions in recent use; nothing was read.
    #[error("adapter `{name}` is not loaded and cannot be read again right now: {reason}; retry in {retry_after_s} s")]
    Throttled {
        name: String,
        reason: String,
        retry_after_s: u64,
    },
    #[error("the server has no adapters folder: start it with --adapters DIR (RL4PIX_ADAPTERS)")]
    NoFolder,
    /// The folder mirrors an object store: a file written here would reach one replica only.
    #[error("adapters are published to {0}, which every replica polls: write the object there (an upload here would reach only this replica)")]
    InObjectStore(String),
    /// The adapters shipped with the default model: part of the installation, not a workspace.
    #[error("the server serves the adapters shipped with the default model, which are read-only: start it with --adapters DIR to add or remove adapters")]
    Shipped,
    #[error("{0}")]
    PathOutside(String),
    #[error("{0}")]
    MissingFile(String),
    #[error("{0}")]
    Io(String),
}
