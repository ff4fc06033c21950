//! What every handler gets: the service, the admin key and the API document.

use std::sync::Arc;

use std::time::Duration;

use super::hosts::HostPolicy;
use crate::service::Service;

pub struct AppState {
    pub service: Arc<Service>,
    /// Bearer token of the admin routes; None: they are closed.
    pub api_key: Option<String>,
    /// Bearer the OpenAI-compatible `/v1` routes need; None: any or none.
    pub openai_api_key: Option<String>,
    /// Served at `/openapi.json`.
    pub openapi_json: String,
    /// Which Host headers are answered (`--allowed-hosts`).
    pub hosts: HostPolicy,
    /// From a request's head to the end of its body (`--body-timeout-s`).
    pub body_timeout: Duration,
}
