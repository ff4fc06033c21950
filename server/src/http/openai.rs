//! OpenAI-compatible image edits: `POST /v1/images/edits` and `GET /v1/models`, so the official
//! `openai` SDKs (`client.images.edit(...)`) and tools built on them work against rl4pix. The
//! edit goes through the same checks, queue and batching as `POST /edit`; only the field names,
//! the answer and the error shape are OpenAI's.

use std::io::Cursor;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::multipart::{Multipart, MultipartError, MultipartRejection};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::auth::{bearer_token, keys_match};
use super::client::ClientOf;
use super::edit_parse::{validate, RawEdit};
use super::error::status_of;
use super::state::AppState;
use crate::budget::Client;
use crate::edit::EditResult;
use crate::error::{clipped, ServiceError};

/// Images one request may ask for (OpenAI's own limit).
pub(crate) const MAX_IMAGES: usize = 10;

/// `multipart/form-data` body of `POST /v1/images/edits`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct ImageEditForm {
    /// One PNG, JPEG or WebP (`image` or `image[]`).
    #[schema(value_type = String, content_media_type = "application/octet-stream")]
    image: Vec<u8>,
    /// The instruction.
    #[schema(example = "colour the square orange")]
    prompt: String,
    /// The base model's name (see `/v1/models`) or an adapter's; absent: the server's default
    /// adapter, as `POST /edit` without `adapter`.
    model: Option<String>,
    /// 1 to 10 edits of the same image (seeds `seed`, `seed+1`, ... when `seed` is given).
    n: Option<usize>,
    /// `WIDTHxHEIGHT` of the answer, or `auto` (default): the input's size.
    size: Option<String>,
    /// `b64_json` (default); `url` is not offered.
    response_format: Option<String>,
    /// `png` (default), `jpeg` or `webp`.
    output_format: Option<String>,
    /// rl4pix's own fields, as in `POST /edit` (the SDK sends them with `extra_body`).
    seed: Option<u64>,
    steps: Option<usize>,
    guidance_scale: Option<f64>,
    image_guidance_scale: Option<f64>,
    scheduler: Option<String>,
    working_size: Option<String>,
    keep_input: Option<bool>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"created": 1764860000, "data": [{"b64_json": "iVBORw0KGgo...", "seed": 42, "edit_id": "5f0c2a9e4b7d41c3a8e1f6d2b9c07a15"}], "output_format": "png", "size": "128x128"}))]
pub struct ImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<ImageData>,
    pub output_format: String,
    /// `WIDTHxHEIGHT` of the images.
    pub size: String,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ImageData {
    pub b64_json: String,
    /// rl4pix: the seed that reproduces this image.
    pub seed: u64,
    /// rl4pix: for `/attention/{edit_id}`.
    pub edit_id: String,
}

