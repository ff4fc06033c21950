//! The wire forms of `POST /edit`: its two request bodies, its JSON answer and the 202 answer
//! of an async edit.

use base64::Engine;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::edit::EditResult;

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
    /// `model` (default, `--working-size`): run at the model's recorded working size
    /// (`model.working_size` in `/info`) and scale the result back to the input's size;
    /// `input`: run at the input's own size. The size that ran is echoed in `x-working-size`.
    working_size: Option<String>,
    /// With `working_size=model`: keep the input's own pixels where the model changed
    /// nothing (default true); false: the whole result is the scaled model output.
    keep_input: Option<bool>,
}

/// `application/json` body of `POST /edit`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"image": "iVBORw0KGgo...", "instruction": "make the circle blue", "steps": 20, "seed": 42}))]
pub struct EditJsonRequest {
    /// The image, base64 (standard alphabet; a `data:image/...;base64,` prefix is accepted).
    pub image: String,
    pub instruction: String,
    #[serde(default, deserialize_with = "whole_number")]
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub image_guidance_scale: Option<f64>,
    #[serde(default, deserialize_with = "whole_number")]
    pub seed: Option<u64>,
    pub scheduler: Option<String>,
    pub adapter: Option<String>,
    pub output_format: Option<String>,
    pub working_size: Option<String>,
    pub keep_input: Option<bool>,
}

/// An optional integer that may also be written as a whole float (`2.0`): JSON Schema's
/// `integer`, which the OpenAPI document promises.
fn whole_number<'de, D, T>(deserializer: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: TryFrom<u64>,
{
    use serde::de::Error;
    let Some(number) = Option::<serde_json::Number>::deserialize(deserializer)? else {
        return Ok(None);
    };
    let whole = number.as_u64().or_else(|| {
        let value = number.as_f64()?;
        (value.fract() == 0.0 && value >= 0.0 && value < 2f64.powi(64)).then_some(value as u64)
    });
    whole
        .and_then(|n| T::try_from(n).ok())
        .map(Some)
        .ok_or_else(|| D::Error::custom(format!("expected a whole number in range, got {number}")))
}

// The wire form of `edit::EditResult`, built by `From`: only `http/` derives OpenAPI schemas.
/// The answer to `POST /edit` with `Accept: application/json`.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"edit_id": "5f0c2a9e4b7d41c3a8e1f6d2b9c07a15", "seed": 42, "adapter": "none",
    "width": 40, "height": 24, "working_width": 40, "working_height": 24, "format": "png", "queue_ms": 3, "inference_ms": 41, "batch_size": 1,
    "image": "iVBORw0KGgo..."}))]
pub struct EditJsonResponse {
    /// For `/attention/{edit_id}`.
    pub edit_id: String,
    pub seed: u64,
    pub adapter: String,
    pub width: u32,
    pub height: u32,
    /// The size the model ran at.
    pub working_width: u32,
    pub working_height: u32,
    pub format: String,
    pub queue_ms: u64,
    pub inference_ms: u64,
    pub batch_size: usize,
    /// The edited image, base64.
    pub image: String,
}

impl From<&EditResult> for EditJsonResponse {
    fn from(result: &EditResult) -> Self {
        Self {
            edit_id: result.edit_id.clone(),
            seed: result.seed,
            adapter: result.adapter.clone(),
            width: result.width,
            height: result.height,
            working_width: result.working_width,
            working_height: result.working_height,
            format: result.format.name().into(),
            queue_ms: result.queue_ms,
            inference_ms: result.inference_ms,
            batch_size: result.batch_size,
            image: base64::engine::general_purpose::STANDARD.encode(&result.bytes),
        }
    }
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
