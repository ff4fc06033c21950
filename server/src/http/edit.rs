//! `POST /edit`: parse (multipart or JSON), check every limit before decoding, admit to the
//! queue, wait for the worker, answer the image (or JSON). With `Prefer: respond-async` the
//! same checks run, then it answers 202 with a job (see `crate::jobs`, `super::jobs`).

use std::io::Cursor;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use image::{ImageFormat, RgbImage};
use rl4pix_model::pipeline::EditParams;
use rl4pix_model::scheduler::SchedulerKind;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use utoipa::ToSchema;

use super::AppState;
use crate::adapters::AdapterEntry;
use crate::attention_cache::CachedEdit;
use crate::backend::{BackendError, BatchItem};
use crate::config::Limits;
use crate::error::{ApiError, ErrorBody};
use crate::jobs::{JobRecord, Outcome};
use crate::queue::{CancelToken, Job, JobError, JobOutput, QueueError};

/// `multipart/form-data` body of `POST /edit`.
#[derive(ToSchema)]
#[allow(dead_code)]
pub struct EditForm {
    /// PNG, JPEG or WebP.
    #[schema(value_type = String, content_media_type = "application/octet-stream")]
    image: Vec<u8>,
    #[schema(example = "put a red circle in the top left")]
    instruction: String,
    /// Denoising steps (default `--default-steps`, at most `--max-steps`).
    steps: Option<usize>,
    /// Text guidance, 0..=50 (default: the model's, `default_guidance_scale` in `/info`).
    guidance_scale: Option<f64>,
    /// Image guidance, 0..=20 (default: the model's, `default_image_guidance_scale` in `/info`).
    image_guidance_scale: Option<f64>,
    /// Random when absent; always echoed in `x-seed`.
    seed: Option<u64>,
    /// `ddim` or `euler-ancestral`; default: the model's own.
    scheduler: Option<String>,
    /// An adapter name from `--adapters`; `none` for the base model; absent: the default
    /// adapter (`PUT /adapters/default`, `--default-adapter`), else the base model.
    adapter: Option<String>,
    /// `png` (default), `jpeg` or `webp`.
    output_format: Option<String>,
}

/// `application/json` body of `POST /edit`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"image": "iVBORw0KGgo...", "instruction": "make the circle blue", "steps": 20, "seed": 42}))]
pub struct EditJsonRequest {
    /// The image, base64 (standard alphabet; a `data:image/...;base64,` prefix is accepted).
    pub image: String,
    pub instruction: String,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub image_guidance_scale: Option<f64>,
    pub seed: Option<u64>,
    pub scheduler: Option<String>,
    pub adapter: Option<String>,
    pub output_format: Option<String>,
}

/// The answer to `POST /edit` with `Accept: application/json`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"edit_id": "5f0c2a9e4b7d41c3a8e1f6d2b9c07a15", "seed": 42, "adapter": "none",
    "width": 40, "height": 24, "format": "png", "queue_ms": 3, "inference_ms": 41, "batch_size": 1,
    "image": "iVBORw0KGgo..."}))]
pub struct EditJsonResponse {
    /// For `/attention/{edit_id}`.
    pub edit_id: String,
    pub seed: u64,
    pub adapter: String,
    pub width: u32,
    pub height: u32,
    pub format: String,
    pub queue_ms: u64,
    pub inference_ms: u64,
    pub batch_size: usize,
    /// The edited image, base64.
    pub image: String,
}

/// Everything a request asked for, before any checking.
#[derive(Default)]
pub(crate) struct RawEdit {
    pub image: Option<Bytes>,
    pub instruction: Option<String>,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub image_guidance_scale: Option<f64>,
    pub seed: Option<u64>,
    pub scheduler: Option<String>,
    pub adapter: Option<String>,
    pub output_format: Option<String>,
}

#[derive(Debug, Clone, Copy)]
enum OutputFormat {
    Png,
    Jpeg,
    WebP,
}

impl OutputFormat {
    fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Some(Self::Png),
            "jpeg" | "jpg" => Some(Self::Jpeg),
            "webp" => Some(Self::WebP),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::WebP => "webp",
        }
    }

    fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::WebP => "image/webp",
        }
    }
}

