//! The adapters the server can apply, by name (the file stem in `--adapters DIR`).
//!
//! - A request pins the version it was admitted with (an `Arc<AdapterEntry>`): replacing or
//!   removing a name never changes or fails a request already admitted, and a version is only
//!   ever swapped in whole, after validation.
//! - A file that fails validation is refused with its reason (logged, listed, named in the error
//!   a request for it gets); the previous good version of that name keeps serving.
//! - At most `--max-adapters` versions and `--max-adapter-bytes` of weights are held; past that
//!   the least recently used is unloaded and read from its (unchanged) file again when next
//!   requested. A version whose file has since changed to something refused cannot be read
//!   again, so it is never unloaded.
//!
//! Every read of the folder (start, watcher, uploads, reloads) goes through `file_lock`, so they
//! never race on one name; the in-memory state has its own short-held lock.

use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::SystemTime;

use serde::Serialize;
use utoipa::ToSchema;

use crate::backend::{AdapterLoader, LoadedAdapter};
use crate::config::{AdapterSettings, MAX_ADAPTER_NAME_CHARS};

/// The only files the registry reads.
pub const ADAPTER_EXTENSION: &str = "safetensors";
/// `adapter=none` asks for the base model and `/adapters/default` is a route, so neither can
/// name an adapter.
pub const RESERVED_NAMES: [&str; 2] = ["none", "default"];

/// One version of an adapter. `generation` identifies the file version it was read from: it
/// grows with every new file of any name, and stays the same when an unloaded version is read
/// again from its unchanged file.
#[derive(Debug)]
pub struct AdapterEntry {
    pub generation: u64,
    pub adapter: LoadedAdapter,
}

/// A row of `GET /adapters`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterInfo {
    #[schema(example = "mine")]
    pub name: String,
    /// `loaded` (weights in memory), `unloaded` (a good version whose weights were dropped to
    /// stay within `--max-adapters` / `--max-adapter-bytes`; read again on its next request), or
    /// `refused` (no good version; `error` says why).
    #[schema(example = "loaded")]
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

/// How full the registry is, for `/info`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterUsage {
    pub loaded: usize,
    pub loaded_bytes: u64,
    pub max_adapters: usize,
    pub max_adapter_bytes: u64,
}

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

/// A file's identity and content version as far as `stat` can tell: a rename-over changes the
/// inode, an in-place write the size or the modification / change times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileStamp {
    len: u64,
    modified: Option<SystemTime>,
    inode: u64,
    changed_ns: i128,
}

impl FileStamp {
    fn of(meta: &std::fs::Metadata) -> Self {
        #[cfg(unix)]
        let (inode, changed_ns) = {
            use std::os::unix::fs::MetadataExt;
            (
                meta.ino(),
                meta.ctime() as i128 * 1_000_000_000 + meta.ctime_nsec() as i128,
            )
        };
        #[cfg(not(unix))]
        let (inode, changed_ns) = (0, 0);
        Self {
            len: meta.len(),
            modified: meta.modified().ok(),
            inode,
            changed_ns,
        }
    }
}

/// What `stat` says about `<dir>/<name>.safetensors`.
#[derive(Debug, Clone, PartialEq)]
enum FileState {
    Missing,
    Present(FileStamp),
    /// There, but not something we may read (a symlink leaving the folder, a folder, ...).
    Unreadable(String, FileStamp),
}

impl FileState {
    fn stamp(&self) -> Option<FileStamp> {
        match self {
            Self::Missing => None,
            Self::Present(s) | Self::Unreadable(_, s) => Some(*s),
        }
    }
}

/// What a sync of one name did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncOutcome {
    Unchanged,
    Loaded,
    Refused,
    Removed,
    /// The file changed while it was read; try again once it is stable.
    Unstable,
}

#[derive(Debug, Clone)]
struct Summary {
    rank: usize,
    alpha: f64,
    target_modules: Vec<String>,
    base_fingerprint: Option<String>,
    created: Option<String>,
    file_bytes: u64,
    memory_bytes: u64,
}

impl Summary {
    fn of(a: &LoadedAdapter) -> Self {
        Self {
            rank: a.rank,
            alpha: a.alpha,
            target_modules: a.target_modules.clone(),
            base_fingerprint: a.base_fingerprint.clone(),
            created: a.created.clone(),
            file_bytes: a.file_bytes,
            memory_bytes: a.memory_bytes,
        }
    }
}

/// The good version of a name.
struct Version {
    generation: u64,
    summary: Summary,
    /// The file it was read from; None: inserted without one (cannot be read again).
    stamp: Option<FileStamp>,
    /// The registry's own reference; None once unloaded.
    held: Option<Arc<AdapterEntry>>,
    /// Requests' references; lets an unloaded version that a request still holds be taken back
    /// without reading the file.
    pinned: Weak<AdapterEntry>,
    last_used: u64,
}

