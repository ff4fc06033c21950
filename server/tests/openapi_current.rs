//! `openapi/openapi.json` must be what the code generates. To refresh it after changing the
//! API: `RL4PIX_UPDATE_OPENAPI=1 cargo test -p rl4pix-server --test openapi_current`.

use std::path::PathBuf;

#[test]
fn committed_openapi_json_is_current() {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../openapi/openapi.json");
    let generated = rl4pix_server::openapi::json();
    if std::env::var_os("RL4PIX_UPDATE_OPENAPI").is_some() {
        std::fs::write(&path, &generated).unwrap();
        return;
    }
    let committed = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        committed == generated,
        "{} is stale; regenerate it with RL4PIX_UPDATE_OPENAPI=1 cargo test -p rl4pix-server --test openapi_current",
        path.display()
    );
    let spec: serde_json::Value = serde_json::from_str(&generated).unwrap();
    assert_eq!(spec["openapi"], "3.1.0");
    for route in [
        "/edit",
        "/attention/{edit_id}",
        "/attention/{edit_id}/tokens",
        "/health",
        "/ready",
        "/info",
        "/metrics",
        "/openapi.json",
        "/docs",
        "/adapters",
        "/adapters/default",
        "/adapters/{name}",
        "/jobs/{id}",
        "/jobs/{id}/events",
        "/jobs/{id}/result",
    ] {
        assert!(
            spec["paths"][route].is_object(),
            "{route} is not documented"
        );
    }
}