/// A request that passed every check that needs no decoding.
struct CheckedEdit {
    image: Bytes,
    image_format: ImageFormat,
    instruction: String,
    params: EditParams,
    adapter: Option<Arc<AdapterEntry>>,
    output_format: OutputFormat,
}

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
        (status = 413, description = "Body or declared pixel count over the limit", body = ErrorBody),
        (status = 415, description = "Body not multipart/JSON, or image not PNG/JPEG/WebP", body = ErrorBody),
        (status = 422, description = "Missing or out-of-range parameter", body = ErrorBody),
        (status = 429, description = "Queue full; retry after `Retry-After` seconds", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds"))),
        (status = 503, description = "Shutting down, or the worker is not running", body = ErrorBody),
        (status = 504, description = "Not done within --request-timeout-s; its work was dropped", body = ErrorBody),
    )
)]
pub async fn edit(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let admitted = admit(&state, &headers, body).await?;
    if prefers_async(&headers) {
        let (job, reply) = admitted.job(&state);
        return submit_async(state, job, reply, admitted.meta);
    }
    let result = run_to_end(&state, admitted).await?;
    Ok(result.response(wants_json(&headers)))
}

/// Checks, decodes, queues and waits for one edit given as fields (the OpenAI-compatible route).
pub(crate) async fn edit_fields(state: &AppState, raw: RawEdit) -> Result<EditResult, ApiError> {
    let admitted = admit_fields(state, raw).await?;
    run_to_end(state, admitted).await
}

/// The synchronous path: queue, wait under the request deadline, encode.
async fn run_to_end(state: &AppState, admitted: Admitted) -> Result<EditResult, ApiError> {
    let (job, reply) = admitted.job(state);
    let deadline = tokio::time::Instant::from_std(job.deadline);
    // Dropped with this future when the client disconnects: the worker then skips or cancels it.
    let _cancel_on_drop = CancelOnDrop(job.cancel.clone());
    push(state, job)?;
    let output = match tokio::time::timeout_at(deadline, reply).await {
        Ok(Ok(Ok(output))) => output,
        Ok(Ok(Err(job_error))) => {
            let outcome = match job_error {
                JobError::TimedOut => "timeout",
                _ => "error",
            };
            state.metrics.edit_outcome(outcome);
            return Err(job_error.into());
        }
        Ok(Err(_closed)) if tokio::time::Instant::now() < deadline => {
            state.metrics.edit_outcome("error");
            return Err(worker_dropped());
        }
        _ => {
            state.metrics.edit_outcome("timeout");
            return Err(ApiError::timeout(format!(
                "the edit did not finish within {} s (--request-timeout-s); its work was dropped",
                state.limits.request_timeout_s
            )));
        }
    };
    state.metrics.edit_outcome("ok");
    finish(state, admitted.edit_id, admitted.meta, output).await
}

/// An edit that passed every check, ready for the queue.
struct Admitted {
    edit_id: String,
    item: BatchItem,
    adapter: Option<Arc<AdapterEntry>>,
    meta: ResultMeta,
}

impl Admitted {
    fn job(&self, state: &AppState) -> (Job, oneshot::Receiver<Result<JobOutput, JobError>>) {
        Job::new(
            self.edit_id.clone(),
            self.item.clone(),
            self.adapter.clone(),
            state.info.vae_scale_factor,
            state.limits.request_timeout(),
        )
    }
}

/// What the answer needs besides the model's output.
struct ResultMeta {
    seed: u64,
    adapter: String,
    output_format: OutputFormat,
    instruction: String,
    image: Arc<RgbImage>,
}

/// A finished edit, encoded: what the synchronous answer and `GET /jobs/{id}/result` serve.
#[derive(Debug)]
pub struct EditResult {
    pub edit_id: String,
    pub seed: u64,
    pub adapter: String,
    pub width: u32,
    pub height: u32,
    format: OutputFormat,
    pub queue_ms: u64,
    pub inference_ms: u64,
    pub batch_size: usize,
    pub bytes: Bytes,
}