struct Refusal {
    reason: String,
    stamp: Option<FileStamp>,
}

#[derive(Default)]
struct NameState {
    current: Option<Version>,
    refusal: Option<Refusal>,
    retired: Vec<Weak<AdapterEntry>>,
}

#[derive(Default)]
struct State {
    names: BTreeMap<String, NameState>,
    default: Option<String>,
    clock: u64,
}

impl State {
    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    fn available(&self) -> String {
        self.names
            .iter()
            .filter(|(_, ns)| ns.current.is_some())
            .map(|(name, _)| name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn not_found(&self, name: &str) -> AdapterError {
        AdapterError::NotFound {
            name: name.to_string(),
            available: self.available(),
        }
    }
}

pub struct AdapterRegistry {
    /// Canonical, so that containment checks compare like with like.
    dir: Option<PathBuf>,
    max_loaded: usize,
    max_loaded_bytes: u64,
    loader: OnceLock<Arc<dyn AdapterLoader>>,
    state: Mutex<State>,
    file_lock: Mutex<()>,
    next_generation: AtomicU64,
}

impl AdapterRegistry {
    /// A registry for `settings.dir` (checked to be a folder); nothing is read yet.
    pub fn new(settings: &AdapterSettings) -> Result<Self, String> {
        let dir = match &settings.dir {
            None => None,
            Some(dir) => {
                let canonical = dir
                    .canonicalize()
                    .map_err(|e| format!("--adapters {}: {e}", dir.display()))?;
                if !canonical.is_dir() {
                    return Err(format!("--adapters {}: not a folder", dir.display()));
                }
                Some(canonical)
            }
        };
        Ok(Self {
            dir,
            max_loaded: settings.max_adapters.max(1),
            max_loaded_bytes: settings.max_adapter_bytes.max(1),
            loader: OnceLock::new(),
            state: Mutex::new(State::default()),
            file_lock: Mutex::new(()),
            next_generation: AtomicU64::new(0),
        })
    }

    /// Set once, on the worker thread, when the backend is built.
    pub fn set_loader(&self, loader: Arc<dyn AdapterLoader>) {
        let _ = self.loader.set(loader);
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn max_adapter_bytes(&self) -> u64 {
        self.max_loaded_bytes
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn lock_files(&self) -> MutexGuard<'_, ()> {
        self.file_lock.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn path_of(&self, name: &str) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|dir| dir.join(format!("{name}.{ADAPTER_EXTENSION}")))
    }

    // ---- the folder ----

    /// Reads every adapter file of the folder (at start, and on a watcher rescan).
    pub fn load_folder(&self) {
        for name in self.candidates() {
            self.sync(&name);
        }
    }

    /// Names with a file in the folder, plus names the registry knows (whose file may be gone).
    pub fn candidates(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().names.keys().cloned().collect();
        if let Some(dir) = &self.dir {
            match std::fs::read_dir(dir) {
                Ok(entries) => names.extend(
                    entries
                        .filter_map(|e| e.ok())
                        .filter_map(|e| adapter_name_of(&e.path())),
                ),
                Err(e) => {
                    tracing::error!(dir = %dir.display(), error = %e, "cannot list the adapters folder")
                }
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// The file's stamp now (None: no file), for the watcher's "is it still changing" check.
    pub fn file_stamp(&self, name: &str) -> Option<FileStamp> {
        self.stat(name).stamp()
    }

    /// Whether the registry already reflects the file as it is now (nothing to sync).
    pub fn reflects_file(&self, name: &str) -> bool {
        let stamp = self.file_stamp(name);
        let state = self.lock();
        match (state.names.get(name), stamp) {
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some(ns), Some(stamp)) => {
                ns.refusal.as_ref().is_some_and(|r| r.stamp == Some(stamp))
                    || (ns.refusal.is_none()
                        && ns.current.as_ref().is_some_and(|v| v.stamp == Some(stamp)))
            }
        }
    }

    fn stat(&self, name: &str) -> FileState {
        match (&self.dir, self.path_of(name)) {
            (Some(dir), Some(path)) => stat_inside(dir, &path),
            _ => FileState::Missing,
        }
    }

    /// Brings one name in line with its file: loads a new or changed file, records a refusal,
    /// or forgets a removed one.
    pub fn sync(&self, name: &str) -> SyncOutcome {
        let _files = self.lock_files();
        self.sync_locked(name, false)
    }

    /// `reload_unloaded`: also read the file again when it is unchanged but its version was
    /// unloaded (the version keeps its generation).
    fn sync_locked(&self, name: &str, reload_unloaded: bool) -> SyncOutcome {
        let Some(path) = self.path_of(name) else {
            return SyncOutcome::Unchanged;
        };
        let stamp = match self.stat(name) {
            FileState::Missing => {
                self.forget(name);
                return SyncOutcome::Removed;
            }
            FileState::Unreadable(reason, stamp) => {
                return self.record_refusal(name, reason, Some(stamp));
            }
            FileState::Present(stamp) => stamp,
        };
        let reuse_generation = {
            let mut state = self.lock();
            let ns = state.names.get_mut(name);
            if ns
                .as_ref()
                .and_then(|ns| ns.refusal.as_ref())
                .is_some_and(|r| r.stamp == Some(stamp))
            {
                return SyncOutcome::Unchanged;
            }
            match ns {
                Some(NameState {
                    current: Some(v),
                    refusal,
                    ..
                }) if v.stamp == Some(stamp) => {
                    if refusal.take().is_some() {
                        tracing::info!(adapter = %name, "the serving version's file is back; refusal cleared");
                    }
                    if !reload_unloaded || v.held.is_some() || v.pinned.strong_count() > 0 {
                        return SyncOutcome::Unchanged;
                    }
                    Some(v.generation)
                }
                _ => None,
            }
        };
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                self.forget(name);
                return SyncOutcome::Removed;
            }
            Err(e) => {
                let reason = format!("cannot read {}: {e}", path.display());
                return self.record_refusal(name, reason, Some(stamp));
            }
        };
        if self.stat(name) != FileState::Present(stamp) {
            return SyncOutcome::Unstable;
        }
        if let Err(reason) = validate_name(name) {
            return self.record_refusal(name, reason, Some(stamp));
        }
        match self.validate(name, &bytes) {
            Ok(adapter) => {
                self.install(adapter, Some(stamp), reuse_generation);
                SyncOutcome::Loaded
            }
            Err(reason) => self.record_refusal(name, reason, Some(stamp)),
        }
    }

    /// Parses and checks a whole file against the base, without touching the registry.
    fn validate(&self, name: &str, bytes: &[u8]) -> Result<LoadedAdapter, String> {
        let loader = self
            .loader
            .get()
            .ok_or_else(|| "this backend cannot load adapters".to_string())?;
        let adapter = loader.load_bytes(name, bytes).map_err(|e| e.to_string())?;
        if adapter.memory_bytes > self.max_loaded_bytes {
            return Err(format!(
                "its weights need {} bytes of memory, more than --max-adapter-bytes {}",
                adapter.memory_bytes, self.max_loaded_bytes
            ));
        }
        Ok(adapter)
    }

    fn install(
        &self,
        adapter: LoadedAdapter,
        stamp: Option<FileStamp>,
        reuse_generation: Option<u64>,
    ) -> Arc<AdapterEntry> {
        let generation = reuse_generation
            .unwrap_or_else(|| self.next_generation.fetch_add(1, Ordering::Relaxed) + 1);
        let name = adapter.name.clone();
        let summary = Summary::of(&adapter);
        let entry = Arc::new(AdapterEntry {
            generation,
            adapter,
        });
        let mut state = self.lock();
        let last_used = state.tick();
        let ns = state.names.entry(name.clone()).or_default();
        if let Some(old) = ns.current.take() {
            if old.generation != generation {
                ns.retired.push(old.pinned);
            }
        }
        ns.retired.retain(|w| w.strong_count() > 0);
        ns.current = Some(Version {
            generation,
            summary: summary.clone(),
            stamp,
            held: Some(entry.clone()),
            pinned: Arc::downgrade(&entry),
            last_used,
        });
        ns.refusal = None;
        if reuse_generation.is_some() {
            tracing::info!(adapter = %name, generation, "adapter read again from its file");
        } else {
            tracing::info!(
                adapter = %name,
                generation,
                rank = summary.rank,
                alpha = summary.alpha,
                bytes = summary.file_bytes,
                "adapter loaded"
            );
        }
        self.enforce_bounds(&mut state, &name);
        entry
    }

    fn record_refusal(&self, name: &str, reason: String, stamp: Option<FileStamp>) -> SyncOutcome {
        let mut state = self.lock();
        let ns = state.names.entry(name.to_string()).or_default();
        match &ns.current {
            Some(v) => tracing::error!(
                adapter = %name,
                %reason,
                serving_generation = v.generation,
                "adapter file refused; the previous version keeps serving"
            ),
            None => tracing::error!(adapter = %name, %reason, "adapter file refused"),
        }
        ns.refusal = Some(Refusal { reason, stamp });
        SyncOutcome::Refused
    }

    /// Drops a name whose file is gone; admitted requests keep their version.
    fn forget(&self, name: &str) -> bool {
        let mut state = self.lock();
        if state.names.remove(name).is_some() {
            tracing::info!(adapter = %name, "adapter removed; admitted requests keep their version");
        }
        if state.default.as_deref() == Some(name) {
            state.default = None;
            tracing::warn!(adapter = %name, "the default adapter was removed; requests without `adapter` now use the base model");
            return true;
        }
        false
    }

    /// Unloads least recently used versions until the bounds hold. `keep` (just loaded or just
    /// requested) stays; so does any version that could not be read again.
    fn enforce_bounds(&self, state: &mut State, keep: &str) {
        loop {
            let held = state
                .names
                .values()
                .filter_map(|ns| ns.current.as_ref())
                .filter(|v| v.held.is_some());
            let (count, bytes) = held.fold((0usize, 0u64), |(c, b), v| {
                (c + 1, b + v.summary.memory_bytes)
            });
            if count <= self.max_loaded && bytes <= self.max_loaded_bytes {
                return;
            }
            let victim = state
                .names
                .iter()
                .filter(|(name, ns)| name.as_str() != keep && ns.refusal.is_none())
                .filter_map(|(name, ns)| {
                    let v = ns.current.as_ref()?;
                    (v.held.is_some() && v.stamp.is_some()).then(|| (v.last_used, name.clone()))
                })
                .min();
            let Some((_, name)) = victim else {
                tracing::warn!(
                    loaded = count,
                    bytes,
                    "adapters over --max-adapters / --max-adapter-bytes, and none can be unloaded"
                );
                return;
            };
            if let Some(v) = state
                .names
                .get_mut(&name)
                .and_then(|ns| ns.current.as_mut())
            {
                v.held = None;
                tracing::info!(
                    adapter = %name,
                    generation = v.generation,
                    "adapter unloaded (least recently used); it is read again when next requested"
                );
            }
        }
    }

    // ---- requests ----

    /// The version a request runs with: `None` / `""` / `"default"`: the default adapter (or
    /// the base when there is none); `"none"`: the base; otherwise that name. May read an
    /// unloaded adapter's file again.
    pub fn for_request(
        &self,
        requested: Option<&str>,
    ) -> Result<Option<Arc<AdapterEntry>>, AdapterError> {
        let name = match requested {
            None | Some("") | Some("default") => match self.default_name() {
                Some(name) => name,
                None => return Ok(None),
            },
            Some("none") => return Ok(None),
            Some(name) => {
                validate_name(name).map_err(AdapterError::InvalidName)?;
                name.to_string()
            }
        };
        self.acquire(&name).map(Some)
    }

    fn acquire(&self, name: &str) -> Result<Arc<AdapterEntry>, AdapterError> {
        if let Some(entry) = self.try_hold(name)? {
            return Ok(entry);
        }
        // Unloaded: read it again (blocking file IO, off the async workers' backs).
        in_blocking_section(|| {
            let _files = self.lock_files();
            if self.sync_locked(name, true) == SyncOutcome::Unstable {
                return Err(AdapterError::Unavailable {
                    name: name.to_string(),
                    reason: "its file is being written; retry in a moment".into(),
                });
            }
            self.try_hold(name)?.ok_or_else(|| {
                let state = self.lock();
                match state.names.get(name).and_then(|ns| ns.refusal.as_ref()) {
                    Some(r) => AdapterError::Refused {
                        name: name.to_string(),
                        reason: r.reason.clone(),
                    },
                    None => AdapterError::Unavailable {
                        name: name.to_string(),
                        reason: "it was unloaded and could not be read again".into(),
                    },
                }
            })
        })
    }

    /// The held (or still pinned) current version, marked as just used; Ok(None): unloaded.
    fn try_hold(&self, name: &str) -> Result<Option<Arc<AdapterEntry>>, AdapterError> {
        let mut state = self.lock();
        let now = state.tick();
        let Some(ns) = state.names.get_mut(name) else {
            return Err(state.not_found(name));
        };
        let Some(v) = ns.current.as_mut() else {
            return Err(match &ns.refusal {
                Some(r) => AdapterError::Refused {
                    name: name.to_string(),
                    reason: r.reason.clone(),
                },
                None => state.not_found(name),
            });
        };
        v.last_used = now;
        if let Some(entry) = &v.held {
            return Ok(Some(entry.clone()));
        }
        let Some(entry) = v.pinned.upgrade() else {
            return Ok(None);
        };
        v.held = Some(entry.clone());
        self.enforce_bounds(&mut state, name);
        Ok(Some(entry))
    }

    // ---- admin ----

    /// Validates `bytes`, then writes them atomically as `<dir>/<name>.safetensors` and swaps
    /// the new version in. A refused file changes nothing.
    pub fn add_bytes(&self, name: &str, bytes: &[u8]) -> Result<AdapterInfo, AdapterError> {
        validate_name(name).map_err(AdapterError::InvalidName)?;
        let dest = self.path_of(name).ok_or(AdapterError::NoFolder)?;
        let adapter = self
            .validate(name, bytes)
            .map_err(|reason| AdapterError::Refused {
                name: name.to_string(),
                reason,
            })?;
        let _files = self.lock_files();
        write_atomically(&dest, bytes)
            .map_err(|e| AdapterError::Io(format!("cannot write {}: {e}", dest.display())))?;
        let stamp = self.stat(name).stamp();
        self.install(adapter, stamp, None);
        self.info(name).ok_or_else(|| self.lock().not_found(name))
    }

    /// Adds the file at `relative` (inside the adapters folder) under `name`: copied to
    /// `<name>.safetensors` unless it is that file already, which is then read now.
    pub fn add_from_path(&self, name: &str, relative: &str) -> Result<AdapterInfo, AdapterError> {
        validate_name(name).map_err(AdapterError::InvalidName)?;
        let dir = self.dir.as_ref().ok_or(AdapterError::NoFolder)?;
        let source = resolve_inside(dir, relative)?;
        let dest = self.path_of(name).ok_or(AdapterError::NoFolder)?;
        if dest.canonicalize().ok().as_deref() == Some(source.as_path()) {
            let _files = self.lock_files();
            if self.sync_locked(name, true) == SyncOutcome::Unstable {
                return Err(AdapterError::Unavailable {
                    name: name.to_string(),
                    reason: "its file is being written; retry in a moment".into(),
                });
            }
            let state = self.lock();
            let ns = state.names.get(name).ok_or_else(|| state.not_found(name))?;
            if let Some(r) = &ns.refusal {
                return Err(AdapterError::Refused {
                    name: name.to_string(),
                    reason: r.reason.clone(),
                });
            }
            drop(state);
            return self.info(name).ok_or_else(|| self.lock().not_found(name));
        }
        let bytes = std::fs::read(&source).map_err(|e| {
            AdapterError::Io(format!(
                "cannot read `{relative}` in the adapters folder: {e}"
            ))
        })?;
        self.add_bytes(name, &bytes)
    }

    /// Deletes the file and forgets the name; admitted requests keep their version. Returns
    /// whether it was the default (which is then cleared).
    pub fn remove(&self, name: &str) -> Result<bool, AdapterError> {
        validate_name(name).map_err(AdapterError::InvalidName)?;
        let path = self.path_of(name).ok_or(AdapterError::NoFolder)?;
        let _files = self.lock_files();
        let had_file = match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => {
                return Err(AdapterError::Io(format!(
                    "cannot delete {}: {e}",
                    path.display()
                )))
            }
        };
        if !had_file && !self.lock().names.contains_key(name) {
            return Err(self.lock().not_found(name));
        }
        Ok(self.forget(name))
    }

    /// Sets (a name with a good version) or clears the default adapter.
    pub fn set_default(&self, name: Option<&str>) -> Result<Option<String>, AdapterError> {
        let mut state = self.lock();
        if let Some(name) = name {
            validate_name(name).map_err(AdapterError::InvalidName)?;
            let ns = state.names.get(name).ok_or_else(|| state.not_found(name))?;
            if ns.current.is_none() {
                return Err(match &ns.refusal {
                    Some(r) => AdapterError::Refused {
                        name: name.to_string(),
                        reason: r.reason.clone(),
                    },
                    None => state.not_found(name),
                });
            }
        }
        state.default = name.map(str::to_string);
        tracing::info!(
            default = state.default.as_deref().unwrap_or("none (the base model)"),
            "default adapter set"
        );
        Ok(state.default.clone())
    }

    pub fn default_name(&self) -> Option<String> {
        self.lock().default.clone()
    }

    /// Names a request may ask for (loaded or unloaded good versions).
    pub fn names(&self) -> Vec<String> {
        let state = self.lock();
        state
            .names
            .iter()
            .filter(|(_, ns)| ns.current.is_some())
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn usage(&self) -> AdapterUsage {
        let state = self.lock();
        let held: Vec<&Version> = state
            .names
            .values()
            .filter_map(|ns| ns.current.as_ref())
            .filter(|v| v.held.is_some())
            .collect();
        AdapterUsage {
            loaded: held.len(),
            loaded_bytes: held.iter().map(|v| v.summary.memory_bytes).sum(),
            max_adapters: self.max_loaded,
            max_adapter_bytes: self.max_loaded_bytes,
        }
    }

    pub fn info(&self, name: &str) -> Option<AdapterInfo> {
        let state = self.lock();
        let ns = state.names.get(name)?;
        describe(name, ns, state.default.as_deref() == Some(name))
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        let state = self.lock();
        state
            .names
            .iter()
            .filter_map(|(name, ns)| describe(name, ns, state.default.as_deref() == Some(name)))
            .collect()
    }

    // ---- without a file ----

    /// Swaps in an already validated adapter that has no file to read again (it is never
    /// unloaded).
    pub fn insert(&self, adapter: LoadedAdapter) -> Arc<AdapterEntry> {
        self.install(adapter, None, None)
    }

    /// Records why an adapter was refused; a loaded version of the same name keeps serving.
    pub fn refuse(&self, name: &str, reason: String) {
        self.record_refusal(name, reason, None);
    }

    /// The version held in memory now, if any (no file is read; not marked as used).
    pub fn get(&self, name: &str) -> Option<Arc<AdapterEntry>> {
        let state = self.lock();
        state.names.get(name)?.current.as_ref()?.held.clone()
    }

    /// Why `name`'s newest file was refused, if it was.
    pub fn refusal(&self, name: &str) -> Option<String> {
        let state = self.lock();
        Some(state.names.get(name)?.refusal.as_ref()?.reason.clone())
    }
}

fn describe(name: &str, ns: &NameState, default: bool) -> Option<AdapterInfo> {
    let older_versions_in_flight = ns.retired.iter().map(Weak::strong_count).sum();
    let error = ns.refusal.as_ref().map(|r| r.reason.clone());
    let info = match &ns.current {
        Some(v) => {
            let s = &v.summary;
            AdapterInfo {
                name: name.to_string(),
                status: if v.held.is_some() {
                    "loaded"
                } else {
                    "unloaded"
                }
                .into(),
                default,
                rank: Some(s.rank),
                alpha: Some(s.alpha),
                target_modules: s.target_modules.clone(),
                base_fingerprint: s.base_fingerprint.clone(),
                created: s.created.clone(),
                bytes: Some(s.file_bytes),
                memory_bytes: Some(s.memory_bytes),
                generation: Some(v.generation),
                // The registry's own reference is not a request.
                requests_in_flight: v.pinned.strong_count() - usize::from(v.held.is_some()),
                older_versions_in_flight,
                error,
            }
        }
        None => AdapterInfo {
            name: name.to_string(),
            status: "refused".into(),
            default,
            rank: None,
            alpha: None,
            target_modules: vec![],
            base_fingerprint: None,
            created: None,
            bytes: None,
            memory_bytes: None,
            generation: None,
            requests_in_flight: 0,
            older_versions_in_flight,
            error: Some(error?),
        },
    };
    Some(info)
}

/// Runs blocking work from async code without stalling the runtime's other tasks.
fn in_blocking_section<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current() {
        Ok(handle) if handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread => {
            tokio::task::block_in_place(f)
        }
        _ => f(),
    }
}

/// `path` is `<dir>/<name>.safetensors`; a symlink is followed only when it stays inside `dir`.
fn stat_inside(dir: &Path, path: &Path) -> FileState {
    let link = match std::fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return FileState::Missing,
        Err(e) => {
            return FileState::Unreadable(
                format!("cannot stat {}: {e}", path.display()),
                FileStamp {
                    len: 0,
                    modified: None,
                    inode: 0,
                    changed_ns: 0,
                },
            )
        }
    };
    let link_stamp = FileStamp::of(&link);
    let meta = if link.file_type().is_symlink() {
        match path.canonicalize() {
            Ok(real) if real.starts_with(dir) => match std::fs::metadata(&real) {
                Ok(meta) => meta,
                Err(e) => {
                    return FileState::Unreadable(
                        format!("cannot stat {}: {e}", real.display()),
                        link_stamp,
                    )
                }
            },
            Ok(real) => {
                return FileState::Unreadable(
                    format!(
                        "{} is a symlink to {}, outside the adapters folder",
                        path.display(),
                        real.display()
                    ),
                    link_stamp,
                )
            }
            Err(e) => {
                return FileState::Unreadable(
                    format!("{} is a broken symlink: {e}", path.display()),
                    link_stamp,
                )
            }
        }
    } else {
        link
    };
    if !meta.is_file() {
        return FileState::Unreadable(
            format!("{} is not a regular file", path.display()),
            FileStamp::of(&meta),
        );
    }
    FileState::Present(FileStamp::of(&meta))
}

