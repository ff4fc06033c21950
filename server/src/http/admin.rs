//! Admin routes, behind `Authorization: Bearer <--api-key>`: list, add, delete adapters and
//! choose the default. Every route checks the key before reading the body.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::check_admin;
use super::body::{content_length, content_type, media_type, parse_json};
use super::error::ErrorBody;
use super::state::AppState;
use crate::adapters;
use crate::error::{clipped, ServiceError};

/// JSON bodies of the admin routes are a name and a path at most.
const MAX_ADMIN_JSON_BYTES: usize = 64 * 1024;

/// `multipart/form-data` body of `POST /adapters`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct AdapterUploadForm {
    /// The adapter's name (becomes `<name>.safetensors` in the adapters folder).
    #[schema(example = "mine")]
    name: String,
    /// A LoRA `.safetensors` file (diffusers / PEFT / kohya spellings).
    #[schema(value_type = String, content_media_type = "application/octet-stream")]
    file: Vec<u8>,
}

/// `application/json` body of `POST /adapters`: a file already inside the adapters folder.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "mine", "path": "incoming/run-42.safetensors"}))]
pub struct AddAdapterRequest {
    pub name: String,
    /// Relative to the adapters folder; `..`, absolute paths and symlinks leading outside it
    /// are refused.
    pub path: String,
}

/// Body and answer of `PUT /adapters/default`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"name": "mine"}))]
pub struct DefaultAdapter {
    /// The adapter for requests that name none; `null`: the base model.
    pub name: Option<String>,
}

/// The answer to `DELETE /adapters/{name}`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct DeletedAdapter {
    pub name: String,
    /// It was the default adapter; requests that name none now use the base model.
    pub default_cleared: bool,
}

// The wire form of `adapters::AdapterInfo`, built by `From`: only `http/` derives OpenAPI
// schemas.
/// A row of `GET /adapters`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AdapterInfo {
    #[schema(example = "mine")]
    pub name: String,
    /// `loaded` (weights in memory), `unloaded` (a good version whose weights were dropped to
    /// stay within `--max-adapters` / `--max-adapter-bytes`; read again on its next request), or
    /// `refused` (no good version; `error` says why).
    #[schema(example = "loaded")]
    pub status: String,
    /// Applied to requests that name no adapter.
    pub default: bool,
    pub rank: Option<usize>,
    pub alpha: Option<f64>,
    pub target_modules: Vec<String>,
    /// The base model the adapter was trained on, as written in its file.
    pub base_fingerprint: Option<String>,
    /// Creation time, as written in its file.
    pub created: Option<String>,
    /// Size of the file.
    pub bytes: Option<u64>,
    /// Size of its weights in memory (what `--max-adapter-bytes` counts).
    pub memory_bytes: Option<u64>,
    pub generation: Option<u64>,
    /// Admitted requests (queued or running) pinned to this version.
    pub requests_in_flight: usize,
    /// Admitted requests still pinned to versions this one replaced.
    pub older_versions_in_flight: usize,
    /// Why the newest file of this name was refused; with status `loaded` / `unloaded` the
    /// previous good version keeps serving.
    pub error: Option<String>,
}

impl From<adapters::AdapterInfo> for AdapterInfo {
    fn from(a: adapters::AdapterInfo) -> Self {
        Self {
            name: a.name,
            status: a.status,
            default: a.default,
            rank: a.rank,
            alpha: a.alpha,
            target_modules: a.target_modules,
            base_fingerprint: a.base_fingerprint,
            created: a.created,
            bytes: a.bytes,
            memory_bytes: a.memory_bytes,
            generation: a.generation,
            requests_in_flight: a.requests_in_flight,
            older_versions_in_flight: a.older_versions_in_flight,
            error: a.error,
        }
    }
}

async fn read_json<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ServiceError> {
    let bytes = axum::body::to_bytes(body, MAX_ADMIN_JSON_BYTES)
        .await
        .map_err(|e| {
            ServiceError::too_large(
                "payload_too_large",
                format!("admin JSON bodies are at most {MAX_ADMIN_JSON_BYTES} bytes: {e}"),
            )
        })?;
    parse_json(&bytes)
}

/// The largest `POST /adapters` body: a file of `--max-adapter-bytes`, plus form framing.
pub fn max_upload_bytes(state: &AppState) -> usize {
    usize::try_from(state.service.max_adapter_bytes())
        .unwrap_or(usize::MAX)
        .saturating_add(1 << 20)
}

#[utoipa::path(get, path = "/adapters", tag = "admin",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Every adapter name: loaded, unloaded (least recently used; read again on request) or refused, with why", body = Vec<AdapterInfo>),
        (status = 401, description = "Missing or wrong bearer token, or no --api-key configured", body = ErrorBody),
    ))]