impl EditResult {
    pub fn content_type(&self) -> &'static str {
        self.format.mime()
    }

    /// The image with its `x-*` headers, or JSON with the image in base64.
    pub fn response(&self, json: bool) -> Response {
        if json {
            let body = EditJsonResponse {
                edit_id: self.edit_id.clone(),
                seed: self.seed,
                adapter: self.adapter.clone(),
                width: self.width,
                height: self.height,
                format: self.format.name().into(),
                queue_ms: self.queue_ms,
                inference_ms: self.inference_ms,
                batch_size: self.batch_size,
                image: base64::engine::general_purpose::STANDARD.encode(&self.bytes),
            };
            return axum::Json(body).into_response();
        }
        let mut response = (StatusCode::OK, self.bytes.clone()).into_response();
        let h = response.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(self.content_type()),
        );
        let pairs = [
            ("x-edit-id", self.edit_id.clone()),
            ("x-seed", self.seed.to_string()),
            ("x-adapter", self.adapter.clone()),
            ("x-queue-ms", self.queue_ms.to_string()),
            ("x-inference-ms", self.inference_ms.to_string()),
            ("x-batch-size", self.batch_size.to_string()),
        ];
        for (name, value) in pairs {
            if let Ok(v) = HeaderValue::from_str(&value) {
                h.insert(name, v);
            }
        }
        response
    }
}

/// Everything up to the queue: readiness, room, body, checks, decoding.
async fn admit(state: &AppState, headers: &HeaderMap, body: Body) -> Result<Admitted, ApiError> {
    if !state.is_ready() {
        return Err(ApiError::unavailable(
            "the server is not ready (starting or shutting down)",
        ));
    }
    // Refuse before reading or decoding anything when there is clearly no room; `push` is the
    // exact check.
    if !state.queue.has_room() {
        state.metrics.edit_outcome("rejected");
        return Err(ApiError::overloaded(
            QueueError::Full {
                capacity: state.queue.capacity(),
            }
            .to_string(),
            retry_after_s(state),
        ));
    }
    let limit = state.limits.max_body_bytes;
    if let Some(length) = content_length(headers) {
        if length > limit as u64 {
            return Err(body_too_large(limit));
        }
    }
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let mime = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let raw = match mime.as_str() {
        "multipart/form-data" => {
            let bytes = read_body(body, limit).await?;
            parse_multipart(&content_type, bytes).await?
        }
        "application/json" => parse_json(&read_body(body, limit).await?)?,
        "" => {
            return Err(ApiError::unsupported_media(
                "missing Content-Type: send multipart/form-data or application/json",
            ))
        }
        other => {
            return Err(ApiError::unsupported_media(format!(
                "Content-Type {other} is not accepted: send multipart/form-data or application/json"
            )))
        }
    };
    admit_fields(state, raw).await
}

/// Everything after parsing: checks, then decoding.
async fn admit_fields(state: &AppState, raw: RawEdit) -> Result<Admitted, ApiError> {
    let checked = check(raw, state)?;
    let adapter_name = checked
        .adapter
        .as_ref()
        .map(|a| a.adapter.name.clone())
        .unwrap_or_else(|| "none".into());
    let image = Arc::new(decode(checked.image, checked.image_format, &state.limits).await?);
    let meta = ResultMeta {
        seed: checked.params.seed,
        adapter: adapter_name,
        output_format: checked.output_format,
        instruction: checked.instruction.clone(),
        image: image.clone(),
    };
    Ok(Admitted {
        // Unguessable: async job ids double as the only credential to a job.
        edit_id: format!("{:032x}", rand::random::<u128>()),
        item: BatchItem {
            image,
            instruction: checked.instruction,
            params: checked.params,
        },
        adapter: checked.adapter,
        meta,
    })
}

/// Admits a job or answers why not (429 with Retry-After when the queue is full).
fn push(state: &AppState, job: Job) -> Result<(), ApiError> {
    state.queue.push(job).map_err(|e| match e {
        QueueError::Full { .. } => {
            state.metrics.edit_outcome("rejected");
            ApiError::overloaded(e.to_string(), retry_after_s(state))
        }
        QueueError::Closed => e.into(),
    })
}

fn worker_dropped() -> ApiError {
    ApiError::unavailable("the worker dropped the edit (shutting down?)")
}

