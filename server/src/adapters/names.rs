//! What an adapter name may be.

use crate::config::MAX_ADAPTER_NAME_CHARS;

/// `adapter=none` asks for the base model and `/adapters/default` is a route, so neither can
/// name an adapter.
pub const RESERVED_NAMES: [&str; 2] = ["none", "default"];

/// Adapter names are file stems: letters, digits, `-`, `_`, `.`; not starting with `.`; not
/// `none` or `default`.
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
    if RESERVED_NAMES.contains(&name) {
        return Err(format!(
            "`{name}` is reserved (adapter=none asks for the base model, /adapters/default is a route); rename the file"
        ));
    }
    Ok(())
}

pub(crate) fn truncate_for_message(s: &str) -> String {
    s.chars().take(80).collect()
}
