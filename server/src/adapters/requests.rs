//! The version a request runs with, read again from its file when it was unloaded.

use std::sync::Arc;

use super::error::AdapterError;
use super::names::validate_name;
use super::registry::{AdapterEntry, AdapterRegistry, SyncOutcome};

impl AdapterRegistry {
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