/// Keeps the attention maps for `/attention` and encodes the image.
async fn finish(
    state: &AppState,
    edit_id: String,
    meta: ResultMeta,
    output: JobOutput,
) -> Result<EditResult, ApiError> {
    if let Some(attention) = output.attention {
        state.attention.insert(
            edit_id.clone(),
            CachedEdit {
                instruction: meta.instruction,
                image: meta.image,
                attention,
            },
        );
    }
    let (width, height) = output.image.dimensions();
    let format = meta.output_format;
    let image = output.image;
    let encoded = tokio::task::spawn_blocking(move || encode(&image, format))
        .await
        .map_err(|e| ApiError::internal(format!("encoding task failed: {e}")))??;
    Ok(EditResult {
        edit_id,
        seed: meta.seed,
        adapter: meta.adapter,
        width,
        height,
        format,
        queue_ms: output.queue_time.as_millis() as u64,
        inference_ms: output.inference_time.as_millis() as u64,
        batch_size: output.batch_size,
        bytes: Bytes::from(encoded),
    })
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

/// The 202 answer to `Prefer: respond-async`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"id": "0c9d3f5be1a84e27b61f0a4d2c8e7b13", "status": "queued",
    "status_url": "/jobs/0c9d3f5be1a84e27b61f0a4d2c8e7b13",
    "events_url": "/jobs/0c9d3f5be1a84e27b61f0a4d2c8e7b13/events",
    "result_url": "/jobs/0c9d3f5be1a84e27b61f0a4d2c8e7b13/result"}))]
pub struct JobAccepted {
    /// The job id (128 random bits, hex); also the edit id for `/attention/{edit_id}`.
    pub id: String,
    pub status: String,
    pub status_url: String,
    pub events_url: String,
    pub result_url: String,
}

/// Queues the job and answers 202 at once; a task waits for the worker and records the outcome.
/// The job is not tied to this connection: closing it cancels nothing.
fn submit_async(
    state: Arc<AppState>,
    job: Job,
    reply: oneshot::Receiver<Result<JobOutput, JobError>>,
    meta: ResultMeta,
) -> Result<Response, ApiError> {
    let id = job.id.clone();
    let record = Arc::new(JobRecord::new(
        id.clone(),
        meta.seed,
        meta.adapter.clone(),
        job.cancel.clone(),
        job.progress.clone(),
    ));
    // Stored before it is queued: the worker may finish it before this handler returns.
    state.jobs.insert(record.clone());
    if let Err(e) = push(&state, job) {
        state.jobs.withdraw(&id);
        return Err(e);
    }
    tokio::spawn(supervise(state, record, reply, meta));
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
    Ok(response)
}

async fn supervise(
    state: Arc<AppState>,
    record: Arc<JobRecord>,
    reply: oneshot::Receiver<Result<JobOutput, JobError>>,
    meta: ResultMeta,
) {
    let received = reply.await;
    // Cancelled meanwhile: the result, if any, is discarded unencoded.
    if record.finished().is_some() {
        return;
    }
    let outcome = match received {
        Ok(Ok(output)) => match finish(&state, record.id.clone(), meta, output).await {
            Ok(result) => Outcome::Done(result),
            Err(e) => Outcome::failed(e),
        },
        Ok(Err(JobError::Cancelled)) => Outcome::Cancelled,
        Ok(Err(JobError::Backend(e))) if matches!(*e, BackendError::Cancelled) => {
            Outcome::Cancelled
        }
        Ok(Err(e)) => Outcome::failed(e.into()),
        Err(_closed) if record.cancel.is_cancelled() => Outcome::Cancelled,
        Err(_closed) => Outcome::failed(worker_dropped()),
    };
    let edit_outcome = match &outcome {
        Outcome::Done(_) => Some("ok"),
        Outcome::Failed { error_type, .. } if *error_type == "timeout" => Some("timeout"),
        Outcome::Failed { .. } => Some("error"),
        // The queue or the worker counted it.
        Outcome::Cancelled => None,
    };
    if state.jobs.finish(&record, outcome) {
        if let Some(label) = edit_outcome {
            state.metrics.edit_outcome(label);
        }
    }
}

struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

fn body_too_large(limit: usize) -> ApiError {
    ApiError::too_large(
        "payload_too_large",
        format!("the body is larger than {limit} bytes (--max-body-bytes)"),
    )
}

async fn read_body(body: Body, limit: usize) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(body_too_large(limit)),
        Err(e) => Err(ApiError::bad_request(format!("cannot read the body: {e}"))),
    }
}

pub fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("application/json"))
}

/// Seconds until the queue has likely room again, from the mean batch time so far.
fn retry_after_s(state: &AppState) -> u64 {
    let hist = &state.metrics.inference_seconds;
    let mean = if hist.get_sample_count() > 0 {
        hist.get_sample_sum() / hist.get_sample_count() as f64
    } else {
        1.0
    };
    let batches_ahead = state.queue.depth() as f64 / state.batching.max_batch_size as f64;
    (mean * (batches_ahead + 1.0)).ceil().clamp(1.0, 60.0) as u64
}

