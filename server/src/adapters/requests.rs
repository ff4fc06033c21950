//! The version a request runs with, read again from its file when it was unloaded.
//!
//! A request that names an unloaded adapter causes a read of its file, so anonymous clients
//! rotating through the names in `/info` could make the server read files and unload adapters
//! in a loop. Reloads caused by requests are therefore:
//! - off the async threads (a blocking task), one at a time per name: concurrent requests for
//!   the same unloaded adapter wait for one read (and share its failure), never start their own;
//! - rate-limited (`--adapter-reloads-per-min`, a token bucket): past it, 503 with Retry-After
//!   and nothing read;
//! - never a reason to unload a protected version: the default adapter, one a request is running
//!   with, or one a request asked for within `--adapter-min-resident-s`. A reload that would
//!   need one of those unloaded is answered 503 with Retry-After (when the protection ends)
//!   instead, so a rotation cannot push out the adapters real traffic uses.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::error::AdapterError;
use super::names::validate_name;
use super::registry::{hold, protected_for, AdapterEntry, AdapterRegistry};

/// What a request's adapter is before any read: the version to run with (None: the base), or
/// the name of an unloaded one.
enum Lookup {
    Ready(Option<Arc<AdapterEntry>>),
    Unloaded(String),
}

impl AdapterRegistry {
    /// The version a request runs with: `None` / `""` / `"default"`: the default adapter (or
    /// the base when there is none); `"none"`: the base; otherwise that name. An unloaded
    /// adapter is read again inline (for callers that are not async; the server uses
    /// [`Self::for_request_async`]), within the same bounds.
    pub fn for_request(
        &self,
        requested: Option<&str>,
    ) -> Result<Option<Arc<AdapterEntry>>, AdapterError> {
        let name = match self.lookup(requested)? {
            Lookup::Ready(entry) => return Ok(entry),
            Lookup::Unloaded(name) => name,
        };
        self.admit_reload(&name)?;
        self.reload(&name).map(Some)
    }

    /// [`Self::for_request`] for the server: a reload runs on a blocking task, one per name
    /// at a time (waiters share its outcome), within the reload bounds.
    pub async fn for_request_async(
        self: &Arc<Self>,
        requested: Option<&str>,
    ) -> Result<Option<Arc<AdapterEntry>>, AdapterError> {
        let name = match self.lookup(requested)? {
            Lookup::Ready(entry) => return Ok(entry),
            Lookup::Unloaded(name) => name,
        };
        let gate = self.reloads.gate(&name);
        let seen = gate.finished.load(Ordering::SeqCst);
        let mut last = gate.last.lock().await;
        if gate.finished.load(Ordering::SeqCst) != seen {
            // A read finished while this request waited: its result is this request's too.
            if let Some(error) = last.clone() {
                return Err(error);
            }
        }
        if let Some(entry) = self.try_hold(&name)? {
            return Ok(Some(entry));
        }
        self.admit_reload(&name)?;
        let registry = self.clone();
        let reading = name.clone();
        let result = tokio::task::spawn_blocking(move || registry.reload(&reading))
            .await
            .unwrap_or_else(|e| {
                Err(AdapterError::Unavailable {
                    name: name.clone(),
                    reason: format!("the reading task failed: {e}"),
                })
            });
        *last = result.as_ref().err().cloned();
        gate.finished.fetch_add(1, Ordering::SeqCst);
        result.map(Some)
    }

    /// What a request's `adapter` field finds without reading a file.
    fn lookup(&self, requested: Option<&str>) -> Result<Lookup, AdapterError> {
        let Some(name) = self.requested_name(requested)? else {
            return Ok(Lookup::Ready(None));
        };
        Ok(match self.try_hold(&name)? {
            Some(entry) => Lookup::Ready(Some(entry)),
            None => Lookup::Unloaded(name),
        })
    }

    /// The name a request's `adapter` field means; None: the base model.
    fn requested_name(&self, requested: Option<&str>) -> Result<Option<String>, AdapterError> {
        Ok(match requested {
            None | Some("") | Some("default") => self.default_name(),
            Some("none") => None,
            Some(name) => {
                validate_name(name).map_err(AdapterError::InvalidName)?;
                Some(name.to_string())
            }
        })
    }

    /// Whether a request may cause a read of `name` now: there is room for it without
    /// unloading a protected version, and the reload rate allows one more.
    fn admit_reload(&self, name: &str) -> Result<(), AdapterError> {
        let throttled = |reason: String, retry_after_s: u64| AdapterError::Throttled {
            name: name.to_string(),
            reason,
            retry_after_s,
        };
        {
            let state = self.lock();
            let Some(needed) = state
                .names
                .get(name)
                .and_then(|ns| ns.current.as_ref())
                .map(|v| v.summary.memory_bytes)
            else {
                return Ok(()); // the read will say what is wrong
            };
            let now = Instant::now();
            let mut count = 0usize;
            let mut bytes = 0u64;
            // What unloading every unprotected version could free; and the soonest end of a
            // protection, for Retry-After.
            let mut freeable = (0usize, 0u64);
            let mut soonest = Duration::MAX;
            for (other, ns) in &state.names {
                let Some(v) = ns.current.as_ref().filter(|v| v.held.is_some()) else {
                    continue;
                };
                count += 1;
                bytes += v.summary.memory_bytes;
                match protected_for(&self.reloads, &state, other, v, now) {
                    None if v.stamp.is_some() && ns.refusal.is_none() => {
                        freeable.0 += 1;
                        freeable.1 += v.summary.memory_bytes;
                    }
                    None => {}
                    Some(left) => soonest = soonest.min(left),
                }
            }
            let fits_count = count + 1 - freeable.0.min(count) <= self.max_loaded;
            let fits_bytes = bytes + needed - freeable.1.min(bytes) <= self.max_loaded_bytes;
            if !(fits_count && fits_bytes) {
                let retry = if soonest == Duration::MAX {
                    60
                } else {
                    soonest.as_secs() + 1
                };
                return Err(throttled(
                    "reading it again would unload adapters in recent use (--max-adapters, \
                     --max-adapter-bytes, --adapter-min-resident-s)"
                        .into(),
                    retry,
                ));
            }
        }
        self.reloads.take().map_err(|retry| {
            throttled(
                "too many adapters read again recently (--adapter-reloads-per-min)".into(),
                retry,
            )
        })
    }

    /// Reads an unloaded version again (blocking file IO and validation).
    fn reload(&self, name: &str) -> Result<Arc<AdapterEntry>, AdapterError> {
        let lock = self.file_lock(name);
        let _files = hold(&lock);
        self.read_now_locked(
            name,
            "reading it failed (tried again, in vain); retry in a moment",
        )?;
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
        v.requested_at = Some(Instant::now());
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
}