pub async fn list_adapters(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<axum::Json<Vec<AdapterInfo>>, ServiceError> {
    check_admin(state.api_key.as_deref(), &headers)?;
    let list = state.service.list_adapters();
    Ok(axum::Json(
        list.into_iter().map(AdapterInfo::from).collect(),
    ))
}

#[utoipa::path(post, path = "/adapters", tag = "admin",
    security(("bearer" = [])),
    request_body(
        description = "A file upload, or the path of a file already inside the adapters folder. Validated against the base first; then written atomically as `<name>.safetensors` and swapped in (requests already admitted keep the version they pinned).",
        content(
            (inline(AdapterUploadForm) = "multipart/form-data"),
            (AddAdapterRequest = "application/json"),
        )
    ),
    responses(
        (status = 201, description = "Loaded; the new version", body = AdapterInfo),
        (status = 400, description = "Unparseable body", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token, or no --api-key configured", body = ErrorBody),
        (status = 403, description = "`path` leads outside the adapters folder", body = ErrorBody),
        (status = 404, description = "`path` names no file", body = ErrorBody),
        (status = 409, description = "The server has no adapters folder (--adapters), its adapters come from an object store (`adapters_in_object_store`: publish there), or they are the read-only adapters shipped with the default model (`shipped_adapters`)", body = ErrorBody),
        (status = 413, description = "Larger than --max-adapter-bytes", body = ErrorBody),
        (status = 415, description = "Body neither multipart nor JSON", body = ErrorBody),
        (status = 422, description = "Bad name, missing field, or the file was refused (`adapter_refused`, with why); nothing changed", body = ErrorBody),
    ))]
pub async fn add_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ServiceError> {
    check_admin(state.api_key.as_deref(), &headers)?;
    state.service.check_adapters_folder()?;
    let limit = max_upload_bytes(&state);
    if content_length(&headers).is_some_and(|n| n > limit as u64) {
        return Err(upload_too_large(limit));
    }
    let info =
        match media_type(content_type(&headers)).as_str() {
            "multipart/form-data" => {
                let (name, file) = read_upload(request, limit).await?;
                state.service.add_adapter_file(name, file).await?
            }
            "application/json" => {
                let body: AddAdapterRequest = read_json(request.into_body()).await?;
                state
                    .service
                    .add_adapter_from_path(body.name, body.path)
                    .await?
            }
            _ => return Err(ServiceError::unsupported_media(
                "send multipart/form-data (`name`, `file`) or application/json (`name`, `path`)",
            )),
        };
    Ok((StatusCode::CREATED, axum::Json(AdapterInfo::from(info))).into_response())
}

fn upload_too_large(limit: usize) -> ServiceError {
    ServiceError::too_large(
        "payload_too_large",
        format!("the upload is larger than {limit} bytes (--max-adapter-bytes plus form framing)"),
    )
}

/// The `name` and `file` fields; the route's body limit bounds the whole form.
async fn read_upload(request: Request, limit: usize) -> Result<(String, Vec<u8>), ServiceError> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            upload_too_large(limit)
        } else {
            ServiceError::bad_request(format!("bad multipart body: {}", e.body_text()))
        }
    };
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| ServiceError::bad_request(format!("bad multipart body: {}", e.body_text())))?;
    let (mut name, mut file) = (None, None);
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let field_name = field.name().unwrap_or("").to_string();
        let slot_taken = match field_name.as_str() {
            "name" => name.replace(field.text().await.map_err(bad)?).is_some(),
            "file" => file.replace(field.bytes().await.map_err(bad)?).is_some(),
            other => {
                return Err(ServiceError::invalid(format!(
                    "unknown form field `{}`; expected `name` and `file`",
                    clipped(other)
                )))
            }
        };
        if slot_taken {
            return Err(ServiceError::invalid(format!(
                "form field `{field_name}` given twice"
            )));
        }
    }
    let name = name.ok_or_else(|| ServiceError::invalid("missing form field `name`"))?;
    let file = file.ok_or_else(|| ServiceError::invalid("missing form field `file`"))?;
    Ok((name, file.to_vec()))
}

#[utoipa::path(delete, path = "/adapters/{name}", tag = "admin",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Adapter name")),
    responses(
        (status = 200, description = "File deleted and name forgotten; admitted requests keep their version", body = DeletedAdapter),
        (status = 401, description = "Missing or wrong bearer token, or no --api-key configured", body = ErrorBody),
        (status = 404, description = "No such adapter", body = ErrorBody),
        (status = 409, description = "The server has no adapters folder (--adapters), its adapters come from an object store (`adapters_in_object_store`), or they are the read-only adapters shipped with the default model (`shipped_adapters`)", body = ErrorBody),
        (status = 422, description = "Not an adapter name", body = ErrorBody),
    ))]
pub async fn delete_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<axum::Json<DeletedAdapter>, ServiceError> {
    check_admin(state.api_key.as_deref(), &headers)?;
    let default_cleared = state.service.remove_adapter(name.clone()).await?;
    Ok(axum::Json(DeletedAdapter {
        name,
        default_cleared,
    }))
}

#[utoipa::path(put, path = "/adapters/default", tag = "admin",
    security(("bearer" = [])),
    request_body(content = DefaultAdapter, content_type = "application/json"),
    responses(
        (status = 200, description = "The default now", body = DefaultAdapter),
        (status = 400, description = "Unparseable body (not JSON, or not this object)", body = ErrorBody),
        (status = 401, description = "Missing or wrong bearer token, or no --api-key configured", body = ErrorBody),
        (status = 404, description = "No such adapter, or it was refused", body = ErrorBody),
        (status = 422, description = "Not an adapter name", body = ErrorBody),
    ))]
pub async fn set_default_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<DefaultAdapter>, ServiceError> {
    check_admin(state.api_key.as_deref(), &headers)?;
    let request: DefaultAdapter = read_json(body).await?;
    let name = state.service.set_default_adapter(request.name.as_deref())?;
    Ok(axum::Json(DefaultAdapter { name }))
}
