//! `--adapters s3://bucket/prefix` (also `file:///dir`, and `gs://` with the `gcs` feature):
//! adapters published once to an object store and served by every replica.
//!
//! The store is mirrored into a local cache folder, which the registry then treats like any
//! adapters folder, so the folder's rules hold unchanged: a version is validated whole before
//! it is swapped in, a refused one leaves the previous version serving, admitted requests keep
//! the version they pinned, and an unloaded version is read again from its (cached) file.
//!
//! - An object's version is its ETag (or the store's version id): a poll downloads only objects
//!   whose version changed, and a new version gets a new registry generation.
//! - The listed size is checked before anything is downloaded; an object over
//!   `--max-adapter-bytes` is refused by name without being read.
//! - A failed list or download is transient: nothing changes, it is logged and tried again at
//!   the next poll, and it is never recorded as a refusal. Only a successful full listing can
//!   remove an adapter (its object is gone).
//! - Cached files are replaced by rename, so a read of the cache sees a whole old or a whole new
//!   file.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use object_store::path::Path as StorePath;
use object_store::{ObjectMeta, ObjectStore, RetryConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::adapters::files::ADAPTER_EXTENSION;
use crate::adapters::names::validate_name;
use crate::adapters::{adapter_name_of, AdapterRegistry};

/// A store that fails is retried by the next poll; inside one poll, a few quick tries are
/// enough (object_store's default would keep one request going for three minutes).
const STORE_RETRIES: usize = 3;
const STORE_RETRY_TIMEOUT: Duration = Duration::from_secs(20);

/// Whether `--adapters` names an object store rather than a folder: it has a URL scheme.
pub fn is_store_url(adapters: &FsPath) -> bool {
    adapters
        .to_str()
        .and_then(|s| s.split_once("://"))
        .is_some_and(|(scheme, _)| {
            !scheme.is_empty()
                && scheme
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
        })
}

/// Opens the store a URL names and the prefix inside it. Credentials and endpoints come from
/// the usual environment (`AWS_ACCESS_KEY_ID`, `AWS_REGION`, `AWS_ENDPOINT`,
/// `AWS_ALLOW_HTTP`, ...; `GOOGLE_SERVICE_ACCOUNT` for gs://).
pub fn open_store(url: &str) -> Result<(Arc<dyn ObjectStore>, StorePath), String> {
    let parsed = url::Url::parse(url).map_err(|e| format!("{url}: not a URL: {e}"))?;
    let retry = RetryConfig {
        max_retries: STORE_RETRIES,
        retry_timeout: STORE_RETRY_TIMEOUT,
        ..RetryConfig::default()
    };
    let cannot = |e: object_store::Error| format!("{url}: {e}");
    match parsed.scheme() {
        "s3" | "s3a" => {
            let store = object_store::aws::AmazonS3Builder::from_env()
                .with_url(url)
                .with_retry(retry)
                .build()
                .map_err(cannot)?;
            Ok((Arc::new(store), prefix_of(&parsed)?))
        }
        #[cfg(feature = "gcs")]
        "gs" => {
            let store = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url)
                .with_retry(retry)
                .build()
                .map_err(cannot)?;
            Ok((Arc::new(store), prefix_of(&parsed)?))
        }
        #[cfg(not(feature = "gcs"))]
        "gs" => Err(format!(
            "{url}: this build has no Google Cloud Storage support (build rl4pix-server with --features gcs)"
        )),
        "file" => {
            if parsed.host_str().is_some_and(|h| !h.is_empty()) {
                return Err(format!("{url}: a file URL names a local folder: file:///path"));
            }
            let prefix = StorePath::from_url_path(parsed.path()).map_err(|e| format!("{url}: {e}"))?;
            Ok((Arc::new(object_store::local::LocalFileSystem::new()), prefix))
        }
        other => Err(format!(
            "{url}: unsupported scheme `{other}`; --adapters takes a folder, s3://bucket/prefix, gs://bucket/prefix or file:///folder"
        )),
    }
}

fn prefix_of(url: &url::Url) -> Result<StorePath, String> {
    StorePath::from_url_path(url.path()).map_err(|e| format!("{url}: {e}"))
}

/// What the mirror holds for one name.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mirrored {
    /// The object version the cached file is a copy of.
    version: String,
    /// A newer version that was refused without download (too big); the cached one serves.
    refused: Option<String>,
}

