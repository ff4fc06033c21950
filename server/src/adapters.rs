//! The adapters the server can apply, by name. A request pins the entry it was admitted with
//! (an `Arc`), so replacing or removing a name never changes a request already admitted.
//! Hot reload, the admin write routes and LRU unloading build on this registry.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use serde::Serialize;
use utoipa::ToSchema;

use crate::backend::LoadedAdapter;
use crate::config::MAX_ADAPTER_NAME_CHARS;

/// One version of an adapter; `generation` grows with every (re)load of any name.
#[derive(Debug)]
pub struct AdapterEntry {
    pub generation: u64,
    pub adapter: LoadedAdapter,
}

#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterInfo {
    #[schema(example = "mine")]
    pub name: String,
    /// `loaded`, or `refused` with `error` saying why.
    #[schema(example = "loaded")]
    pub status: String,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub target_modules: Vec<String>,
    pub base_fingerprint: Option<String>,
    pub created: Option<String>,
    pub bytes: Option<u64>,
    pub generation: Option<u64>,
    /// Admitted requests that still hold this version.
    pub requests_in_flight: usize,
    pub error: Option<String>,
}

#[derive(Default)]
struct Entries {
    loaded: BTreeMap<String, Arc<AdapterEntry>>,
    refused: BTreeMap<String, String>,
}

#[derive(Default)]
pub struct AdapterRegistry {
    entries: RwLock<Entries>,
    next_generation: AtomicU64,
}

impl AdapterRegistry {
    /// Swaps in a validated adapter under its name.
    pub fn insert(&self, adapter: LoadedAdapter) -> Arc<AdapterEntry> {
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Arc::new(AdapterEntry {
            generation,
            adapter,
        });
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.refused.remove(&entry.adapter.name);
        entries
            .loaded
            .insert(entry.adapter.name.clone(), entry.clone());
        entry
    }

    /// Records why a file was refused; a loaded version of the same name keeps serving.
    pub fn refuse(&self, name: &str, reason: String) {
        let mut entries = self.entries.write().unwrap_or_else(|e| e.into_inner());
        entries.refused.insert(name.to_string(), reason);
    }

    pub fn get(&self, name: &str) -> Option<Arc<AdapterEntry>> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.loaded.get(name).cloned()
    }

    /// Why `name` was refused, if it was and no version of it is loaded.
    pub fn refusal(&self, name: &str) -> Option<String> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.refused.get(name).cloned()
    }

    pub fn names(&self) -> Vec<String> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        entries.loaded.keys().cloned().collect()
    }

    pub fn list(&self) -> Vec<AdapterInfo> {
        let entries = self.entries.read().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<AdapterInfo> = entries
            .loaded
            .values()
            .map(|e| {
                let a = &e.adapter;
                AdapterInfo {
                    name: a.name.clone(),
                    status: "loaded".into(),
                    rank: Some(a.rank),
                    alpha: Some(a.alpha),
                    target_modules: a.target_modules.clone(),
                    base_fingerprint: a.base_fingerprint.clone(),
                    created: a.created.clone(),
                    bytes: Some(a.file_bytes),
                    generation: Some(e.generation),
                    // The registry's own reference is not a request.
                    requests_in_flight: Arc::strong_count(e) - 1,
                    error: entries.refused.get(&a.name).cloned(),
                }
            })
            .collect();
        for (name, reason) in &entries.refused {
            if !entries.loaded.contains_key(name) {
                out.push(AdapterInfo {
                    name: name.clone(),
                    status: "refused".into(),
                    rank: None,
                    alpha: None,
                    target_modules: vec![],
                    base_fingerprint: None,
                    created: None,
                    bytes: None,
                    generation: None,
                    requests_in_flight: 0,
                    error: Some(reason.clone()),
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        out
    }
}

/// Adapter names are file stems: letters, digits, `-`, `_`, `.`; not starting with `.`.
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
    Ok(())
}

fn truncate_for_message(s: &str) -> String {
    s.chars().take(80).collect()
}

/// `*.safetensors` files directly in `dir`, sorted by name.
pub fn adapter_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    files.sort();
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_file_stems() {
        assert!(validate_name("mine").is_ok());
        assert!(validate_name("rl-v2.1_final").is_ok());
        for bad in ["", "../etc", "a/b", ".hidden", "sp ace", &"x".repeat(65)] {
            assert!(validate_name(bad).is_err(), "{bad:?} accepted");
        }
    }
}