/// OpenAI's error shape.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"error": {"message": "`prompt` is required", "type": "invalid_request_error", "code": "invalid_parameter", "param": "prompt"}}))]
pub struct OpenAiErrorBody {
    pub error: OpenAiErrorDetail,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct OpenAiErrorDetail {
    pub message: String,
    /// `invalid_request_error` (4xx), `authentication_error` (401), `rate_limit_error` (429)
    /// or `server_error` (5xx).
    #[serde(rename = "type")]
    pub kind: String,
    /// The same kind as `error_type` of the native routes.
    pub code: String,
    /// The form field at fault, when one is.
    pub param: Option<String>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelList {
    /// `list`
    pub object: String,
    pub data: Vec<ModelEntry>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct ModelEntry {
    /// The base model's name or an adapter's.
    pub id: String,
    /// `model`
    pub object: String,
    pub created: u64,
    /// `rl4pix` for the base, `rl4pix-adapter` for adapters.
    pub owned_by: String,
}

/// An API error, answered in OpenAI's shape.
pub struct OpenAiError {
    error: ServiceError,
    param: Option<&'static str>,
}

impl From<ServiceError> for OpenAiError {
    fn from(error: ServiceError) -> Self {
        Self { error, param: None }
    }
}

impl OpenAiError {
    fn at(param: &'static str, error: ServiceError) -> Self {
        Self {
            error,
            param: Some(param),
        }
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        let status = status_of(self.error.kind);
        let kind = match status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let body = OpenAiErrorBody {
            error: OpenAiErrorDetail {
                message: self.error.message,
                kind: kind.into(),
                code: self.error.code.into(),
                param: self.param.map(Into::into),
            },
        };
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"rl4pix\""),
            );
        }
        if let Some(seconds) = self.error.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

/// With `--openai-api-key` the `/v1` routes need `Authorization: Bearer <it>`; without it any
/// bearer is accepted (the SDKs always send one).
fn check_bearer(state: &AppState, headers: &HeaderMap) -> Result<(), OpenAiError> {
    let Some(expected) = &state.openai_api_key else {
        return Ok(());
    };
    let given = bearer_token(headers)
        .ok_or_else(|| ServiceError::unauthorized("missing `Authorization: Bearer <api key>`"))?;
    if !keys_match(given, expected) {
        return Err(ServiceError::unauthorized("wrong api key (--openai-api-key)").into());
    }
    Ok(())
}

#[utoipa::path(
    post,
    path = "/v1/images/edits",
    tag = "openai",
    request_body(content((inline(ImageEditForm) = "multipart/form-data"))),
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "The edited images, base64", body = ImagesResponse),
        (status = 400, description = "Unparseable form, a mask, `response_format=url` or `stream`", body = OpenAiErrorBody),
        (status = 401, description = "`--openai-api-key` is set and the bearer is missing or wrong", body = OpenAiErrorBody),
        (status = 404, description = "`model` is neither the base model nor an adapter", body = OpenAiErrorBody),
        (status = 413, description = "Body or image over the limits", body = OpenAiErrorBody),
        (status = 415, description = "Image not PNG, JPEG or WebP", body = OpenAiErrorBody),
        (status = 422, description = "Missing or out-of-range field", body = OpenAiErrorBody),
        (status = 429, description = "Queue full, or the cost budget (in all or this client's share) is held; retry after `Retry-After` seconds", body = OpenAiErrorBody),
        (status = "5XX", description = "As `POST /edit`", body = OpenAiErrorBody),
    )
)]
pub async fn images_edits(
    State(state): State<Arc<AppState>>,
    ClientOf(client): ClientOf,
    headers: HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Response {
    match images_edits_inner(state, client, &headers, form).await {
        Ok(body) => axum::Json(body).into_response(),
        Err(e) => e.into_response(),
    }
}

/// What the OpenAI form asked for, mapped onto an edit.
struct EditsRequest {
    edit: RawEdit,
    n: usize,
    size: Option<(u32, u32)>,
}

async fn images_edits_inner(
    state: Arc<AppState>,
    client: Client,
    headers: &HeaderMap,
    form: Result<Multipart, MultipartRejection>,
) -> Result<ImagesResponse, OpenAiError> {
    check_bearer(&state, headers)?;
    let arrived = std::time::Instant::now();
    // Held until the answer: refused here, the form is never read.
    let _permit = state.service.admit()?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return Err(ServiceError::unsupported_media(format!(
            "Content-Type {:?} is not accepted: send multipart/form-data",
            clipped(content_type)
        ))
        .into());
    }
    let mut form = form.map_err(|e| {
        let status = e.status();
        let message = format!(
            "send the image and prompt as multipart/form-data: {}",
            e.body_text()
        );
        match status {
            StatusCode::PAYLOAD_TOO_LARGE => ServiceError::too_large("payload_too_large", message),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => ServiceError::unsupported_media(message),
            _ => ServiceError::bad_request(message),
        }
    })?;
    let request = parse_form(&state, &mut form).await?;
    let first_seed = request.edit.seed;
    // Queued together, so the worker can batch them.
    let mut running = Vec::with_capacity(request.n);
    for i in 0..request.n {
        let edit = RawEdit {
            image: request.edit.image.clone(),
            instruction: request.edit.instruction.clone(),
            steps: request.edit.steps,
            guidance_scale: request.edit.guidance_scale,
            image_guidance_scale: request.edit.image_guidance_scale,
            seed: first_seed.map(|s| s.wrapping_add(i as u64)),
            scheduler: request.edit.scheduler.clone(),
            adapter: request.edit.adapter.clone(),
            output_format: request.edit.output_format.clone(),
            working_size: request.edit.working_size.clone(),
            keep_input: request.edit.keep_input,
        };
        let state = state.clone();
        let client = client.clone();
        running.push(tokio::spawn(async move {
            let service = &state.service;
            let submission = validate(edit, service.limits(), service.info())?;
            let prepared = service
                .prepare(submission, client)
                .await?
                .arrived_at(arrived);
            service.run(prepared).await
        }));
    }
    let mut data = Vec::with_capacity(request.n);
    let mut size = (0, 0);
    let mut format = String::from("png");
    for task in running {
        let result = task
            .await
            .map_err(|e| ServiceError::internal(format!("edit task failed: {e}")))??;
        let (bytes, (w, h)) = resized(&result, request.size).await?;
        size = (w, h);
        format = result.format.name().to_string();
        data.push(ImageData {
            b64_json: base64::engine::general_purpose::STANDARD.encode(&bytes),
            seed: result.seed,
            edit_id: result.edit_id,
        });
    }
    Ok(ImagesResponse {
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or_default(),
        data,
        output_format: format,
        size: format!("{}x{}", size.0, size.1),
    })
}