/// What a poll changed, by name; the caller syncs these into the registry.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PollReport {
    /// Downloaded (new or changed objects) or to be looked at again.
    pub changed: Vec<String>,
    /// Objects gone from the store; their cached files were deleted.
    pub removed: Vec<String>,
    /// Refused before download: (name, reason).
    pub refused: Vec<(String, String)>,
    /// Transient failures (list or download), retried at the next poll.
    pub failed: Vec<String>,
}

pub struct StoreMirror {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: StorePath,
    cache_dir: PathBuf,
    max_bytes: u64,
    mirrored: HashMap<String, Mirrored>,
}

impl StoreMirror {
    /// A mirror of `url` into `cache_dir` (created if needed; adapter files already there are
    /// deleted, since nothing says which version they are).
    pub fn open(url: &str, cache_dir: &FsPath, max_bytes: u64) -> Result<Self, String> {
        let (store, prefix) = open_store(url)?;
        std::fs::create_dir_all(cache_dir)
            .map_err(|e| format!("--adapter-cache {}: {e}", cache_dir.display()))?;
        let entries = std::fs::read_dir(cache_dir)
            .map_err(|e| format!("--adapter-cache {}: {e}", cache_dir.display()))?;
        for entry in entries.filter_map(Result::ok) {
            let path = entry.path();
            if adapter_name_of(&path).is_some() || is_our_temporary(&path) {
                std::fs::remove_file(&path)
                    .map_err(|e| format!("cannot clear {}: {e}", path.display()))?;
            }
        }
        Ok(Self {
            url: url.to_string(),
            store,
            prefix,
            cache_dir: cache_dir.to_path_buf(),
            max_bytes,
            mirrored: HashMap::new(),
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn cache_dir(&self) -> &FsPath {
        &self.cache_dir
    }

    fn cached_path(&self, name: &str) -> PathBuf {
        self.cache_dir.join(format!("{name}.{ADAPTER_EXTENSION}"))
    }

    /// Lists the store once and brings the cache in line with it.
    pub async fn poll(&mut self) -> PollReport {
        let mut report = PollReport::default();
        let listed = match self.list().await {
            Ok(listed) => listed,
            Err(e) => {
                tracing::warn!(store = %self.url, error = %e, "cannot list the adapters store; trying again at the next poll");
                report.failed.push(format!("list: {e}"));
                return report;
            }
        };
        let gone: Vec<String> = self
            .mirrored
            .keys()
            .filter(|name| !listed.contains_key(*name))
            .cloned()
            .collect();
        for name in gone {
            match std::fs::remove_file(self.cached_path(&name)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::error!(adapter = %name, error = %e, "cannot delete the cached copy of a removed adapter");
                    report.failed.push(format!("{name}: {e}"));
                    continue;
                }
            }
            self.mirrored.remove(&name);
            report.removed.push(name);
        }
        for (name, meta) in listed {
            let version = version_of(&meta);
            let known = self.mirrored.get(&name).cloned();
            match &known {
                Some(m) if m.version == version => {
                    // Back to the cached version after a refused one: look at it again so the
                    // refusal is cleared.
                    if m.refused.is_some() {
                        self.mirrored.insert(
                            name.clone(),
                            Mirrored {
                                version,
                                refused: None,
                            },
                        );
                        report.changed.push(name);
                    }
                    continue;
                }
                Some(m) if m.refused.as_deref() == Some(version.as_str()) => continue,
                _ => {}
            }
            if meta.size > self.max_bytes {
                let reason = format!(
                    "{} is {} bytes, more than --max-adapter-bytes {}; not downloaded",
                    meta.location, meta.size, self.max_bytes
                );
                tracing::error!(adapter = %name, %reason, "adapter object refused");
                let entry = self.mirrored.entry(name.clone()).or_insert(Mirrored {
                    version: String::new(),
                    refused: None,
                });
                entry.refused = Some(version);
                report.refused.push((name, reason));
                continue;
            }
            match self.download(&name, &meta).await {
                Ok(got_version) => {
                    tracing::info!(adapter = %name, version = %got_version, bytes = meta.size, "adapter object downloaded");
                    self.mirrored.insert(
                        name.clone(),
                        Mirrored {
                            version: got_version,
                            refused: None,
                        },
                    );
                    report.changed.push(name);
                }
                Err(e) => {
                    tracing::warn!(adapter = %name, error = %e, "cannot download the adapter object; trying again at the next poll");
                    report.failed.push(format!("{name}: {e}"));
                }
            }
        }
        report
    }

    /// The adapter objects directly under the prefix, by name.
    async fn list(&self) -> Result<BTreeMap<String, ObjectMeta>, object_store::Error> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let listing = self.store.list_with_delimiter(prefix).await?;
        let mut objects = BTreeMap::new();
        for meta in listing.objects {
            let Some(file_name) = meta.location.filename() else {
                continue;
            };
            let Some(name) = adapter_name_of(FsPath::new(file_name)) else {
                continue;
            };
            if let Err(reason) = validate_name(&name) {
                tracing::warn!(object = %meta.location, %reason, "object ignored: not a usable adapter name");
                continue;
            }
            objects.insert(name, meta);
        }
        Ok(objects)
    }

    /// Downloads one object into the cache (whole, then renamed into place); returns the
    /// version it actually got.
    async fn download(&self, name: &str, listed: &ObjectMeta) -> Result<String, String> {
        let got = self
            .store
            .get(&listed.location)
            .await
            .map_err(|e| e.to_string())?;
        // It may have changed since the listing: the limit holds for what is downloaded.
        if got.meta.size > self.max_bytes {
            return Err(format!(
                "it grew to {} bytes since it was listed, more than --max-adapter-bytes {}",
                got.meta.size, self.max_bytes
            ));
        }
        let version = version_of(&got.meta);
        let mut bytes = Vec::with_capacity(got.meta.size as usize);
        let mut stream = got.into_stream();
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| e.to_string())?;
            if (bytes.len() + chunk.len()) as u64 > self.max_bytes {
                return Err(format!(
                    "more than --max-adapter-bytes {} arrived",
                    self.max_bytes
                ));
            }
            bytes.extend_from_slice(&chunk);
        }
        let dest = self.cached_path(name);
        let dir = self.cache_dir.clone();
        tokio::task::spawn_blocking(move || write_by_rename(&dir, &dest, &bytes))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot write the cached copy: {e}"))?;
        Ok(version)
    }
}

