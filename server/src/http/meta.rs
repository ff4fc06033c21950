//! Health, readiness, info, metrics, the OpenAPI document and the docs page.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, HeaderValue};
use axum::response::{Html, IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::ErrorBody;
use super::state::AppState;
use crate::error::{ErrorKind, ServiceError};
use crate::{adapters, backend, config};

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

/// What `/info` shows about the loaded model.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct BackendInfo {
    /// The model folder's name.
    #[schema(example = "toy")]
    pub model: String,
    #[schema(example = "cpu")]
    pub device: String,
    #[schema(example = "f32")]
    pub dtype: String,
    /// Pixels per latent cell; a batch shares the image size rounded down to this grid.
    #[schema(example = 8)]
    pub vae_scale_factor: usize,
    #[schema(example = "ddim")]
    pub default_scheduler: String,
    /// Guidance a request gets when it names none: the model's own (`model_index.json` →
    /// `rl4pix.sampling`), else InstructPix2Pix's 7.5 / 1.5.
    #[schema(example = 2.0)]
    pub default_guidance_scale: f64,
    #[schema(example = 1.5)]
    pub default_image_guidance_scale: f64,
    /// LoRA-capable projections of the UNet.
    pub lora_targets: usize,
    pub base_fingerprint: String,
    /// The most denoising steps every scheduler of this model accepts.
    pub max_steps: usize,
    /// The side the model was trained at (`model_index.json` → `rl4pix.training_config.size`):
    /// edits run at about this many pixels squared unless `working_size=input`; null: the model
    /// records none and edits run at the picture's own size.
    #[schema(example = 32)]
    pub working_size: Option<u32>,
}

impl From<&backend::BackendInfo> for BackendInfo {
    fn from(info: &backend::BackendInfo) -> Self {
        Self {
            model: info.model.clone(),
            device: info.device.clone(),
            dtype: info.dtype.clone(),
            vae_scale_factor: info.vae_scale_factor,
            default_scheduler: info.default_scheduler.clone(),
            default_guidance_scale: info.default_guidance_scale,
            default_image_guidance_scale: info.default_image_guidance_scale,
            lora_targets: info.lora_targets,
            base_fingerprint: info.base_fingerprint.clone(),
            max_steps: info.max_steps,
            working_size: info.working_size,
        }
    }
}

/// How full the registry is, for `/info`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterUsage {
    pub loaded: usize,
    pub loaded_bytes: u64,
    pub max_adapters: usize,
    pub max_adapter_bytes: u64,
}

impl From<adapters::AdapterUsage> for AdapterUsage {
    fn from(usage: adapters::AdapterUsage) -> Self {
        Self {
            loaded: usage.loaded,
            loaded_bytes: usage.loaded_bytes,
            max_adapters: usage.max_adapters,
            max_adapter_bytes: usage.max_adapter_bytes,
        }
    }
}

// The wire form of `config::Limits`, built by `From`: only `http/` derives OpenAPI schemas.
/// What a request may ask for; checked before any decoding or model work.
#[derive(Debug, Serialize, ToSchema)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_pixels: u64,
    pub max_steps: usize,
    pub default_steps: usize,
    pub max_instruction_chars: usize,
    pub max_guidance_scale: f64,
    pub max_image_guidance_scale: f64,
    pub max_adapter_name_chars: usize,
    pub request_timeout_s: f64,
    /// Where an edit runs when the request does not say (`--working-size`): `model` or `input`.
    pub working_size: crate::working_size::SizeMode,
}

impl From<&config::Limits> for Limits {
    fn from(l: &config::Limits) -> Self {
        Self {
            max_body_bytes: l.max_body_bytes,
            max_pixels: l.max_pixels,
            max_steps: l.max_steps,
            default_steps: l.default_steps,
            max_instruction_chars: l.max_instruction_chars,
            max_guidance_scale: l.max_guidance_scale,
            max_image_guidance_scale: l.max_image_guidance_scale,
            max_adapter_name_chars: l.max_adapter_name_chars,
            request_timeout_s: l.request_timeout_s,
            working_size: l.working_size,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BatchingConfig {
    pub max_batch_size: usize,
    pub max_batch_wait_ms: u64,
    pub max_queue: usize,
}

impl From<&config::BatchingConfig> for BatchingConfig {
    fn from(b: &config::BatchingConfig) -> Self {
        Self {
            max_batch_size: b.max_batch_size,
            max_batch_wait_ms: b.max_batch_wait_ms,
            max_queue: b.max_queue,
        }
    }
}

#[utoipa::path(get, path = "/health", tag = "service",
    responses(
        (status = 200, description = "The process is up and its model worker runs", body = StatusBody),
        (status = 503, description = "The model worker stopped or its device check failed: restart the server", body = ErrorBody),
    ))]
pub async fn health(
    State(state): State<Arc<AppState>>,
) -> Result<axum::Json<StatusBody>, ServiceError> {
    status_or_unavailable(
        state.service.worker_runs(),
        "ok",
        "unhealthy",
        "the model worker stopped or failed its device check; restart the server",
    )
}

#[utoipa::path(get, path = "/ready", tag = "service",
    responses(
        (status = 200, description = "Model loaded and worker running", body = StatusBody),
        (status = 503, description = "Worker not running, draining or shutting down", body = ErrorBody),
    ))]
pub async fn ready(
    State(state): State<Arc<AppState>>,
) -> Result<axum::Json<StatusBody>, ServiceError> {
    status_or_unavailable(
        state.service.accepts_traffic(),
        "ready",
        "not_ready",
        "the worker is not running or the server is shutting down",
    )
}

/// `{"status": status}` when `up`; otherwise a 503 with `code` and `message`.
fn status_or_unavailable(
    up: bool,
    status: &str,
    code: &'static str,
    message: &'static str,
) -> Result<axum::Json<StatusBody>, ServiceError> {
    if up {
        Ok(axum::Json(StatusBody {
            status: status.into(),
        }))
    } else {
        Err(ServiceError::new(ErrorKind::Unavailable, code, message))
    }
}

#[utoipa::path(get, path = "/info", tag = "service",
    responses((status = 200, description = "Model, device, limits and version", body = InfoResponse)))]
pub async fn info(State(state): State<Arc<AppState>>) -> axum::Json<InfoResponse> {
    let service = &state.service;
    let status = service.status();
    axum::Json(InfoResponse {
        version: env!("CARGO_PKG_VERSION").into(),
        model: service.info().into(),
        limits: service.limits().into(),
        batching: service.batching().into(),
        attention_cache: status.attention_cache,
        adapters: status.adapters,
        default_adapter: status.default_adapter,
        adapter_memory: status.adapter_memory.into(),
        queue_depth: status.queue_depth,
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
        state.service.metrics().render(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/openapi.json", tag = "service",
    responses((status = 200, description = "This document (OpenAPI 3.1)", content_type = "application/json")))]
pub async fn openapi_json(State(state): State<Arc<AppState>>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        state.openapi_json.clone(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/docs", tag = "service",
    responses((status = 200, description = "A self-contained API page", content_type = "text/html")))]
pub async fn docs() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}