/// A path given by an admin, relative to the adapters folder: no absolute paths, no `..`, and
/// its real location (after symlinks) must be a file inside the folder.
fn resolve_inside(dir: &Path, relative: &str) -> Result<PathBuf, AdapterError> {
    let rel = Path::new(relative);
    let plain = rel
        .components()
        .all(|c| matches!(c, Component::Normal(_) | Component::CurDir));
    if relative.is_empty() || rel.is_absolute() || !plain {
        return Err(AdapterError::PathOutside(format!(
            "`path` must be a relative path inside the adapters folder, without `..`; got {:?}",
            truncate_for_message(relative)
        )));
    }
    let real = dir.join(rel).canonicalize().map_err(|e| {
        AdapterError::MissingFile(format!(
            "`{}` in the adapters folder: {e}",
            truncate_for_message(relative)
        ))
    })?;
    if !real.starts_with(dir) {
        return Err(AdapterError::PathOutside(format!(
            "`{}` leads outside the adapters folder (through a symlink)",
            truncate_for_message(relative)
        )));
    }
    if !real.is_file() {
        return Err(AdapterError::MissingFile(format!(
            "`{}` in the adapters folder is not a file",
            truncate_for_message(relative)
        )));
    }
    Ok(real)
}

/// A temporary file beside `dest`, synced, then renamed over it: readers (and the watcher) see
/// the old file or the new one, never a part.
fn write_atomically(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let dir = dest.parent().unwrap_or(Path::new("."));
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Hidden and without the extension: the watcher ignores it.
    let tmp = dir.join(format!(
        ".{file_name}.upload-{}-{}.tmp",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    ));
    let written = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dest)
    })();
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The adapter name of a folder entry: the stem of a visible `*.safetensors` file. Hidden files
/// (editors' and our own temporaries) are not adapters.
pub fn adapter_name_of(path: &Path) -> Option<String> {
    let file_name = path.file_name()?.to_str()?;
    if file_name.starts_with('.') {
        return None;
    }
    let stem = file_name.strip_suffix(&format!(".{ADAPTER_EXTENSION}"))?;
    (!stem.is_empty()).then(|| stem.to_string())
}

