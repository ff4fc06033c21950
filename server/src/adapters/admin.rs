//! What admins do with the registry (add a file, remove one, choose the default) and what it
//! reports about its names.

use std::sync::Weak;

use super::error::AdapterError;
use super::files::{read_checked, resolve_inside, write_atomically, ReadFailure};
use super::names::{truncate_for_message, validate_name};
use super::registry::{hold, AdapterRegistry, Failure, NameState, Version};
use super::report::{AdapterInfo, AdapterUsage};

impl AdapterRegistry {
    /// Validates `bytes`, then writes them atomically as `<dir>/<name>.safetensors` and swaps
    /// the new version in. A refused file changes nothing.
    pub fn add_bytes(&self, name: &str, bytes: &[u8]) -> Result<AdapterInfo, AdapterError> {
        validate_name(name).map_err(AdapterError::InvalidName)?;
        let dest = self.writable_path(name)?;
        let adapter = self
            .validate(name, bytes)
            .map_err(|failure| match failure {
                Failure::Refused(reason) => AdapterError::Refused {
                    name: name.to_string(),
                    reason,
                },
                Failure::Transient(reason) => AdapterError::Unavailable {
                    name: name.to_string(),
                    reason,
                },
            })?;
        let lock = self.file_lock(name);
        let _files = hold(&lock);
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
        let source = resolve_inside(self.writable_dir()?, relative)?;
        let dest = self.writable_path(name)?;
        if dest.canonicalize().ok().as_deref() == Some(source.as_path()) {
            let lock = self.file_lock(name);
            let _files = hold(&lock);
            self.read_now_locked(name, "reading it failed; retry in a moment")?;
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
        // Read from the one handle the checks were made on (no second open by path).
        let shown = format!(
            "`{}` in the adapters folder",
            truncate_for_message(relative)
        );
        let bytes =
            read_checked(&source, &shown, self.max_loaded_bytes, None).map_err(|failure| {
                match failure {
                    ReadFailure::Missing => {
                        AdapterError::MissingFile(format!("{shown}: not found"))
                    }
                    ReadFailure::Refused(reason) => AdapterError::Refused {
                        name: name.to_string(),
                        reason,
                    },
                    ReadFailure::Transient(reason) => AdapterError::Io(reason),
                    ReadFailure::Changed => AdapterError::Unavailable {
                        name: name.to_string(),
                        reason: format!("{shown} changed while it was read; retry in a moment"),
                    },
                }
            })?;
        self.add_bytes(name, &bytes)
    }

    /// Deletes the file and forgets the name; admitted requests keep their version. Returns
    /// whether it was the default (which is then cleared).
    pub fn remove(&self, name: &str) -> Result<bool, AdapterError> {
        validate_name(name).map_err(AdapterError::InvalidName)?;
        let path = self.writable_path(name)?;
        let lock = self.file_lock(name);
        let _files = hold(&lock);
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
