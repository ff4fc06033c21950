//! Helpers shared by the tests that run the `rl4pix-train` binary.

use std::process::Output;

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// The command failed with a message (not a panic) that mentions every needle.
pub fn assert_clean_failure(o: &Output, needles: &[&str]) {
    let err = stderr(o);
    assert!(!o.status.success(), "expected failure, got success: {err}");
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
    for n in needles {
        assert!(err.contains(n), "message should mention `{n}`: {err}");
    }
}
