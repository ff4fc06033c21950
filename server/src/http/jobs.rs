//! `/jobs/{id}`: status, progress events, result and cancellation of async edits (`POST /edit`
//! with `Prefer: respond-async`), and the wire form of a job's status.

use std::sync::Arc;
use std::time::SystemTime;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use axum::Json;
use chrono::{DateTime, SecondsFormat, Utc};
use futures_util::Stream;
use serde::Serialize;
use utoipa::ToSchema;

use super::body::wants_json;
use super::edit::edit_response;
use super::edit_dto::EditJsonResponse;
use super::error::ErrorBody;
use super::state::AppState;
use crate::error::ServiceError;
use crate::jobs::{self, JobSnapshot};

// The wire form of `jobs::JobState`, built by `From`: only `http/` derives OpenAPI schemas.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl From<jobs::JobState> for JobState {
    fn from(state: jobs::JobState) -> Self {
        match state {
            jobs::JobState::Queued => Self::Queued,
            jobs::JobState::Running => Self::Running,
            jobs::JobState::Done => Self::Done,
            jobs::JobState::Failed => Self::Failed,
            jobs::JobState::Cancelled => Self::Cancelled,
        }
    }
}

/// `GET /jobs/{id}`, and the data of every event of `/jobs/{id}/events`.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"id": "0c9d3f5be1a84e27b61f0a4d2c8e7b13", "status": "running", "step": 3,
    "total_steps": 20, "seed": 42, "adapter": "none", "created_at": "2026-11-27T07:13:10.412Z",
    "started_at": "2026-11-27T07:13:10.418Z", "status_url": "/jobs/0c9d3f5be1a84e27b61f0a4d2c8e7b13",
    "events_url": "/jobs/0c9d3f5be1a84e27b61f0a4d2c8e7b13/events",
    "result_url": "/jobs/0c9d3f5be1a84e27b61f0a4d2c8e7b13/result"}))]
pub struct JobStatus {
    pub id: String,
    pub status: JobState,
    /// While queued: live edits ahead of this one in the queue (0: it runs next).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<usize>,
    /// Denoising steps done, once the worker took the job (kept after it ends: how far it got).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub total_steps: Option<usize>,
    pub seed: u64,
    pub adapter: String,
    /// RFC 3339, UTC.
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
    /// When failed: the error a synchronous request would have got.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
    pub status_url: String,
    pub events_url: String,
    pub result_url: String,
}

impl From<JobSnapshot> for JobStatus {
    fn from(job: JobSnapshot) -> Self {
        let base = format!("/jobs/{}", job.id);
        Self {
            id: job.id,
            status: job.state.into(),
            position: job.position,
            step: job.step,
            total_steps: job.total_steps,
            seed: job.seed,
            adapter: job.adapter,
            created_at: rfc3339(job.created_at),
            started_at: job.started_at.map(rfc3339),
            finished_at: job.finished_at.map(rfc3339),
            error: job.error.as_ref().map(ErrorBody::from),
            events_url: format!("{base}/events"),
            result_url: format!("{base}/result"),
            status_url: base,
        }
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339(time: SystemTime) -> String {
    DateTime::<Utc>::from(time).to_rfc3339_opts(SecondsFormat::Millis, true)
}

#[utoipa::path(
    get,
    path = "/jobs/{id}",
    operation_id = "job_status",
    tag = "jobs",
    params(("id" = String, Path, description = "From the 202 answer of `POST /edit`")),
    responses(
        (status = 200, description = "Where the job is: queued (with `position`), running (with `step` of `total_steps`), done, failed (with `error`) or cancelled", body = JobStatus),
        (status = 404, description = "Unknown job, deleted, or finished and evicted", body = ErrorBody),
    )
)]
pub async fn status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ServiceError> {
    Ok(Json(state.service.job_status(&id)?.into()))
}

#[utoipa::path(
    get,
    path = "/jobs/{id}/events",
    operation_id = "job_events",
    tag = "jobs",
    params(("id" = String, Path, description = "From the 202 answer of `POST /edit`")),
    responses(
        (status = 200, description = "Server-sent events: the current state first, then one event per change (`queued` as the position changes, `running` per step; steps may be coalesced for a slow reader), then one final `done`, `failed` or `cancelled`, and the stream ends. Each event's data is the job's status JSON.",
            content_type = "text/event-stream", body = JobStatus),
        (status = 404, description = "Unknown job, deleted, or finished and evicted", body = ErrorBody),
    )
)]
pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, axum::Error>>>, ServiceError> {
    let progress = state.service.job_progress(&id)?;
    let stream = futures_util::stream::unfold(progress, |mut progress| async move {
        let snapshot = progress.next().await?;
        let name = snapshot.state.name();
        let event = Event::default()
            .event(name)
            .json_data(JobStatus::from(snapshot));
        Some((event, progress))
    });
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

#[utoipa::path(
    get,
    path = "/jobs/{id}/result",
    operation_id = "job_result",
    tag = "jobs",
    params(("id" = String, Path, description = "From the 202 answer of `POST /edit`")),
    responses(
        (status = 200, description = "The edited image with the same bytes, content type and `x-*` headers as the synchronous answer (JSON with `Accept: application/json`)",
            content(("image/png"), ("image/jpeg"), ("image/webp"), (EditJsonResponse = "application/json"))),
        (status = 404, description = "Unknown job, deleted, or finished and evicted", body = ErrorBody),
        (status = 409, description = "Not done yet (`job_not_done`)", body = ErrorBody),
        (status = "4XX", description = "Failed: the error the synchronous request would have got", body = ErrorBody),
        (status = "5XX", description = "Failed: the error the synchronous request would have got", body = ErrorBody),
    )
)]
pub async fn result(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ServiceError> {
    let result = state.service.job_result(&id)?;
    Ok(edit_response(&result, wants_json(&headers)))
}

#[utoipa::path(
    delete,
    path = "/jobs/{id}",
    operation_id = "cancel_job",
    tag = "jobs",
    params(("id" = String, Path, description = "From the 202 answer of `POST /edit`")),
    responses(
        (status = 200, description = "Cancels the job if it has not finished (a queued job leaves the queue at once; a running one is `cancelled` at once and its batch stops at the next step unless other edits in it are still wanted, then its result is discarded) and forgets it: the job's routes answer 404 afterwards, and a client following its events gets a last `cancelled` event. The body is the job's last status.", body = JobStatus),
        (status = 404, description = "Unknown job, deleted, or finished and evicted", body = ErrorBody),
    )
)]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ServiceError> {
    Ok(Json(state.service.cancel_job(&id)?.into()))
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, UNIX_EPOCH};

    use super::rfc3339;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap_day = UNIX_EPOCH + Duration::from_millis(951_782_400_123);
        assert_eq!(rfc3339(leap_day), "2000-02-29T00:00:00.123Z");
        let later = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(rfc3339(later), "2026-12-31T23:59:59.000Z");
    }
}
