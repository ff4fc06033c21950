//! The router: every route, the layers around them (`guard`), and the answers for unknown
//! routes and methods.

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::extract::{MatchedPath, Request};
use axum::http::Method;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use axum::Router;

use super::guard::{frontline, RouteLabel};
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
        .route_layer(middleware::from_fn(tag_route))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), frontline))
        .with_state(state)
}

/// Labels the response with its route template (not its raw path, so edit ids do not explode
/// the metrics' label set); `guard::frontline` counts and logs it.
async fn tag_route(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string());
    let mut response = next.run(request).await;
    if let Some(route) = route {
        response.extensions_mut().insert(RouteLabel(route));
    }
    response
}

async fn not_found(method: Method, uri: axum::http::Uri) -> Response {
    ServiceError::not_found(
        "not_found",
        format!(
            "no route {} {}; see /docs",
            method_shown(&method),
            path_shown(&uri)
        ),
    )
    .into_response()
}

async fn method_not_allowed(
    method: Method,
    uri: axum::http::Uri,
    matched: Option<MatchedPath>,
) -> Response {
    let mut response = ServiceError::new(
        ErrorKind::MethodNotAllowed,
        "method_not_allowed",
        format!(
            "{} is not allowed on {}; see /docs",
            method_shown(&method),
            path_shown(&uri)
        ),
    )
    .into_response();
    if let Some(matched) = matched {
        response
            .extensions_mut()
            .insert(RouteLabel(matched.as_str().to_string()));
    }
    response
}

/// A client's invented method or path, echoed in an error at a bounded length.
fn method_shown(method: &Method) -> String {
    method.as_str().chars().take(32).collect()
}

fn path_shown(uri: &axum::http::Uri) -> String {
    uri.path().chars().take(200).collect()
}
