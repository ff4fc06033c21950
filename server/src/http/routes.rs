//! The router: every route, the request-tracking middleware, and the answers for unknown
//! routes and methods.

use std::sync::Arc;
use std::time::Instant;

use axum::extract::DefaultBodyLimit;
use axum::extract::{MatchedPath, Request, State};
use axum::http::{Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use axum::Router;

use super::error::status_of;
use super::state::AppState;
use super::{admin, attention, edit, jobs, meta, openai, ui};
use crate::error::{ErrorKind, ServiceError};

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/", get(ui::page))
        .route("/ui/app.js", get(ui::script))
        .route("/ui/style.css", get(ui::style))
        .route("/edit", axum::routing::post(edit::edit))
        .route(
            "/v1/images/edits",
            axum::routing::post(openai::images_edits)
                .layer(DefaultBodyLimit::max(state.service.limits().max_body_bytes)),
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
    let metrics = state.service.metrics();
    metrics
        .http_requests
        .with_label_values(&[route, method.as_str(), status.as_str()])
        .inc();
    metrics
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
    let error = ServiceError::not_found(
        "not_found",
        format!("no route {method} {}; see /docs", uri.path()),
    );
    record(
        &state,
        "unmatched",
        &method,
        status_of(error.kind),
        Instant::now(),
    );
    error.into_response()
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> Response {
    ServiceError::new(
        ErrorKind::MethodNotAllowed,
        "method_not_allowed",
        format!("{method} is not allowed on {}; see /docs", uri.path()),
    )
    .into_response()
}
