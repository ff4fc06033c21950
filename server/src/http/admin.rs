//! Admin routes, behind `Authorization: Bearer <--api-key>`: list, add, delete adapters and
//! choose the default. Every route checks the key before reading the body.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{FromRequest, Multipart, Path, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::AppState;
use crate::adapters::{AdapterError, AdapterInfo};
use crate::error::{ApiError, ErrorBody};

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

/// From a request's point of view a refused adapter does not exist (404), with the reason.
impl From<AdapterError> for ApiError {
    fn from(e: AdapterError) -> Self {
        match e {
            AdapterError::InvalidName(_) => ApiError::invalid(e.to_string()),
            AdapterError::NotFound { .. } | AdapterError::Refused { .. } => {
                ApiError::not_found("adapter_not_found", e.to_string())
            }
            other => admin_error(other),
        }
    }
}

/// The admin routes' view: a refused file is the client's unprocessable input.
fn admin_error(e: AdapterError) -> ApiError {
    let message = e.to_string();
    match e {
        AdapterError::InvalidName(_) => ApiError::invalid(message),
        AdapterError::NotFound { .. } => ApiError::not_found("adapter_not_found", message),
        AdapterError::Refused { .. } => {
            ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "adapter_refused", message)
        }
        AdapterError::Unavailable { .. } => ApiError {
            retry_after_s: Some(1),
            ..ApiError::unavailable(message)
        },
        AdapterError::NoFolder => {
            ApiError::new(StatusCode::CONFLICT, "no_adapters_folder", message)
        }
        AdapterError::PathOutside(_) => ApiError::new(
            StatusCode::FORBIDDEN,
            "path_outside_adapters_folder",
            message,
        ),
        AdapterError::MissingFile(_) => ApiError::not_found("file_not_found", message),
        AdapterError::Io(_) => ApiError::internal(message),
    }
}

/// Registry work reads and writes files: off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, AdapterError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::internal(format!("adapter task failed: {e}")))?
        .map_err(admin_error)
}

async fn read_json<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_ADMIN_JSON_BYTES)
        .await
        .map_err(|e| {
            ApiError::too_large(
                "payload_too_large",
                format!("admin JSON bodies are at most {MAX_ADMIN_JSON_BYTES} bytes: {e}"),
            )
        })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            ApiError::invalid(format!("JSON body: {e}"))
        } else {
            ApiError::bad_request(format!("the body is not valid JSON: {e}"))
        }
    })
}

/// The largest `POST /adapters` body: a file of `--max-adapter-bytes`, plus form framing.
pub fn max_upload_bytes(state: &AppState) -> usize {
    usize::try_from(state.adapters.max_adapter_bytes())
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
) -> Result<axum::Json<Vec<AdapterInfo>>, ApiError> {
    state.check_admin(&headers)?;
    Ok(axum::Json(state.adapters.list()))
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
        (status = 409, description = "The server has no adapters folder (--adapters)", body = ErrorBody),
        (status = 413, description = "Larger than --max-adapter-bytes", body = ErrorBody),
        (status = 415, description = "Body neither multipart nor JSON", body = ErrorBody),
        (status = 422, description = "Bad name, missing field, or the file was refused (`adapter_refused`, with why); nothing changed", body = ErrorBody),
    ))]
pub async fn add_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    request: Request,
) -> Result<Response, ApiError> {
    state.check_admin(&headers)?;
    if state.adapters.dir().is_none() {
        return Err(admin_error(AdapterError::NoFolder));
    }
    let limit = max_upload_bytes(&state);
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(upload_too_large(limit));
    }
    let mime = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|v| v.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let registry = state.adapters.clone();
    let info =
        match mime.as_str() {
            "multipart/form-data" => {
                let (name, file) = read_upload(request, limit).await?;
                blocking(move || registry.add_bytes(&name, &file)).await?
            }
            "application/json" => {
                let body: AddAdapterRequest = read_json(request.into_body()).await?;
                blocking(move || registry.add_from_path(&body.name, &body.path)).await?
            }
            _ => return Err(ApiError::unsupported_media(
                "send multipart/form-data (`name`, `file`) or application/json (`name`, `path`)",
            )),
        };
    Ok((StatusCode::CREATED, axum::Json(info)).into_response())
}

fn upload_too_large(limit: usize) -> ApiError {
    ApiError::too_large(
        "payload_too_large",
        format!("the upload is larger than {limit} bytes (--max-adapter-bytes plus form framing)"),
    )
}

/// The `name` and `file` fields; the route's body limit bounds the whole form.
async fn read_upload(request: Request, limit: usize) -> Result<(String, Vec<u8>), ApiError> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            upload_too_large(limit)
        } else {
            ApiError::bad_request(format!("bad multipart body: {}", e.body_text()))
        }
    };
    let mut form = Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::bad_request(format!("bad multipart body: {}", e.body_text())))?;
    let (mut name, mut file) = (None, None);
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let field_name = field.name().unwrap_or("").to_string();
        let slot_taken = match field_name.as_str() {
            "name" => name.replace(field.text().await.map_err(bad)?).is_some(),
            "file" => file.replace(field.bytes().await.map_err(bad)?).is_some(),
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown form field `{}`; expected `name` and `file`",
                    other.chars().take(64).collect::<String>()
                )))
            }
        };
        if slot_taken {
            return Err(ApiError::invalid(format!(
                "form field `{field_name}` given twice"
            )));
        }
    }
    let name = name.ok_or_else(|| ApiError::invalid("missing form field `name`"))?;
    let file = file.ok_or_else(|| ApiError::invalid("missing form field `file`"))?;
    Ok((name, file.to_vec()))
}

#[utoipa::path(delete, path = "/adapters/{name}", tag = "admin",
    security(("bearer" = [])),
    params(("name" = String, Path, description = "Adapter name")),
    responses(
        (status = 200, description = "File deleted and name forgotten; admitted requests keep their version", body = DeletedAdapter),
        (status = 401, description = "Missing or wrong bearer token, or no --api-key configured", body = ErrorBody),
        (status = 404, description = "No such adapter", body = ErrorBody),
        (status = 409, description = "The server has no adapters folder (--adapters)", body = ErrorBody),
        (status = 422, description = "Not an adapter name", body = ErrorBody),
    ))]
pub async fn delete_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Result<axum::Json<DeletedAdapter>, ApiError> {
    state.check_admin(&headers)?;
    let registry = state.adapters.clone();
    let target = name.clone();
    let default_cleared = blocking(move || registry.remove(&target)).await?;
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
        (status = 401, description = "Missing or wrong bearer token, or no --api-key configured", body = ErrorBody),
        (status = 404, description = "No such adapter, or it was refused", body = ErrorBody),
        (status = 422, description = "Not an adapter name", body = ErrorBody),
    ))]
pub async fn set_default_adapter(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<axum::Json<DefaultAdapter>, ApiError> {
    state.check_admin(&headers)?;
    let request: DefaultAdapter = read_json(body).await?;
    let name = state
        .adapters
        .set_default(request.name.as_deref())
        .map_err(ApiError::from)?;
    Ok(axum::Json(DefaultAdapter { name }))
}
