//! Watches `--adapters DIR` (notify: inotify on Linux) and keeps the registry in line with it.
//!
//! Events only say *which names* to look at; what happens is decided from the file itself once
//! it has stopped changing: a name is synced when its `stat` (size, times, inode) is the same
//! `debounce` after its last event. So an editor's write-temp-then-rename, a `cp` over the file
//! or a delete-and-recreate all end as one (re)load of the final file, and a file still being
//! copied is not read half-written. A full rescan runs now and then as well, in case events were
//! lost (queue overflow, network file systems); without a working notify backend it is the
//! only mechanism, run more often.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use notify::{RecursiveMode, Watcher};

use crate::adapters::{adapter_name_of, AdapterRegistry, FileStamp, SyncOutcome};

/// A rescan's cost is one `stat` per file, so it is cheap; events do the real work.
const RESCAN_WITH_EVENTS: Duration = Duration::from_secs(10);
const RESCAN_WITHOUT_EVENTS: Duration = Duration::from_secs(2);

enum Message {
    Fs(notify::Result<notify::Event>),
    Stop,
}

/// Stops watching when dropped.
pub struct AdapterWatcher {
    stop: mpsc::Sender<Message>,
    thread: Option<JoinHandle<()>>,
    // Kept alive for its events; dropped before the thread is joined.
    _watcher: Option<notify::RecommendedWatcher>,
}

/// A name waiting for its file to settle.
struct Pending {
    since: Instant,
    stamp: Option<FileStamp>,
}

impl AdapterWatcher {
    pub fn start(registry: Arc<AdapterRegistry>, debounce: Duration) -> std::io::Result<Self> {
        let dir = registry
            .dir()
            .map(Path::to_path_buf)
            .ok_or_else(|| std::io::Error::other("the registry has no adapters folder"))?;
        let (tx, rx) = mpsc::channel();
        let events = tx.clone();
        let watcher = notify::recommended_watcher(move |event| {
            let _ = events.send(Message::Fs(event));
        })
        .and_then(|mut w| w.watch(&dir, RecursiveMode::NonRecursive).map(|()| w));
        let watcher = match watcher {
            Ok(w) => Some(w),
            Err(e) => {
                tracing::error!(
                    dir = %dir.display(),
                    error = %e,
                    "cannot watch the adapters folder; polling it every {} s instead",
                    RESCAN_WITHOUT_EVENTS.as_secs()
                );
                None
            }
        };
        let rescan_every = if watcher.is_some() {
            RESCAN_WITH_EVENTS
        } else {
            RESCAN_WITHOUT_EVENTS
        };
        let thread = std::thread::Builder::new()
            .name("rl4pix-adapters".into())
            .spawn(move || run(&registry, &dir, &rx, debounce, rescan_every))?;
        Ok(Self {
            stop: tx,
            thread: Some(thread),
            _watcher: watcher,
        })
    }
}

impl Drop for AdapterWatcher {
    fn drop(&mut self) {
        let _ = self.stop.send(Message::Stop);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn run(
    registry: &AdapterRegistry,
    dir: &Path,
    rx: &mpsc::Receiver<Message>,
    debounce: Duration,
    rescan_every: Duration,
) {
    let mut pending: HashMap<String, Pending> = HashMap::new();
    // The first rescan catches changes between the start-up load and the watch.
    let mut next_rescan = Instant::now();
    loop {
        let now = Instant::now();
        let wait = if pending.is_empty() {
            next_rescan.saturating_duration_since(now)
        } else {
            (debounce / 4).clamp(Duration::from_millis(5), Duration::from_millis(100))
        };
        match rx.recv_timeout(wait) {
            Ok(Message::Stop) | Err(RecvTimeoutError::Disconnected) => return,
            Ok(Message::Fs(Ok(event))) => {
                if event.need_rescan() {
                    next_rescan = Instant::now();
                }
                for path in &event.paths {
                    if let Some(name) = event_name(path, dir) {
                        mark(registry, &mut pending, name);
                    }
                }
            }
            Ok(Message::Fs(Err(e))) => {
                tracing::warn!(error = %e, "adapters folder watch error; rescanning");
                next_rescan = Instant::now();
            }
            Err(RecvTimeoutError::Timeout) => {}
        }
        let now = Instant::now();
        if now >= next_rescan {
            for name in registry.candidates() {
                if !pending.contains_key(&name) && !registry.reflects_file(&name) {
                    mark(registry, &mut pending, name);
                }
            }
            next_rescan = now + rescan_every;
        }
        settle(registry, &mut pending, debounce);
    }
}

fn mark(registry: &AdapterRegistry, pending: &mut HashMap<String, Pending>, name: String) {
    let stamp = registry.file_stamp(&name);
    pending.insert(
        name,
        Pending {
            since: Instant::now(),
            stamp,
        },
    );
}

/// Syncs the names whose file has not changed for `debounce`.
fn settle(registry: &AdapterRegistry, pending: &mut HashMap<String, Pending>, debounce: Duration) {
    let now = Instant::now();
    let due: Vec<String> = pending
        .iter()
        .filter(|(_, p)| now.duration_since(p.since) >= debounce)
        .map(|(name, _)| name.clone())
        .collect();
    for name in due {
        let stamp = registry.file_stamp(&name);
        let Some(p) = pending.get_mut(&name) else {
            continue;
        };
        if stamp != p.stamp {
            // Still being written: wait another full period from now.
            *p = Pending { since: now, stamp };
            continue;
        }
        match registry.sync(&name) {
            SyncOutcome::Unstable => {
                *p = Pending {
                    since: Instant::now(),
                    stamp: registry.file_stamp(&name),
                }
            }
            _ => {
                pending.remove(&name);
            }
        }
    }
}

/// Events name paths inside the watched folder; only its adapter files matter.
fn event_name(path: &Path, dir: &Path) -> Option<String> {
    let parent: PathBuf = path.parent()?.to_path_buf();
    if parent != dir && parent.canonicalize().ok().as_deref() != Some(dir) {
        return None;
    }
    adapter_name_of(path)
}
