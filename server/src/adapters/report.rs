//! What the registry reports about its names and its memory; the HTTP layer has the wire form.

/// What the registry knows about one name (a row of `GET /adapters`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterInfo {
    pub name: String,
    /// `loaded` (weights in memory), `unloaded` (a good version whose weights were dropped to
    /// stay within `--max-adapters` / `--max-adapter-bytes`; read again on its next request), or
    /// `refused` (no good version; `error` says why).
    pub status: String,
    /// Applied to requests that name no adapter.
    pub default: bool,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub target_modules: Vec<String>,
    /// The base model the adapter was trained on, as written in its file.
    pub base_fingerprint: Option<String>,
    /// Creation time, as written in its file.
    pub created: Option<String>,
    /// Size of the file.
    pub bytes: Option<u64>,
    /// Size of its weights in memory (what `--max-adapter-bytes` counts).
    pub memory_bytes: Option<u64>,
    pub generation: Option<u64>,
    /// Admitted requests (queued or running) pinned to this version.
    pub requests_in_flight: usize,
    /// Admitted requests still pinned to versions this one replaced.
    pub older_versions_in_flight: usize,
    /// Why the newest file of this name was refused; with status `loaded` / `unloaded` the
    /// previous good version keeps serving.
    pub error: Option<String>,
}

/// How full the registry is (for `/info`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterUsage {
    pub loaded: usize,
    pub loaded_bytes: u64,
    pub max_adapters: usize,
    pub max_adapter_bytes: u64,
}