fn parse_json(bytes: &[u8]) -> Result<RawEdit, ApiError> {
    let request: EditJsonRequest = serde_json::from_slice(bytes).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            ApiError::invalid(format!("JSON body: {e}"))
        } else {
            ApiError::bad_request(format!("the body is not valid JSON: {e}"))
        }
    })?;
    let encoded = match request.image.find(";base64,") {
        Some(i) if request.image.starts_with("data:") => &request.image[i + 8..],
        _ => request.image.as_str(),
    };
    let image = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| ApiError::bad_request(format!("`image` is not valid base64: {e}")))?;
    Ok(RawEdit {
        image: Some(Bytes::from(image)),
        instruction: Some(request.instruction),
        steps: request.steps,
        guidance_scale: request.guidance_scale,
        image_guidance_scale: request.image_guidance_scale,
        seed: request.seed,
        scheduler: request.scheduler,
        adapter: request.adapter,
        output_format: request.output_format,
    })
}

async fn parse_multipart(content_type: &str, bytes: Bytes) -> Result<RawEdit, ApiError> {
    // The body is already read under --max-body-bytes; multer parses it as it is (axum's
    // extractor would apply its own 2 MiB default to a request rebuilt here).
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ApiError::bad_request(format!("bad multipart request: {e}")))?;
    let body = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(bytes) });
    let mut form = multer::Multipart::new(body, boundary);
    let mut raw = RawEdit::default();
    let bad = |e: multer::Error| ApiError::bad_request(format!("bad multipart body: {e}"));
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or("").to_string();
        if name == "image" {
            set_once(&mut raw.image, field.bytes().await.map_err(bad)?, &name)?;
            continue;
        }
        let text = field.text().await.map_err(bad)?;
        match name.as_str() {
            "instruction" => set_once(&mut raw.instruction, text, &name)?,
            "steps" => set_once(&mut raw.steps, parse_number(&name, &text)?, &name)?,
            "guidance_scale" => {
                set_once(&mut raw.guidance_scale, parse_number(&name, &text)?, &name)?
            }
            "image_guidance_scale" => set_once(
                &mut raw.image_guidance_scale,
                parse_number(&name, &text)?,
                &name,
            )?,
            "seed" => set_once(&mut raw.seed, parse_number(&name, &text)?, &name)?,
            "scheduler" => set_once(&mut raw.scheduler, text, &name)?,
            "adapter" => set_once(&mut raw.adapter, text, &name)?,
            "output_format" => set_once(&mut raw.output_format, text, &name)?,
            other => {
                return Err(ApiError::invalid(format!(
                    "unknown form field `{}`; expected image, instruction, steps, guidance_scale, image_guidance_scale, seed, scheduler, adapter, output_format",
                    other.chars().take(64).collect::<String>()
                )))
            }
        }
    }
    Ok(raw)
}

