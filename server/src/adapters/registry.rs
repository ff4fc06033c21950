//! The registry's state: every name's good version (held in memory or unloaded), its latest
//! refusal and the versions it replaced that requests still pin; reading the folder into it;
//! and the least-recently-used bound on what stays in memory.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};
use std::time::{Duration, Instant};

use rl4pix_model::ModelError;

use super::error::AdapterError;
use super::files::{
    adapter_name_of, read_checked, stat_inside, FileStamp, FileState, ReadFailure,
    ADAPTER_EXTENSION,
};
use super::names::validate_name;
use super::reload_limits::{per_name, ReloadLimits};
use crate::backend::{AdapterLoader, BackendError, LoadedAdapter};
use crate::config::AdapterSettings;

/// Waits between the tries of a read or load that failed transiently (then it is given up
/// for now, not recorded: the next request, upload or rescan tries again).
const TRANSIENT_BACKOFF: [Duration; 3] = [
    Duration::from_millis(50),
    Duration::from_millis(200),
    Duration::from_millis(800),
];

pub const RESERVED_NAMES: [&str; 2] = ["none", "default"];

/// One version of an adapter. `generation` identifies the file version it was read from: it
/// grows with every new file of any name, and stays the same when an unloaded version is read
/// again from its unchanged file.
#[derive(Debug)]
pub struct AdapterEntry {
    pub generation: u64,
    pub adapter: LoadedAdapter,
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
    /// Reading or loading it failed transiently, even after retries; nothing was recorded.
    Failed,
}

/// Why a file was not taken: for good (recorded until the file changes) or for now.
#[derive(Debug)]
pub(super) enum Failure {
    Refused(String),
    Transient(String),
}

#[derive(Debug, Clone)]
pub(super) struct Summary {
    pub(super) rank: usize,
    pub(super) alpha: f64,
    pub(super) target_modules: Vec<String>,
    pub(super) base_fingerprint: Option<String>,
    pub(super) created: Option<String>,
    pub(super) file_bytes: u64,
    pub(super) memory_bytes: u64,
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
pub(super) struct Version {
    pub(super) generation: u64,
    pub(super) summary: Summary,
    /// The file it was read from; None: inserted without one (cannot be read again).
    pub(super) stamp: Option<FileStamp>,
    /// The registry's own reference; None once unloaded.
    pub(super) held: Option<Arc<AdapterEntry>>,
    /// Requests' references; lets an unloaded version that a request still holds be taken back
    /// without reading the file.
    pub(super) pinned: Weak<AdapterEntry>,
    pub(super) last_used: u64,
    /// When a request last asked for it (None: none has since it was loaded).
    pub(super) requested_at: Option<Instant>,
}

pub(super) struct Refusal {
    pub(super) reason: String,
    pub(super) stamp: Option<FileStamp>,
}

#[derive(Default)]
pub(super) struct NameState {
    pub(super) current: Option<Version>,
    pub(super) refusal: Option<Refusal>,
    pub(super) retired: Vec<Weak<AdapterEntry>>,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) names: BTreeMap<String, NameState>,
    pub(super) default: Option<String>,
    clock: u64,
}