/// Adapter names are file stems: letters, digits, `-`, `_`, `.`; not starting with `.`; not
/// `none` or `default`.
pub fn validate_name(name: &str) -> Result<(), String> {
    let ok_chars = name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if name.is_empty() || name.len() > MAX_ADAPTER_NAME_CHARS || !ok_chars || name.starts_with('.')
    {
        return Err(format!(
            "adapter name must be 1-{MAX_ADAPTER_NAME_CHARS} characters of letters, digits, '-', '_' or '.' (not starting with '.'), got {:?}",
            truncate_for_message(name)
        ));
    }
    if RESERVED_NAMES.contains(&name) {
        return Err(format!(
            "`{name}` is reserved (adapter=none asks for the base model, /adapters/default is a route); rename the file"
        ));
    }
    Ok(())
}

fn truncate_for_message(s: &str) -> String {
    s.chars().take(80).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::BackendError;
    use rl4pix_model::lora::ResolvedAdapter;
    use rl4pix_model::ModelError;
    use std::time::Duration;

    /// Accepts files that read `ok <memory bytes>`; refuses anything else.
    struct FakeLoader;

    impl AdapterLoader for FakeLoader {
        fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<LoadedAdapter, BackendError> {
            let text = std::str::from_utf8(bytes).unwrap_or("");
            let memory_bytes = text
                .strip_prefix("ok ")
                .and_then(|n| n.trim().parse::<u64>().ok())
                .ok_or_else(|| {
                    BackendError::Model(ModelError::Adapter {
                        name: name.to_string(),
                        reason: "not an adapter".into(),
                    })
                })?;
            Ok(LoadedAdapter {
                name: name.to_string(),
                resolved: Arc::new(ResolvedAdapter {
                    name: name.to_string(),
                    deltas: vec![],
                }),
                rank: 1,
                alpha: 1.0,
                target_modules: vec![],
                base_fingerprint: None,
                created: None,
                file_bytes: bytes.len() as u64,
                memory_bytes,
            })
        }
    }

    fn registry(dir: &Path, max_adapters: usize, max_adapter_bytes: u64) -> AdapterRegistry {
        let registry = AdapterRegistry::new(&AdapterSettings {
            dir: Some(dir.to_path_buf()),
            max_adapters,
            max_adapter_bytes,
            debounce: Duration::from_millis(10),
        })
        .unwrap();
        registry.set_loader(Arc::new(FakeLoader));
        registry
    }

    fn write(dir: &Path, name: &str, text: &str) {
        write_atomically(&dir.join(format!("{name}.safetensors")), text.as_bytes()).unwrap();
    }

    fn status(r: &AdapterRegistry, name: &str) -> String {
        r.info(name).map(|i| i.status).unwrap_or_default()
    }

    #[test]
    fn names_are_plain_file_stems() {
        assert!(validate_name("mine").is_ok());
        assert!(validate_name("rl-v2.1_final").is_ok());
        for bad in [
            "",
            "../etc",
            "a/b",
            ".hidden",
            "sp ace",
            "none",
            "default",
            &"x".repeat(65),
        ] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
        assert_eq!(
            adapter_name_of(Path::new("/a/mine.safetensors")).as_deref(),
            Some("mine")
        );
        for ignored in [
            "/a/.mine.safetensors.upload-1-2.tmp",
            "/a/mine.safetensors~",
            "/a/.mine.safetensors",
            "/a/4913",
        ] {
            assert_eq!(adapter_name_of(Path::new(ignored)), None, "{ignored}");
        }
    }

    #[test]
    fn a_refused_file_keeps_the_previous_version_serving_and_a_removed_one_goes() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "a", "ok 10");
        let r = registry(dir.path(), 8, 1000);
        r.load_folder();
        let first = r.for_request(Some("a")).unwrap().unwrap();
        write(dir.path(), "a", "garbage");
        assert_eq!(r.sync("a"), SyncOutcome::Refused);
        assert_eq!(r.sync("a"), SyncOutcome::Unchanged, "refused once");
        let still = r.for_request(Some("a")).unwrap().unwrap();
        assert_eq!(still.generation, first.generation);
        let info = r.info("a").unwrap();
        assert_eq!(info.status, "loaded");
        assert!(info.error.unwrap().contains("not an adapter"));
        assert_eq!(info.requests_in_flight, 2, "two pinned requests");

        write(dir.path(), "a", "ok 11");
        assert_eq!(r.sync("a"), SyncOutcome::Loaded);
        let second = r.for_request(Some("a")).unwrap().unwrap();
        assert!(second.generation > first.generation);
        let info = r.info("a").unwrap();
        assert_eq!((info.error, info.older_versions_in_flight), (None, 2));

        r.set_default(Some("a")).unwrap();
        assert_eq!(
            r.for_request(None).unwrap().unwrap().generation,
            second.generation
        );
        std::fs::remove_file(dir.path().join("a.safetensors")).unwrap();
        assert_eq!(r.sync("a"), SyncOutcome::Removed);
        assert!(matches!(
            r.for_request(Some("a")),
            Err(AdapterError::NotFound { .. })
        ));
        assert!(r.for_request(None).unwrap().is_none(), "default cleared");
        assert_eq!(first.adapter.name, "a", "pinned versions stay usable");

        write(dir.path(), "broken", "garbage");
        r.load_folder();
        let err = r.for_request(Some("broken")).unwrap_err().to_string();
        assert!(
            err.contains("was refused") && err.contains("not an adapter"),
            "{err}"
        );
    }

    #[test]
    fn least_recently_used_adapters_are_unloaded_and_read_again_on_request() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["a", "b", "c"] {
            write(dir.path(), name, "ok 10");
        }
        let r = registry(dir.path(), 2, 1000);
        r.load_folder();
        assert_eq!(
            [status(&r, "a"), status(&r, "b"), status(&r, "c")],
            ["unloaded", "loaded", "loaded"]
        );
        let a_generation = r.info("a").unwrap().generation;
        let a = r.for_request(Some("a")).unwrap().unwrap();
        assert_eq!(
            Some(a.generation),
            a_generation,
            "same file, same generation"
        );
        assert_eq!(
            [status(&r, "a"), status(&r, "b"), status(&r, "c")],
            ["loaded", "unloaded", "loaded"]
        );
        assert_eq!(r.usage().loaded, 2);

        // The byte bound: 25 bytes hold two of 10.
        let r = registry(dir.path(), 8, 25);
        r.load_folder();
        assert_eq!(r.usage().loaded, 2);
        assert_eq!(r.usage().loaded_bytes, 20);
        write(dir.path(), "huge", "ok 26");
        assert_eq!(r.sync("huge"), SyncOutcome::Refused);
        assert!(r.refusal("huge").unwrap().contains("--max-adapter-bytes"));
    }

    #[test]
    fn admin_paths_stay_inside_the_folder() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("x.safetensors"), "ok 1").unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("incoming")).unwrap();
        std::fs::write(dir.path().join("incoming/new.bin"), "ok 1").unwrap();
        let r = registry(dir.path(), 8, 1000);
        let escapes = [
            "../x.safetensors".to_string(),
            outside.path().join("x.safetensors").display().to_string(),
            "incoming/../../x.safetensors".into(),
        ];
        for path in &escapes {
            assert!(
                matches!(
                    r.add_from_path("x", path),
                    Err(AdapterError::PathOutside(_))
                ),
                "{path}"
            );
        }
        #[cfg(unix)]
        {
            std::os::unix::fs::symlink(
                outside.path().join("x.safetensors"),
                dir.path().join("link.safetensors"),
            )
            .unwrap();
            assert!(matches!(
                r.add_from_path("x", "link.safetensors"),
                Err(AdapterError::PathOutside(_))
            ));
            r.load_folder();
            assert_eq!(status(&r, "link"), "refused", "the watcher refuses it too");
        }
        let info = r.add_from_path("fresh", "incoming/new.bin").unwrap();
        assert_eq!(info.status, "loaded");
        assert!(dir.path().join("fresh.safetensors").is_file());
        assert!(matches!(
            r.add_bytes("bad", b"garbage"),
            Err(AdapterError::Refused { .. })
        ));
        assert!(
            !dir.path().join("bad.safetensors").exists(),
            "nothing written"
        );
        assert!(!r.remove("fresh").unwrap(), "it was not the default");
        assert!(!dir.path().join("fresh.safetensors").exists());
        assert!(matches!(
            r.remove("fresh"),
            Err(AdapterError::NotFound { .. })
        ));
    }
}