async fn parse_form(state: &AppState, form: &mut Multipart) -> Result<EditsRequest, OpenAiError> {
    let bad = |e: MultipartError| {
        if super::guard::is_body_timeout(&e) {
            return ServiceError::body_timeout();
        }
        let message = format!("bad multipart body: {}", e.body_text());
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ServiceError::too_large("payload_too_large", message)
        } else {
            ServiceError::bad_request(message)
        }
    };
    let mut edit = RawEdit::default();
    let mut n = None;
    let mut size = None;
    let mut model = None;
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or("").to_string();
        match name.as_str() {
            "image" | "image[]" => {
                let bytes: Bytes = field.bytes().await.map_err(bad)?;
                if edit.image.replace(bytes).is_some() {
                    return Err(OpenAiError::at(
                        "image",
                        ServiceError::invalid("rl4pix edits one image per request; send one `image`"),
                    ));
                }
                continue;
            }
            "mask" => {
                return Err(OpenAiError::at(
                    "mask",
                    ServiceError::bad_request(
                        "masks are not supported: rl4pix finds the region to edit from the prompt alone",
                    ),
                ))
            }
            _ => {}
        }
        let text = super::edit_parse::utf8_text(field.bytes().await.map_err(bad)?, &name)?;
        match name.as_str() {
            "prompt" => edit.instruction = Some(text),
            "model" => model = Some(text),
            "n" => n = Some(number("n", &text)?),
            "size" => size = parse_size(state, &text)?,
            "response_format" => match text.trim() {
                "b64_json" | "" => {}
                "url" => {
                    return Err(OpenAiError::at(
                        "response_format",
                        ServiceError::bad_request(
                            "response_format `url` is not offered: rl4pix keeps no image store; use b64_json",
                        ),
                    ))
                }
                other => {
                    return Err(OpenAiError::at(
                        "response_format",
                        ServiceError::invalid(format!(
                            "response_format must be b64_json, got {:?}",
                            other.chars().take(32).collect::<String>()
                        )),
                    ))
                }
            },
            "stream" if text.trim() == "true" => {
                return Err(OpenAiError::at(
                    "stream",
                    ServiceError::bad_request(
                        "streaming partial images is not offered; follow progress with POST /edit and /jobs/{id}/events",
                    ),
                ))
            }
            "output_format" => edit.output_format = Some(text),
            "seed" => edit.seed = Some(number("seed", &text)?),
            "steps" => edit.steps = Some(number("steps", &text)?),
            "guidance_scale" => edit.guidance_scale = Some(number("guidance_scale", &text)?),
            "image_guidance_scale" => {
                edit.image_guidance_scale = Some(number("image_guidance_scale", &text)?)
            }
            "scheduler" => edit.scheduler = Some(text),
            "working_size" => edit.working_size = Some(text),
            "keep_input" => edit.keep_input = Some(number("keep_input", &text)?),
            // OpenAI's knobs that have no meaning here; accepted so that tools keep working.
            "user" | "quality" | "background" | "output_compression" | "input_fidelity"
            | "moderation" | "partial_images" | "stream" => {}
            other => {
                return Err(ServiceError::invalid(format!(
                    "unknown form field `{}`; expected image, prompt, model, n, size, response_format, output_format (or rl4pix's seed, steps, guidance_scale, image_guidance_scale, scheduler, working_size, keep_input)",
                    clipped(other)
                ))
                .into())
            }
        }
    }
    if edit.image.is_none() {
        return Err(OpenAiError::at(
            "image",
            ServiceError::invalid("missing `image` (a PNG, JPEG or WebP file)"),
        ));
    }
    if edit.instruction.is_none() {
        return Err(OpenAiError::at(
            "prompt",
            ServiceError::invalid("missing `prompt` (the instruction)"),
        ));
    }
    let n = n.unwrap_or(1);
    if !(1..=MAX_IMAGES).contains(&n) {
        return Err(OpenAiError::at(
            "n",
            ServiceError::invalid(format!("n must be between 1 and {MAX_IMAGES}, got {n}")),
        ));
    }
    edit.adapter = resolve_model(state, model)?;
    Ok(EditsRequest { edit, n, size })
}