impl State {
    pub(super) fn tick(&mut self) -> u64 {
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

    pub(super) fn not_found(&self, name: &str) -> AdapterError {
        AdapterError::NotFound {
            name: name.to_string(),
            available: self.available(),
        }
    }
}

pub struct AdapterRegistry {
    /// Canonical, so that containment checks compare like with like.
    pub(super) dir: Option<PathBuf>,
    pub(super) max_loaded: usize,
    pub(super) max_loaded_bytes: u64,
    loader: OnceLock<Arc<dyn AdapterLoader>>,
    /// The object store the folder mirrors, if it is a store's cache (see `adapter_store`).
    store: OnceLock<String>,
    /// The shipped adapters (`AdapterSettings::read_only`): admin writes and deletes refuse.
    read_only: bool,
    state: Mutex<State>,
    /// One lock per name: reads, writes and deletes of one name's file are serialized, and
    /// different names never wait on each other.
    file_locks: Mutex<HashMap<String, Arc<Mutex<()>>>>,
    next_generation: AtomicU64,
    pub(super) reloads: ReloadLimits,
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
            store: OnceLock::new(),
            read_only: settings.read_only,
            state: Mutex::new(State::default()),
            file_locks: Mutex::new(HashMap::new()),
            next_generation: AtomicU64::new(0),
            reloads: ReloadLimits::new(settings.reloads_per_min, settings.min_resident),
        })
    }

    /// Set once, on the worker thread, when the backend is built.
    pub fn set_loader(&self, loader: Arc<dyn AdapterLoader>) {
        let _ = self.loader.set(loader);
    }

    /// Marks the folder as the cache of an object store: adapters are published there, and
    /// the admin routes that would write or delete files here refuse.
    pub fn set_store(&self, url: String) {
        let _ = self.store.set(url);
    }

    pub fn store(&self) -> Option<&str> {
        self.store.get().map(String::as_str)
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    pub fn max_adapter_bytes(&self) -> u64 {
        self.max_loaded_bytes
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The lock of `name`'s file; hold it with [`hold`].
    pub(super) fn file_lock(&self, name: &str) -> Arc<Mutex<()>> {
        per_name(&self.file_locks, name)
    }

    /// Reads `name`'s file again now (its file lock held by the caller). A read that cannot
    /// finish is `Unavailable`: the file is being written, or reading it failed (`failed`).
    pub(super) fn read_now_locked(&self, name: &str, failed: &str) -> Result<(), AdapterError> {
        let unavailable = |reason: &str| {
            Err(AdapterError::Unavailable {
                name: name.to_string(),
                reason: reason.into(),
            })
        };
        match self.sync_locked(name, true) {
            SyncOutcome::Unstable => unavailable("its file is being written; retry in a moment"),
            SyncOutcome::Failed => unavailable(failed),
            _ => Ok(()),
        }
    }

    /// The folder the admin routes may write to and delete from: one of our own, not an object
    /// store's cache (a file written there reaches one replica) nor the shipped adapters.
    pub fn writable_dir(&self) -> Result<&Path, AdapterError> {
        if let Some(url) = self.store() {
            return Err(AdapterError::InObjectStore(url.to_string()));
        }
        if self.read_only {
            return Err(AdapterError::Shipped);
        }
        self.dir.as_deref().ok_or(AdapterError::NoFolder)
    }

    /// `name`'s file in [`Self::writable_dir`].
    pub(super) fn writable_path(&self, name: &str) -> Result<PathBuf, AdapterError> {
        Ok(self
            .writable_dir()?
            .join(format!("{name}.{ADAPTER_EXTENSION}")))
    }

    pub(super) fn path_of(&self, name: &str) -> Option<PathBuf> {
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

    pub(super) fn stat(&self, name: &str) -> FileState {
        match (&self.dir, self.path_of(name)) {
            (Some(dir), Some(path)) => stat_inside(dir, &path),
            _ => FileState::Missing,
        }
    }

    /// Brings one name in line with its file: loads a new or changed file, records a refusal,
    /// or forgets a removed one.
    pub fn sync(&self, name: &str) -> SyncOutcome {
        let lock = self.file_lock(name);
        let _files = hold(&lock);
        self.sync_locked(name, false)
    }

    /// `reload_unloaded`: also read the file again when it is unchanged but its version was
    /// unloaded (the version keeps its generation).
    pub(super) fn sync_locked(&self, name: &str, reload_unloaded: bool) -> SyncOutcome {
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
        let shown = format!("{name}.{ADAPTER_EXTENSION}");
        let bytes = match with_retries(name, || self.read_file(&path, &shown, stamp)) {
            Ok(bytes) => bytes,
            Err(ReadFailure::Missing) => {
                self.forget(name);
                return SyncOutcome::Removed;
            }
            Err(ReadFailure::Changed) => return SyncOutcome::Unstable,
            Err(ReadFailure::Refused(reason)) => {
                return self.record_refusal(name, reason, Some(stamp))
            }
            Err(ReadFailure::Transient(reason)) => return transient_failure(name, &reason),
        };
        if self.stat(name) != FileState::Present(stamp) {
            return SyncOutcome::Unstable;
        }
        if let Err(reason) = validate_name(name) {
            return self.record_refusal(name, reason, Some(stamp));
        }
        match with_retries(name, || self.validate(name, &bytes)) {
            Ok(adapter) => {
                self.install(adapter, Some(stamp), reuse_generation);
                SyncOutcome::Loaded
            }
            Err(Failure::Refused(reason)) => self.record_refusal(name, reason, Some(stamp)),
            Err(Failure::Transient(reason)) => transient_failure(name, &reason),
        }
    }

    /// The file `stat` saw as `stamp`, read through one handle (a link inside the folder is
    /// resolved first, then the real file opened without following links).
    fn read_file(
        &self,
        path: &Path,
        shown: &str,
        stamp: FileStamp,
    ) -> Result<Vec<u8>, ReadFailure> {
        let real = match path.canonicalize() {
            Ok(real) => real,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadFailure::Missing),
            Err(_) => return Err(ReadFailure::Changed),
        };
        if !self.dir.as_ref().is_some_and(|dir| real.starts_with(dir)) {
            return Err(ReadFailure::Changed);
        }
        read_checked(&real, shown, self.max_loaded_bytes, Some(stamp.inode()))
    }

    /// Parses and checks a whole file against the base, without touching the registry.
    pub(super) fn validate(&self, name: &str, bytes: &[u8]) -> Result<LoadedAdapter, Failure> {
        let loader = self
            .loader
            .get()
            .ok_or_else(|| Failure::Refused("this backend cannot load adapters".to_string()))?;
        let adapter = loader.load_bytes(name, bytes).map_err(|e| {
            if is_transient(&e) {
                Failure::Transient(e.to_string())
            } else {
                Failure::Refused(e.to_string())
            }
        })?;
        if adapter.memory_bytes > self.max_loaded_bytes {
            return Err(Failure::Refused(format!(
                "its weights need {} bytes of memory, more than --max-adapter-bytes {}",
                adapter.memory_bytes, self.max_loaded_bytes
            )));
        }
        Ok(adapter)
    }

    pub(super) fn install(
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
            requested_at: None,
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

    /// Records why a newer version was refused before it reached the folder (an object-store
    /// object over the size limit, never downloaded); a good version keeps serving, and the next
    /// sync of a changed file replaces the refusal.
    pub fn refuse_unread(&self, name: &str, reason: String) {
        let lock = self.file_lock(name);
        let _files = hold(&lock);
        self.record_refusal(name, reason, None);
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
    pub(super) fn forget(&self, name: &str) -> bool {
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
    pub(super) fn enforce_bounds(&self, state: &mut State, keep: &str) {
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
            // Versions in recent use go last (see `requests`: a request's reload never needs them).
            let now = Instant::now();
            let victim = state
                .names
                .iter()
                .filter(|(name, ns)| name.as_str() != keep && ns.refusal.is_none())
                .filter_map(|(name, ns)| {
                    let v = ns.current.as_ref()?;
                    let protected = protected_for(&self.reloads, state, name, v, now).is_some();
                    (v.held.is_some() && v.stamp.is_some())
                        .then(|| (protected, v.last_used, name.clone()))
                })
                .min();
            let Some((_, _, name)) = victim else {
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
}

/// Holds a name's file lock (a panic while it was held leaves nothing half done on disk).
pub(super) fn hold(lock: &Mutex<()>) -> MutexGuard<'_, ()> {
    lock.lock().unwrap_or_else(|e| e.into_inner())
}

/// Errors of the device or the system, not of the file: worth another try.
fn is_transient(e: &BackendError) -> bool {
    matches!(
        e,
        BackendError::Model(ModelError::Candle(_) | ModelError::Io { .. })
    )
}

/// What may pass on its own: a transient read or load failure.
trait MaybeTransient {
    fn transient(&self) -> Option<&str>;
}

impl MaybeTransient for ReadFailure {
    fn transient(&self) -> Option<&str> {
        match self {
            ReadFailure::Transient(reason) => Some(reason),
            _ => None,
        }
    }
}

impl MaybeTransient for Failure {
    fn transient(&self) -> Option<&str> {
        match self {
            Failure::Transient(reason) => Some(reason),
            Failure::Refused(_) => None,
        }
    }
}

/// Runs `attempt` again after each transient failure, with growing waits (blocking: callers
/// run off the async threads).
fn with_retries<T, E: MaybeTransient>(
    name: &str,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut waits = TRANSIENT_BACKOFF.iter();
    loop {
        match attempt() {
            Err(e) => match (e.transient(), waits.next()) {
                (Some(reason), Some(wait)) => {
                    tracing::warn!(adapter = %name, %reason, retry_in_ms = wait.as_millis() as u64, "reading the adapter failed; trying again");
                    std::thread::sleep(*wait);
                }
                _ => return Err(e),
            },
            ok => return ok,
        }
    }
}

fn transient_failure(name: &str, reason: &str) -> SyncOutcome {
    tracing::error!(
        adapter = %name,
        %reason,
        "reading the adapter failed after retries; not recorded as a refusal, it is tried again when next needed"
    );
    SyncOutcome::Failed
}

/// How much longer a request's reload may not unload `v` (the version of `name`): the default
/// and versions in use always, a recently requested one for `--adapter-min-resident-s`.
pub(super) fn protected_for(
    limits: &ReloadLimits,
    state: &State,
    name: &str,
    v: &Version,
    now: Instant,
) -> Option<Duration> {
    let in_use = v.pinned.strong_count() > usize::from(v.held.is_some());
    limits.protected_for(
        state.default.as_deref() == Some(name) || in_use,
        v.requested_at,
        now,
    )
}
