//! Where a trained adapter goes: a file, or an object in the store that serving replicas poll
//! (`--out s3://bucket/prefix/name.safetensors`, `file:///folder/name.safetensors`). The store
//! is opened before training starts, so a wrong URL fails in seconds rather than after hours;
//! the object is written in one PUT, so replicas never see half of it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context};
use object_store::path::Path as StorePath;
use object_store::{ObjectStore, PutPayload};

const EXTENSION: &str = ".safetensors";

pub enum AdapterDestination {
    File(PathBuf),
    Store {
        url: String,
        store: Arc<dyn ObjectStore>,
        key: StorePath,
        staging: tempfile::TempDir,
    },
}

impl AdapterDestination {
    /// A path, or a URL with a scheme (`s3://`, `file://`).
    pub fn parse(out: &Path) -> anyhow::Result<Self> {
        let Some(url) = out.to_str().filter(|s| s.contains("://")) else {
            return Ok(Self::File(out.to_path_buf()));
        };
        let parsed = url::Url::parse(url).with_context(|| format!("--out {url}: not a URL"))?;
        let key = StorePath::from_url_path(parsed.path())
            .with_context(|| format!("--out {url}: not an object path"))?;
        if !key.as_ref().ends_with(EXTENSION) || key.filename() == Some(EXTENSION) {
            bail!(
                "--out {url}: name the adapter object, e.g. s3://bucket/adapters/mine{EXTENSION}"
            );
        }
        let store: Arc<dyn ObjectStore> = match parsed.scheme() {
            // Credentials, region and endpoint from the usual AWS_* variables.
            "s3" | "s3a" => Arc::new(
                object_store::aws::AmazonS3Builder::from_env()
                    .with_url(url)
                    .build()
                    .with_context(|| format!("--out {url}"))?,
            ),
            "file" if parsed.host_str().is_none_or(str::is_empty) => {
                Arc::new(object_store::local::LocalFileSystem::new())
            }
            other => bail!("--out {url}: unsupported scheme `{other}` (a path, s3://bucket/key or file:///path)"),
        };
        let staging = tempfile::Builder::new()
            .prefix("rl4pix-adapter-")
            .tempdir()
            .context("cannot create a staging folder for the adapter")?;
        Ok(Self::Store {
            url: url.to_string(),
            store,
            key,
            staging,
        })
    }

    /// The adapter's name: its file or object stem.
    pub fn adapter_name(&self) -> String {
        let stem = match self {
            Self::File(path) => path.file_stem().map(|n| n.to_string_lossy().into_owned()),
            Self::Store { key, .. } => key
                .filename()
                .and_then(|n| n.strip_suffix(EXTENSION))
                .map(str::to_string),
        };
        stem.filter(|n| !n.is_empty())
            .unwrap_or_else(|| "ddpo".into())
    }

    /// The file to save the adapter to (its folder created); `publish` then puts it in place.
    pub fn local_path(&self) -> anyhow::Result<PathBuf> {
        match self {
            Self::File(path) => {
                if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("{}: cannot create", parent.display()))?;
                }
                Ok(path.clone())
            }
            Self::Store { staging, .. } => Ok(staging
                .path()
                .join(format!("{}{EXTENSION}", self.adapter_name()))),
        }
    }

    /// Uploads the saved file (stores only); returns where the adapter now is.
    pub fn publish(self) -> anyhow::Result<String> {
        let local = self.local_path()?;
        let Self::Store {
            url, store, key, ..
        } = self
        else {
            return Ok(local.display().to_string());
        };
        let bytes =
            std::fs::read(&local).with_context(|| format!("{}: cannot read", local.display()))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the upload runtime")?;
        runtime
            .block_on(store.put(&key, PutPayload::from(bytes)))
            .with_context(|| format!("cannot write the adapter to {url}"))?;
        Ok(url)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_paths_stay_files_and_urls_must_name_an_adapter_object() {
        let file = AdapterDestination::parse(Path::new("runs/x/mine.safetensors")).unwrap();
        assert!(matches!(file, AdapterDestination::File(_)));
        assert_eq!(file.adapter_name(), "mine");
        let err = AdapterDestination::parse(Path::new("file:///tmp/folder/"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("name the adapter object"), "{err}");
        let err = AdapterDestination::parse(Path::new("ftp://host/a.safetensors"))
            .err()
            .unwrap()
            .to_string();
        assert!(err.contains("unsupported scheme"), "{err}");
    }

    #[test]
    fn a_file_url_receives_the_saved_adapter_whole() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("published").join("mine.safetensors");
        let url = format!("file://{}", target.display());
        let destination = AdapterDestination::parse(Path::new(&url)).unwrap();
        assert_eq!(destination.adapter_name(), "mine");
        let local = destination.local_path().unwrap();
        assert!(!local.starts_with(dir.path()), "saved to staging first");
        std::fs::write(&local, b"adapter bytes").unwrap();
        assert_eq!(destination.publish().unwrap(), url);
        assert_eq!(std::fs::read(&target).unwrap(), b"adapter bytes");
    }
}