fn number<T: std::str::FromStr>(param: &'static str, text: &str) -> Result<T, OpenAiError> {
    super::edit_parse::parse_integral(text.trim()).ok_or_else(|| {
        OpenAiError::at(
            param,
            ServiceError::invalid(format!(
                "`{param}` must be a number, got {:?}",
                text.chars().take(32).collect::<String>()
            )),
        )
    })
}

/// `model` names the base (answered as adapter `none`) or an adapter.
fn resolve_model(state: &AppState, model: Option<String>) -> Result<Option<String>, OpenAiError> {
    let Some(model) = model.filter(|m| !m.trim().is_empty()) else {
        return Ok(None);
    };
    if model == state.service.info().model {
        return Ok(Some("none".into()));
    }
    let adapters = state.service.status().adapters;
    if adapters.contains(&model) {
        return Ok(Some(model));
    }
    Err(OpenAiError::at(
        "model",
        ServiceError::not_found(
            "model_not_found",
            format!(
                "model {:?} is neither the base model ({:?}) nor an adapter ({adapters:?}); GET /v1/models lists them",
                clipped(&model),
                state.service.info().model
            ),
        ),
    ))
}

fn parse_size(state: &AppState, text: &str) -> Result<Option<(u32, u32)>, OpenAiError> {
    let text = text.trim();
    if text.is_empty() || text == "auto" {
        return Ok(None);
    }
    let parsed = text
        .split_once('x')
        .and_then(|(w, h)| Some((w.parse::<u32>().ok()?, h.parse::<u32>().ok()?)));
    let Some((w, h)) = parsed.filter(|(w, h)| *w > 0 && *h > 0) else {
        return Err(OpenAiError::at(
            "size",
            ServiceError::invalid(format!(
                "size must be WIDTHxHEIGHT (e.g. 256x256) or auto, got {:?}",
                text.chars().take(32).collect::<String>()
            )),
        ));
    };
    let pixels = w as u64 * h as u64;
    if pixels > state.service.limits().max_pixels {
        return Err(OpenAiError::at(
            "size",
            ServiceError::too_large(
                "image_too_large",
                format!(
                    "size {w}x{h} is {pixels} pixels; the limit is {} (--max-pixels)",
                    state.service.limits().max_pixels
                ),
            ),
        ));
    }
    Ok(Some((w, h)))
}

/// The result's bytes at the asked size (re-encoded in its own format only when resized).
async fn resized(
    result: &EditResult,
    size: Option<(u32, u32)>,
) -> Result<(Bytes, (u32, u32)), ServiceError> {
    let current = (result.width, result.height);
    let Some(target) = size.filter(|s| *s != current) else {
        return Ok((result.bytes.clone(), current));
    };
    let bytes = result.bytes.clone();
    tokio::task::spawn_blocking(move || {
        let image = image::load_from_memory(&bytes)
            .map_err(|e| ServiceError::internal(format!("cannot read back the result: {e}")))?;
        let format = image::guess_format(&bytes)
            .map_err(|e| ServiceError::internal(format!("cannot read back the result: {e}")))?;
        let scaled = image.resize_exact(target.0, target.1, image::imageops::FilterType::Lanczos3);
        let mut out = Cursor::new(Vec::new());
        scaled
            .to_rgb8()
            .write_to(&mut out, format)
            .map_err(|e| ServiceError::internal(format!("cannot encode the result: {e}")))?;
        Ok((Bytes::from(out.into_inner()), target))
    })
    .await
    .map_err(|e| ServiceError::internal(format!("resizing task failed: {e}")))?
}

#[utoipa::path(
    get,
    path = "/v1/models",
    tag = "openai",
    security((), ("bearer" = [])),
    responses(
        (status = 200, description = "What `model` may name: the base model and every adapter", body = ModelList),
        (status = 401, description = "`--openai-api-key` is set and the bearer is missing or wrong", body = OpenAiErrorBody),
    )
)]
pub async fn models(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Response {
    if let Err(e) = check_bearer(&state, &headers) {
        return e.into_response();
    }
    let entry = |id: String, owned_by: &str| ModelEntry {
        id,
        object: "model".into(),
        created: 0,
        owned_by: owned_by.into(),
    };
    let mut data = vec![entry(state.service.info().model.clone(), "rl4pix")];
    data.extend(
        state
            .service
            .status()
            .adapters
            .into_iter()
            .map(|name| entry(name, "rl4pix-adapter")),
    );
    axum::Json(ModelList {
        object: "list".into(),
        data,
    })
    .into_response()
}
