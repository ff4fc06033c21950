//! The adapters folder on disk: which entries are adapters, a file's version as `stat` sees
//! it, paths that must stay inside the folder, and writes readers never see half done.

use std::path::{Component, Path, PathBuf};
use std::time::SystemTime;

use super::error::AdapterError;
use super::names::truncate_for_message;

/// The only files the registry reads.
pub const ADAPTER_EXTENSION: &str = "safetensors";

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
    pub(super) fn inode(&self) -> u64 {
        self.inode
    }

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
pub(super) enum FileState {
    Missing,
    Present(FileStamp),
    /// There, but not something we may read (a symlink leaving the folder, a folder, ...).
    Unreadable(String, FileStamp),
}

impl FileState {
    pub(super) fn stamp(&self) -> Option<FileStamp> {
        match self {
            Self::Missing => None,
            Self::Present(s) | Self::Unreadable(_, s) => Some(*s),
        }
    }
}

/// `path` is `<dir>/<name>.safetensors`; a symlink is followed only when it stays inside `dir`.
pub(super) fn stat_inside(dir: &Path, path: &Path) -> FileState {
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
pub(super) fn resolve_inside(dir: &Path, relative: &str) -> Result<PathBuf, AdapterError> {
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
pub(super) fn write_atomically(dest: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = dest.parent().unwrap_or(Path::new("."));
    let file_name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    // Hidden and without the extension: the watcher ignores it.
    let prefix = format!(".{file_name}.upload-");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // What `File::create` would give (the umask applies), not tempfile's private 0600.
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut file = builder.tempfile_in(dir)?;
    file.write_all(bytes)?;
    file.as_file().sync_all()?;
    file.persist(dest).map_err(|e| e.error)?;
    Ok(())
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

/// Why [`read_checked`] read nothing.
#[derive(Debug)]
pub(super) enum ReadFailure {
    Missing,
    /// A definite property of this file (not a regular file, too big, hard-linked, no
    /// permission): recorded as its refusal until the file changes.
    Refused(String),
    /// An I/O error that may pass (EIO, out of descriptors, ...): retried, never recorded.
    Transient(String),
    /// Not the file that was checked by path a moment ago (swapped in between).
    Changed,
}

/// Opens `real` (a canonical path, so its last component is no link) once, with `O_NOFOLLOW`,
/// checks what the open handle is (a regular file with one link, at most `max_bytes`, the inode
/// `expected_inode` when given) and reads it whole from that handle: nothing is opened by path
/// again after the checks, so a file swapped or hard-linked in between cannot slip through.
/// `shown` is how messages name the file (never an absolute path).
pub(super) fn read_checked(
    real: &Path,
    shown: &str,
    max_bytes: u64,
    expected_inode: Option<u64>,
) -> Result<Vec<u8>, ReadFailure> {
    use std::io::Read;
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NOFOLLOW);
    }
    let file = match options.open(real) {
        Ok(file) => file,
        Err(e) => return Err(open_failure(shown, e)),
    };
    let meta = file
        .metadata()
        .map_err(|e| ReadFailure::Transient(format!("cannot stat {shown}: {e}")))?;
    if !meta.is_file() {
        return Err(ReadFailure::Refused(format!(
            "{shown} is not a regular file"
        )));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        if expected_inode.is_some_and(|inode| inode != meta.ino()) {
            return Err(ReadFailure::Changed);
        }
        if meta.nlink() > 1 {
            return Err(ReadFailure::Refused(format!(
                "{shown} has {} hard links; an adapter file must be its only name (a hard link can \
                 make a file from outside the adapters folder look inside it)",
                meta.nlink()
            )));
        }
    }
    #[cfg(not(unix))]
    let _ = expected_inode;
    if meta.len() > max_bytes {
        return Err(ReadFailure::Refused(format!(
            "{shown} is {} bytes, more than --max-adapter-bytes {max_bytes}; not read",
            meta.len()
        )));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    file.take(max_bytes + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| ReadFailure::Transient(format!("cannot read {shown}: {e}")))?;
    if bytes.len() as u64 > max_bytes {
        return Err(ReadFailure::Changed);
    }
    Ok(bytes)
}

fn open_failure(shown: &str, e: std::io::Error) -> ReadFailure {
    use std::io::ErrorKind;
    match e.kind() {
        ErrorKind::NotFound => ReadFailure::Missing,
        ErrorKind::PermissionDenied => {
            ReadFailure::Refused(format!("cannot open {shown}: permission denied"))
        }
        // O_NOFOLLOW met a link where the checked path had a file: it was swapped.
        #[cfg(unix)]
        _ if e.raw_os_error() == Some(libc::ELOOP) => ReadFailure::Changed,
        _ => ReadFailure::Transient(format!("cannot open {shown}: {e}")),
    }
}
