//! Routes, shared state and the request-tracking middleware.

pub mod admin;
pub mod attention;
pub mod edit;
pub mod jobs;
pub mod meta;
pub mod openai;
pub mod ui;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use axum::Router;

use crate::adapters::AdapterRegistry;
use crate::attention_cache::AttentionCache;
use crate::backend::BackendInfo;
use crate::config::{BatchingConfig, Limits};
use crate::error::ApiError;
use crate::jobs::JobStore;
use crate::metrics::Metrics;
use crate::queue::Queue;

pub struct AppState {
    pub info: BackendInfo,
    pub limits: Limits,
    pub batching: BatchingConfig,
    pub queue: Arc<Queue>,
    pub adapters: Arc<AdapterRegistry>,
    pub attention: AttentionCache,
    /// Async edits (`Prefer: respond-async`).
    pub jobs: JobStore,
    pub metrics: Metrics,
    pub worker_alive: Arc<AtomicBool>,
    pub shutting_down: AtomicBool,
    pub api_key: Option<String>,
    /// Bearer the `/v1` (OpenAI-compatible) routes need; None: any or none.
    pub openai_api_key: Option<String>,
}

impl AppState {
    pub fn is_ready(&self) -> bool {
        self.worker_alive.load(Ordering::SeqCst) && !self.shutting_down.load(Ordering::SeqCst)
    }

    /// Admin routes need `Authorization: Bearer <--api-key>`.
    pub fn check_admin(&self, headers: &HeaderMap) -> Result<(), ApiError> {
        let Some(expected) = &self.api_key else {
            return Err(ApiError::unauthorized(
                "admin routes are closed: start the server with --api-key (RL4PIX_API_KEY)",
            ));
        };
        let given = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or_else(|| ApiError::unauthorized("missing `Authorization: Bearer <api key>`"))?;
        if !constant_time_eq(given.as_bytes(), expected.as_bytes()) {
            return Err(ApiError::unauthorized("wrong api key"));
        }
        Ok(())
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(ui::page))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/style.css", get(ui::style))
        .route("/edit", axum::routing::post(edit::edit))
        .route(
            "/v1/images/edits",
            axum::routing::post(openai::images_edits)
                .layer(DefaultBodyLimit::max(state.limits.max_body_bytes)),
        )
        .route("/v1/models", get(openai::models))
        .route("/jobs/{id}", get(jobs::status).delete(jobs::cancel))
        .route("/jobs/{id}/events", get(jobs::events))
        .route("/jobs/{id}/result", get(jobs::result))
        .route("/attention/{edit_id}", get(attention::overlay))
        .route("/attention/{edit_id}/tokens", get(attention::tokens))
        .route("/health", get(meta::health))
        .route("/ready", get(meta::ready))
        .route("/info", get(meta::info))
        .route("/metrics", get(meta::metrics))
        .route(
            "/adapters",
            get(admin::list_adapters)
                .post(admin::add_adapter)
                .layer(DefaultBodyLimit::max(admin::max_upload_bytes(&state))),
        )
        .route("/adapters/default", put(admin::set_default_adapter))
        .route("/adapters/{name}", delete(admin::delete_adapter))
        .route("/openapi.json", get(meta::openapi_json))
        .route("/docs", get(meta::docs))
        .route_layer(middleware::from_fn_with_state(state.clone(), track))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Counts and logs every routed request by its route template (not its raw path, so edit ids
/// do not explode the label set).
async fn track(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = request.method().clone();
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let response = next.run(request).await;
    record(&state, &route, &method, response.status(), started);
    response
}

fn record(state: &AppState, route: &str, method: &Method, status: StatusCode, started: Instant) {
    let elapsed = started.elapsed();
    state
        .metrics
        .http_requests
        .with_label_values(&[route, method.as_str(), status.as_str()])
        .inc();
    state
        .metrics
        .http_duration
        .with_label_values(&[route])
        .observe(elapsed.as_secs_f64());
    tracing::info!(
        %method,
        route,
        status = status.as_u16(),
        ms = elapsed.as_millis() as u64,
        "request"
    );
}

async fn not_found(
    State(state): State<Arc<AppState>>,
    method: Method,
    uri: axum::http::Uri,
) -> Response {
    let error = ApiError::not_found(
        "not_found",
        format!("no route {method} {}; see /docs", uri.path()),
    );
    record(&state, "unmatched", &method, error.status, Instant::now());
    error.into_response()
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Response {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {}; see /docs", uri.path()),
    )
    .into_response()
}
