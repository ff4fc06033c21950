//! `POST /edit`: the route. The body is parsed and checked here (`edit_parse`), the edit runs
//! in the service, and the answer is the image (or JSON) here; with `Prefer: respond-async` it
//! is a 202 with the job instead (see `super::jobs`).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};

use super::body::{
    body_too_large, content_length, content_type, media_type, read_body, wants_json,
};
use super::client::ClientOf;
use super::edit_dto::{EditForm, EditJsonRequest, EditJsonResponse, JobAccepted};
use super::edit_parse::{parse_json_edit, parse_multipart_edit, validate, RawEdit};
use super::error::ErrorBody;
use super::state::AppState;
use crate::edit::EditResult;
use crate::error::ServiceError;

#[utoipa::path(
    post,
    path = "/edit",
    tag = "edit",
    request_body(
        description = "The image and the instruction, as a form or as JSON with base64",
        content(
            (inline(EditForm) = "multipart/form-data"),
            (EditJsonRequest = "application/json"),
        )
    ),
    params(
        ("Prefer" = Option<String>, Header,
            description = "`respond-async`: answer 202 with a job at once (after the same checks) instead of waiting; see `/jobs/{id}`"),
    ),
    responses(
        (status = 200, description = "The edited image, the input's size. With `Accept: application/json`, JSON with the image in base64.",
            headers(
                ("x-edit-id" = String, description = "Id for /attention/{edit_id}"),
                ("x-seed" = u64, description = "The seed used (random when not given)"),
                ("x-adapter" = String, description = "Adapter applied, or `none`"),
                ("x-queue-ms" = u64, description = "Time waiting for the worker"),
                ("x-inference-ms" = u64, description = "Time of the model batch"),
                ("x-batch-size" = usize, description = "Edits in the batch this one ran in"),
                ("x-working-size" = String, description = "`WIDTHxHEIGHT` the model ran at (see `working_size`)"),
            ),
            content(
                ("image/png"), ("image/jpeg"), ("image/webp"),
                (EditJsonResponse = "application/json"),
            )
        ),
        (status = 202, description = "With `Prefer: respond-async`: the job is queued; follow `status_url` (also in `Location`)", body = JobAccepted,
            headers(
                ("Location" = String, description = "The job's status URL"),
                ("Preference-Applied" = String, description = "`respond-async`"),
            )),
        (status = 400, description = "Unparseable body (JSON, multipart, base64) or a corrupt image", body = ErrorBody),
        (status = 404, description = "Unknown adapter", body = ErrorBody),
        (status = 413, description = "Body, declared or VAE-rounded pixel count, PNG metadata, or steps x pixels (`edit_too_costly`) over the limits", body = ErrorBody),
        (status = 415, description = "Body not multipart/JSON, or image not PNG/JPEG/WebP", body = ErrorBody),
        (status = 422, description = "Missing or out-of-range parameter", body = ErrorBody),
        (status = 429, description = "Queue full, or the cost budget (in all or this client's share) is held; retry after `Retry-After` seconds", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "Shutting down, or the worker is not running", body = ErrorBody),
        (status = 504, description = "Not done within --request-timeout-s; its work was dropped", body = ErrorBody),
    )
)]
pub async fn edit(
    State(state): State<Arc<AppState>>,
    ClientOf(client): ClientOf,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ServiceError> {
    let service = &state.service;
    let arrived = std::time::Instant::now();
    // Held until the answer: refused here, the body is never read.
    let _permit = service.admit()?;
    let raw = read_edit(&headers, body, service.limits().max_body_bytes).await?;
    let submission = validate(raw, service.limits(), service.info())?;
    let prepared = service
        .prepare(submission, client)
        .await?
        .arrived_at(arrived);
    if prefers_async(&headers) {
        let id = service.submit(prepared)?;
        return Ok(accepted(id));
    }
    let result = service.run(prepared).await?;
    Ok(edit_response(&result, wants_json(&headers)))
}

/// The body as multipart or JSON, refused past `limit` bytes.
async fn read_edit(headers: &HeaderMap, body: Body, limit: usize) -> Result<RawEdit, ServiceError> {
    if let Some(length) = content_length(headers) {
        if length > limit as u64 {
            return Err(body_too_large(limit));
        }
    }
    let content_type = content_type(headers).to_string();
    match media_type(&content_type).as_str() {
        "multipart/form-data" => {
            let bytes = read_body(body, limit).await?;
            parse_multipart_edit(&content_type, bytes).await
        }
        "application/json" => parse_json_edit(&read_body(body, limit).await?),
        "" => Err(ServiceError::unsupported_media(
            "missing Content-Type: send multipart/form-data or application/json",
        )),
        other => Err(ServiceError::unsupported_media(format!(
            "Content-Type {other} is not accepted: send multipart/form-data or application/json"
        ))),
    }
}

/// `Prefer: respond-async` (RFC 7240), among other preferences or not.
fn prefers_async(headers: &HeaderMap) -> bool {
    headers
        .get_all("prefer")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|preference| {
            let token = preference.split([';', '=']).next().unwrap_or("");
            token.trim().eq_ignore_ascii_case("respond-async")
        })
}

/// 202 with where to follow the job.
fn accepted(id: String) -> Response {
    let status_url = format!("/jobs/{id}");
    let body = JobAccepted {
        events_url: format!("{status_url}/events"),
        result_url: format!("{status_url}/result"),
        status_url: status_url.clone(),
        status: "queued".into(),
        id,
    };
    let mut response = (StatusCode::ACCEPTED, axum::Json(body)).into_response();
    let h = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&status_url) {
        h.insert(header::LOCATION, location);
    }
    h.insert(
        "preference-applied",
        HeaderValue::from_static("respond-async"),
    );
    response
}

/// The image with its `x-*` headers, or JSON with the image in base64: the synchronous answer
/// and `GET /jobs/{id}/result` alike.
pub fn edit_response(result: &EditResult, json: bool) -> Response {
    if json {
        let body = EditJsonResponse::from(result);
        return axum::Json(body).into_response();
    }
    let mut response = (StatusCode::OK, result.bytes.clone()).into_response();
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(result.format.mime()),
    );
    let pairs = [
        ("x-edit-id", result.edit_id.clone()),
        ("x-seed", result.seed.to_string()),
        ("x-adapter", result.adapter.clone()),
        ("x-queue-ms", result.queue_ms.to_string()),
        ("x-inference-ms", result.inference_ms.to_string()),
        ("x-batch-size", result.batch_size.to_string()),
        (
            "x-working-size",
            format!("{}x{}", result.working_width, result.working_height),
        ),
    ];
    for (name, value) in pairs {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(name, v);
        }
    }
    response
}
