//! The registry against a fake loader on real files.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rl4pix_model::lora::ResolvedAdapter;
use rl4pix_model::ModelError;

use super::error::AdapterError;
use super::files::{adapter_name_of, write_atomically};
use super::names::validate_name;
use super::registry::{AdapterRegistry, SyncOutcome};
use crate::backend::{AdapterLoader, BackendError, LoadedAdapter};
use crate::config::AdapterSettings;

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
        read_only: false,
        max_adapters,
        max_adapter_bytes,
        debounce: Duration::from_millis(10),
        reloads_per_min: 1000,
        min_resident: Duration::ZERO,
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

#[cfg(unix)]
#[test]
fn atomic_writes_get_the_permissions_a_plain_create_would() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain.safetensors");
    std::fs::write(&plain, b"ok 1").unwrap();
    let atomic = dir.path().join("atomic.safetensors");
    write_atomically(&atomic, b"ok 2").unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&atomic), mode(&plain));
    assert_eq!(std::fs::read(&atomic).unwrap(), b"ok 2");
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "no temporary file is left behind");
}

/// Fails with a device error (`Candle`) while `failures` lasts, then loads like [`FakeLoader`].
struct FlakyLoader {
    failures: std::sync::atomic::AtomicUsize,
    calls: std::sync::atomic::AtomicUsize,
}

impl AdapterLoader for FlakyLoader {
    fn load_bytes(&self, name: &str, bytes: &[u8]) -> Result<LoadedAdapter, BackendError> {
        use std::sync::atomic::Ordering;
        self.calls.fetch_add(1, Ordering::SeqCst);
        let left = self.failures.load(Ordering::SeqCst);
        if left > 0 {
            self.failures.store(left - 1, Ordering::SeqCst);
            return Err(BackendError::Model(ModelError::Candle(
                candle_core::Error::Msg("device busy".into()),
            )));
        }
        FakeLoader.load_bytes(name, bytes)
    }
}

#[test]
fn a_transient_load_error_is_retried_and_never_recorded_as_a_refusal() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "a", "ok 10");
    let r = registry(dir.path(), 4, 1000);
    let flaky = Arc::new(FlakyLoader {
        failures: AtomicUsize::new(2),
        calls: AtomicUsize::new(0),
    });
    // The registry's loader is set once; a fresh registry takes the flaky one.
    let r = {
        drop(r);
        let fresh = AdapterRegistry::new(&AdapterSettings {
            dir: Some(dir.path().to_path_buf()),
            read_only: false,
            max_adapters: 4,
            max_adapter_bytes: 1000,
            debounce: Duration::from_millis(10),
            reloads_per_min: 1000,
            min_resident: Duration::ZERO,
        })
        .unwrap();
        fresh.set_loader(flaky.clone());
        fresh
    };
    // Two device errors, then success: one sync, retried with backoff.
    assert_eq!(r.sync("a"), SyncOutcome::Loaded);
    assert_eq!(flaky.calls.load(Ordering::SeqCst), 3);
    assert_eq!(status(&r, "a"), "loaded");

    // Errors beyond the retries: nothing recorded, the next sync of the same file reads it.
    write(dir.path(), "b", "ok 10");
    flaky.failures.store(100, Ordering::SeqCst);
    assert_eq!(r.sync("b"), SyncOutcome::Failed);
    assert!(
        r.refusal("b").is_none(),
        "a transient failure is no refusal"
    );
    assert!(
        !r.reflects_file("b"),
        "the watcher's rescan will try it again"
    );
    flaky.failures.store(0, Ordering::SeqCst);
    assert_eq!(r.sync("b"), SyncOutcome::Loaded);
    assert!(r.for_request(Some("b")).unwrap().is_some());

    // A definite validation failure is recorded, and not retried.
    write(dir.path(), "c", "garbage");
    let before = flaky.calls.load(Ordering::SeqCst);
    assert_eq!(r.sync("c"), SyncOutcome::Refused);
    assert_eq!(flaky.calls.load(Ordering::SeqCst), before + 1);
    assert!(r.refusal("c").unwrap().contains("not an adapter"));
}

#[test]
fn a_file_over_the_size_limit_is_refused_from_its_metadata_without_being_read() {
    let dir = tempfile::tempdir().unwrap();
    let r = registry(dir.path(), 4, 1000);
    // Sparse: 64 GiB on paper, nothing on disk. Reading it would exhaust memory.
    let huge = std::fs::File::create(dir.path().join("huge.safetensors")).unwrap();
    huge.set_len(64 << 30).unwrap();
    assert_eq!(r.sync("huge"), SyncOutcome::Refused);
    let reason = r.refusal("huge").unwrap();
    assert!(
        reason.contains("more than --max-adapter-bytes 1000") && reason.contains("not read"),
        "{reason}"
    );
    assert!(
        !reason.contains(&dir.path().display().to_string()),
        "no absolute path: {reason}"
    );
}

#[test]
fn the_shipped_folder_is_served_but_never_written_or_deleted() {
    let dir = tempfile::tempdir().unwrap();
    write(dir.path(), "shipped", "ok 10");
    let r = AdapterRegistry::new(&AdapterSettings {
        dir: Some(dir.path().to_path_buf()),
        read_only: true,
        max_adapters: 4,
        max_adapter_bytes: 1000,
        debounce: Duration::from_millis(10),
        reloads_per_min: 1000,
        min_resident: Duration::ZERO,
    })
    .unwrap();
    r.set_loader(Arc::new(FakeLoader));
    r.load_folder();
    assert_eq!(status(&r, "shipped"), "loaded");
    assert!(matches!(
        r.add_bytes("new", b"ok 5"),
        Err(AdapterError::Shipped)
    ));
    assert!(matches!(
        r.add_from_path("copy", "shipped.safetensors"),
        Err(AdapterError::Shipped)
    ));
    assert!(matches!(r.remove("shipped"), Err(AdapterError::Shipped)));
    assert!(dir.path().join("shipped.safetensors").is_file());
    assert!(!dir.path().join("new.safetensors").exists());
}
