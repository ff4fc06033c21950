//! `/jobs/{id}`: status, progress events, result and cancellation of async edits (`POST /edit`
//! with `Prefer: respond-async`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::Response;
use axum::Json;
use futures_util::Stream;
use tokio::sync::watch;

use super::edit::wants_json;
use super::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::jobs::{Finished, JobRecord, JobState, JobStatus, Outcome, ProgressKey};
use crate::queue::Stage;

/// How often a queued job's place in the queue is rechecked for its event stream.
const POSITION_POLL: Duration = Duration::from_millis(200);

fn job(state: &AppState, id: &str) -> Result<Arc<JobRecord>, ApiError> {
    state.jobs.get(id).ok_or_else(|| {
        ApiError::not_found(
            "job_not_found",
            format!(
                "no job `{}`: unknown id, or finished and evicted (kept {} s, at most {} finished jobs; --job-ttl-s, --max-jobs)",
                id.chars().take(64).collect::<String>(),
                state.jobs.ttl().as_secs_f64(),
                state.jobs.max_finished(),
            ),
        )
    })
}

#[utoipa::path(
    get,
    path = "/jobs/{id}",
    operation_id = "job_status",
    tag = "jobs",
    params(("id" = String, Path, description = "From the 202 answer of `POST /edit`")),
    responses(
        (status = 200, description = "Where the job is: queued (with `position`), running (with `step` of `total_steps`), done, failed (with `error`) or cancelled", body = JobStatus),
        (status = 404, description = "Unknown job, or finished and evicted", body = ErrorBody),
    )
)]
pub async fn status(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    let record = job(&state, &id)?;
    Ok(Json(record.status(&state.queue)))
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
        (status = 404, description = "Unknown job, or finished and evicted", body = ErrorBody),
    )
)]
pub async fn events(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Sse<impl Stream<Item = Result<Event, axum::Error>>>, ApiError> {
    let record = job(&state, &id)?;
    let feed = EventFeed {
        stage: record.progress.subscribe(),
        finished: record.subscribe_finished(),
        state,
        record,
        last: None,
        ended: false,
    };
    let stream = futures_util::stream::unfold(feed, next_event);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

struct EventFeed {
    state: Arc<AppState>,
    record: Arc<JobRecord>,
    stage: watch::Receiver<Stage>,
    finished: watch::Receiver<Option<Arc<Finished>>>,
    last: Option<ProgressKey>,
    ended: bool,
}

async fn next_event(mut feed: EventFeed) -> Option<(Result<Event, axum::Error>, EventFeed)> {
    if feed.ended {
        return None;
    }
    loop {
        // Marked seen before reading, so a change after the read wakes the wait below.
        feed.stage.borrow_and_update();
        feed.finished.borrow_and_update();
        let status = feed.record.status(&feed.state.queue);
        let key = status.progress_key();
        if feed.last != Some(key) {
            feed.last = Some(key);
            feed.ended = status.status.is_final();
            let event = Event::default()
                .event(status.status.name())
                .json_data(&status);
            return Some((event, feed));
        }
        let queued = status.status == JobState::Queued;
        // The record holds both senders, so neither `changed` can fail while we wait.
        tokio::select! {
            _ = feed.stage.changed() => {}
            _ = feed.finished.changed() => {}
            _ = tokio::time::sleep(POSITION_POLL), if queued => {}
        }
    }
}

#[utoipa::path(
    get,
    path = "/jobs/{id}/result",
    operation_id = "job_result",
    tag = "jobs",
    params(("id" = String, Path, description = "From the 202 answer of `POST /edit`")),
    responses(
        (status = 200, description = "The edited image with the same bytes, content type and `x-*` headers as the synchronous answer (JSON with `Accept: application/json`)",
            content(("image/png"), ("image/jpeg"), ("image/webp"), (super::edit::EditJsonResponse = "application/json"))),
        (status = 404, description = "Unknown job, or finished and evicted", body = ErrorBody),
        (status = 409, description = "Not done yet (`job_not_done`) or cancelled (`job_cancelled`)", body = ErrorBody),
        (status = "4XX", description = "Failed: the error the synchronous request would have got", body = ErrorBody),
        (status = "5XX", description = "Failed: the error the synchronous request would have got", body = ErrorBody),
    )
)]
pub async fn result(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let record = job(&state, &id)?;
    let Some(finished) = record.finished() else {
        let status = record.status(&state.queue);
        let where_ = match (status.step, status.total_steps) {
            (Some(step), Some(total)) => format!("running, step {step} of {total}"),
            _ => format!(
                "queued, {} edits ahead",
                status.position.unwrap_or_default()
            ),
        };
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_not_done",
            format!(
                "job `{id}` is not done ({where_}); follow /jobs/{id}/events or poll /jobs/{id}"
            ),
        ));
    };
    match &finished.outcome {
        Outcome::Done(result) => Ok(result.response(wants_json(&headers))),
        Outcome::Failed {
            status,
            error_type,
            message,
        } => Err(ApiError::new(*status, error_type, message.clone())),
        Outcome::Cancelled => Err(ApiError::new(
            StatusCode::CONFLICT,
            "job_cancelled",
            format!("job `{id}` was cancelled; it has no result"),
        )),
    }
}

#[utoipa::path(
    delete,
    path = "/jobs/{id}",
    operation_id = "cancel_job",
    tag = "jobs",
    params(("id" = String, Path, description = "From the 202 answer of `POST /edit`")),
    responses(
        (status = 200, description = "A queued job leaves the queue at once; a running one is `cancelled` at once and its batch stops at the next step unless other edits in it are still wanted (then its result is discarded). A job already finished is forgotten (404 afterwards). The body is the job's status after the call.", body = JobStatus),
        (status = 404, description = "Unknown job, or finished and evicted", body = ErrorBody),
    )
)]
pub async fn cancel(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> Result<Json<JobStatus>, ApiError> {
    let record = job(&state, &id)?;
    if record.finished().is_some() {
        state.jobs.forget(&id);
        return Ok(Json(record.status(&state.queue)));
    }
    record.cancel.cancel();
    if state.queue.remove(&id) {
        tracing::info!(job = %id, "queued job cancelled");
    } else {
        tracing::info!(job = %id, "running job cancelled; its batch stops at the next step unless others in it are still wanted");
    }
    // Loses only to an outcome that arrived first; the answer then shows that one.
    state.jobs.finish(&record, Outcome::Cancelled);
    Ok(Json(record.status(&state.queue)))
}
