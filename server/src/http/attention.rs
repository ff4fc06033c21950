//! `GET /attention/{edit_id}` (heat-map overlay PNG) and `/attention/{edit_id}/tokens` (JSON),
//! from the service's bounded cache of recent edits.

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use super::error::ErrorBody;
use super::state::AppState;
use crate::error::ServiceError;

#[derive(Debug, Deserialize, IntoParams)]
#[into_params(parameter_in = Query)]
pub struct OverlayQuery {
    /// One word of the instruction (case-insensitive); default: all of its words.
    pub word: Option<String>,
    /// Heat-map opacity in 0..=1 (default 0.6).
    pub opacity: Option<f32>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct TokensResponse {
    pub edit_id: String,
    pub instruction: String,
    /// Latent grid of the maps.
    pub height: usize,
    pub width: usize,
    /// Peak of the instruction's averaged map.
    pub peak: f32,
    pub words: Vec<WordInfo>,
}

#[derive(Debug, Serialize, Deserialize, ToSchema)]
#[schema(example = json!({"word": "circle", "tokens": [5, 6], "peak": 0.083, "peak_x": 3, "peak_y": 1}))]
pub struct WordInfo {
    pub word: String,
    /// Token positions `[start, end)` in the padded prompt (position 0 is the start token).
    pub tokens: [usize; 2],
    /// Largest attention value of the word's map.
    pub peak: f32,
    /// Latent cell of the peak.
    pub peak_x: usize,
    pub peak_y: usize,
}

#[utoipa::path(
    get,
    path = "/attention/{edit_id}",
    tag = "attention",
    params(("edit_id" = String, Path, description = "From `x-edit-id`"), OverlayQuery),
    responses(
        (status = 200, description = "PNG: the input with the instruction's cross-attention as a heat map", content_type = "image/png"),
        (status = 400, description = "Bad query", body = ErrorBody),
        (status = 404, description = "Unknown or evicted edit, or a word not in the instruction", body = ErrorBody),
    )
)]
pub async fn overlay(
    State(state): State<Arc<AppState>>,
    Path(edit_id): Path<String>,
    query: Result<Query<OverlayQuery>, QueryRejection>,
) -> Result<Response, ServiceError> {
    let Query(query) = query.map_err(|e| ServiceError::bad_request(e.body_text()))?;
    let edit = state.service.attention_of(&edit_id)?;
    let opacity = query.opacity.unwrap_or(0.6);
    if !(0.0..=1.0).contains(&opacity) {
        return Err(ServiceError::bad_request(format!(
            "opacity must be between 0 and 1, got {opacity}"
        )));
    }
    let png = state
        .service
        .attention_overlay(edit, query.word.as_deref(), opacity)
        .await?;
    Ok((
        [(header::CONTENT_TYPE, HeaderValue::from_static("image/png"))],
        png,
    )
        .into_response())
}

#[utoipa::path(
    get,
    path = "/attention/{edit_id}/tokens",
    tag = "attention",
    params(("edit_id" = String, Path, description = "From `x-edit-id`")),
    responses(
        (status = 200, description = "The instruction's words, their token spans and attention peaks", body = TokensResponse),
        (status = 404, description = "Unknown or evicted edit", body = ErrorBody),
    )
)]
pub async fn tokens(
    State(state): State<Arc<AppState>>,
    Path(edit_id): Path<String>,
) -> Result<axum::Json<TokensResponse>, ServiceError> {
    let edit = state.service.attention_of(&edit_id)?;
    let a = &edit.attention;
    let words = a
        .words
        .iter()
        .map(|w| {
            let (index, peak) = argmax(&w.map);
            WordInfo {
                word: w.word.clone(),
                tokens: [w.tokens.start, w.tokens.end],
                peak,
                peak_x: index % a.width.max(1),
                peak_y: index / a.width.max(1),
            }
        })
        .collect();
    Ok(axum::Json(TokensResponse {
        edit_id,
        instruction: edit.instruction.clone(),
        height: a.height,
        width: a.width,
        peak: argmax(&a.instruction_map).1,
        words,
    }))
}

fn argmax(values: &[f32]) -> (usize, f32) {
    values
        .iter()
        .copied()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |best, (i, v)| {
            if v > best.1 {
                (i, v)
            } else {
                best
            }
        })
}