fn set_once<T>(slot: &mut Option<T>, value: T, name: &str) -> Result<(), ApiError> {
    if slot.is_some() {
        return Err(ApiError::invalid(format!(
            "form field `{name}` given twice"
        )));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_number<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, ApiError> {
    text.trim().parse().map_err(|_| {
        ApiError::invalid(format!(
            "`{name}` must be a number, got {:?}",
            text.chars().take(32).collect::<String>()
        ))
    })
}

/// Every check that needs no pixel decoding: parameters, adapter, format and declared size.
fn check(raw: RawEdit, state: &AppState) -> Result<CheckedEdit, ApiError> {
    let limits = &state.limits;
    let image = raw
        .image
        .ok_or_else(|| ApiError::invalid("missing `image` (a PNG, JPEG or WebP file)"))?;
    let instruction = raw
        .instruction
        .ok_or_else(|| ApiError::invalid("missing `instruction`"))?;
    let chars = instruction.chars().count();
    if instruction.trim().is_empty() {
        return Err(ApiError::invalid("`instruction` must not be empty"));
    }
    if chars > limits.max_instruction_chars {
        return Err(ApiError::invalid(format!(
            "`instruction` has {chars} characters; the limit is {}",
            limits.max_instruction_chars
        )));
    }
    let steps = raw.steps.unwrap_or(limits.default_steps);
    if steps == 0 || steps > limits.max_steps {
        return Err(ApiError::invalid(format!(
            "steps must be between 1 and {}, got {steps}",
            limits.max_steps
        )));
    }
    let guidance_scale = raw
        .guidance_scale
        .unwrap_or(state.info.default_guidance_scale);
    let image_guidance_scale = raw
        .image_guidance_scale
        .unwrap_or(state.info.default_image_guidance_scale);
    check_range("guidance_scale", guidance_scale, limits.max_guidance_scale)?;
    check_range(
        "image_guidance_scale",
        image_guidance_scale,
        limits.max_image_guidance_scale,
    )?;
    let scheduler = match raw.scheduler.as_deref() {
        None | Some("") | Some("default") => None,
        Some(name) => Some(SchedulerKind::parse(name).ok_or_else(|| {
            ApiError::invalid(format!(
                "scheduler must be ddim or euler-ancestral, got {:?}",
                name.chars().take(32).collect::<String>()
            ))
        })?),
    };
    let output_format = match raw.output_format.as_deref() {
        None | Some("") => OutputFormat::Png,
        Some(name) => OutputFormat::parse(name).ok_or_else(|| {
            ApiError::invalid(format!(
                "output_format must be png, jpeg or webp, got {:?}",
                name.chars().take(32).collect::<String>()
            ))
        })?,
    };
    // Pins the version (an Arc) the request runs with, whatever happens to the name later.
    let adapter = state.adapters.for_request(raw.adapter.as_deref())?;
    let image_format = check_declared_image(&image, limits)?;
    Ok(CheckedEdit {
        image,
        image_format,
        instruction,
        params: EditParams {
            steps,
            guidance_scale,
            image_guidance_scale,
            seed: raw.seed.unwrap_or_else(random_seed),
            scheduler,
            eta: 0.0,
            capture_attention: false,
        },
        adapter,
        output_format,
    })
}

/// Seeds stay below 2^53 so that JSON clients read them back exactly.
fn random_seed() -> u64 {
    rand::random::<u64>() >> 11
}

fn check_range(name: &str, value: f64, max: f64) -> Result<(), ApiError> {
    if !value.is_finite() || !(0.0..=max).contains(&value) {
        return Err(ApiError::invalid(format!(
            "{name} must be between 0 and {max}, got {value}"
        )));
    }
    Ok(())
}

/// Sniffs the format and reads only the header's dimensions, so a tiny file that claims a
/// huge canvas is refused before any pixel is allocated.
fn check_declared_image(bytes: &[u8], limits: &Limits) -> Result<ImageFormat, ApiError> {
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Ok(other) => {
            return Err(ApiError::unsupported_media(format!(
                "{other:?} images are not accepted: send PNG, JPEG or WebP"
            )))
        }
        Err(_) => {
            return Err(ApiError::unsupported_media(
                "`image` is not a recognised image: send PNG, JPEG or WebP",
            ))
        }
    };
    let (width, height) = image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_image",
                format!("cannot read the image header: {e}"),
            )
        })?;
    let pixels = width as u64 * height as u64;
    if pixels == 0 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "invalid_image",
            "the image has no pixels",
        ));
    }
    if pixels > limits.max_pixels {
        return Err(ApiError::too_large(
            "image_too_large",
            format!(
                "the image is {width}x{height} = {pixels} pixels; the limit is {} (--max-pixels)",
                limits.max_pixels
            ),
        ));
    }
    Ok(format)
}

async fn decode(bytes: Bytes, format: ImageFormat, limits: &Limits) -> Result<RgbImage, ApiError> {
    let max_pixels = limits.max_pixels;
    tokio::task::spawn_blocking(move || {
        let mut reader = image::ImageReader::with_format(Cursor::new(&bytes[..]), format);
        let mut decode_limits = image::Limits::default();
        // RGBA at 16 bits per channel is the most a decoder may need per pixel.
        decode_limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
        reader.limits(decode_limits);
        reader.decode().map(|img| img.to_rgb8()).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_image",
                format!("cannot decode the image: {e}"),
            )
        })
    })
    .await
    .map_err(|e| ApiError::internal(format!("decoding task failed: {e}")))?
}

fn encode(image: &RgbImage, format: OutputFormat) -> Result<Vec<u8>, ApiError> {
    let mut out = Cursor::new(Vec::new());
    let result = match format {
        OutputFormat::Png => image.write_to(&mut out, ImageFormat::Png),
        OutputFormat::WebP => image.write_to(&mut out, ImageFormat::WebP),
        OutputFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(image)
        }
    };
    result.map_err(|e| ApiError::internal(format!("cannot encode the result: {e}")))?;
    Ok(out.into_inner())
}
