//! Health, readiness, info, metrics, the OpenAPI document and the docs page.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use crate::adapters::AdapterUsage;
use crate::backend::BackendInfo;
use crate::config::{BatchingConfig, Limits};
use crate::error::{ApiError, ErrorBody};

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"status": "ok"}))]
pub struct StatusBody {
    pub status: String,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct InfoResponse {
    #[schema(example = "0.1.0")]
    pub version: String,
    pub model: BackendInfo,
    pub limits: Limits,
    pub batching: BatchingConfig,
    /// Edits whose attention maps are kept; 0: capture is off.
    pub attention_cache: usize,
    /// Adapter names a request may ask for (`adapter=<name>`).
    pub adapters: Vec<String>,
    /// Applied when a request names no adapter; null: the base model.
    pub default_adapter: Option<String>,
    pub adapter_memory: AdapterUsage,
    pub queue_depth: usize,
}

#[utoipa::path(get, path = "/health", tag = "service",
    responses((status = 200, description = "The process is up", body = StatusBody)))]
pub async fn health() -> axum::Json<StatusBody> {
    axum::Json(StatusBody {
        status: "ok".into(),
    })
}

#[utoipa::path(get, path = "/ready", tag = "service",
    responses(
        (status = 200, description = "Model loaded and worker running", body = StatusBody),
        (status = 503, description = "Worker not running, or shutting down", body = ErrorBody),
    ))]
pub async fn ready(State(state): State<Arc<AppState>>) -> Result<axum::Json<StatusBody>, ApiError> {
    if state.is_ready() {
        Ok(axum::Json(StatusBody {
            status: "ready".into(),
        }))
    } else {
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the worker is not running or the server is shutting down",
        ))
    }
}

#[utoipa::path(get, path = "/info", tag = "service",
    responses((status = 200, description = "Model, device, limits and version", body = InfoResponse)))]
pub async fn info(State(state): State<Arc<AppState>>) -> axum::Json<InfoResponse> {
    axum::Json(InfoResponse {
        version: env!("CARGO_PKG_VERSION").into(),
        model: state.info.clone(),
        limits: state.limits.clone(),
        batching: state.batching.clone(),
        attention_cache: state.attention.capacity(),
        adapters: state.adapters.names(),
        default_adapter: state.adapters.default_name(),
        adapter_memory: state.adapters.usage(),
        queue_depth: state.queue.depth(),
    })
}

#[utoipa::path(get, path = "/metrics", tag = "service",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain")))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        state.metrics.render(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json")))]
pub async fn openapi_json() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        crate::openapi::json(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/docs", tag = "service",
    responses((status = 200, description = "A self-contained API page", content_type = "text/html")))]
pub async fn docs() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}