/// ETag when the store gives one, else its version id, else size and time (which the local
/// file store always gives).
fn version_of(meta: &ObjectMeta) -> String {
    meta.e_tag
        .clone()
        .or_else(|| meta.version.clone())
        .unwrap_or_else(|| format!("{}@{}", meta.size, meta.last_modified.to_rfc3339()))
}

const TEMPORARY_PREFIX: &str = ".rl4pix-download-";

fn is_our_temporary(path: &FsPath) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with(TEMPORARY_PREFIX))
}

fn write_by_rename(dir: &FsPath, dest: &FsPath, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut file = tempfile::Builder::new()
        .prefix(TEMPORARY_PREFIX)
        .tempfile_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(dest).map_err(|e| e.error)?;
    Ok(())
}

/// Applies a poll's changes to the registry (the same validate-then-swap as the folder).
pub fn apply(registry: &AdapterRegistry, report: &PollReport) {
    for name in report.changed.iter().chain(&report.removed) {
        registry.sync(name);
    }
    for (name, reason) in &report.refused {
        registry.refuse_unread(name, reason.clone());
    }
}

/// Polls the store every `interval` until dropped.
pub struct StorePoller {
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl StorePoller {
    pub fn start(
        mut mirror: StoreMirror,
        registry: Arc<AdapterRegistry>,
        interval: Duration,
    ) -> Self {
        let (stop, mut stopped) = watch::channel(false);
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = tokio::time::sleep(interval) => {}
                    _ = stopped.changed() => return,
                }
                let report = mirror.poll().await;
                if report.changed.is_empty()
                    && report.removed.is_empty()
                    && report.refused.is_empty()
                {
                    continue;
                }
                let registry = registry.clone();
                // Validation parses whole files: off the async workers.
                let _ = tokio::task::spawn_blocking(move || apply(&registry, &report)).await;
            }
        });
        Self {
            stop,
            task: Some(task),
        }
    }
}

impl Drop for StorePoller {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_and_folders_are_told_apart() {
        assert!(is_store_url(FsPath::new("s3://bucket/prefix")));
        assert!(is_store_url(FsPath::new("file:///tmp/adapters")));
        assert!(is_store_url(FsPath::new("gs://bucket")));
        assert!(!is_store_url(FsPath::new("/srv/adapters")));
        assert!(!is_store_url(FsPath::new("adapters")));
        assert!(!is_store_url(FsPath::new("weird dir/://x")));
    }

    #[test]
    fn bad_urls_say_what_is_accepted() {
        let err = open_store("ftp://host/x").err().unwrap();
        assert!(err.contains("unsupported scheme `ftp`"), "{err}");
        let err = open_store("file://host/x").err().unwrap();
        assert!(err.contains("file:///path"), "{err}");
    }
}
