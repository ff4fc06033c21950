//! Async jobs after submission: where one is, its progress as it happens, its result, and
//! cancelling it.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::state::Service;
use crate::edit::EditResult;
use crate::error::{clipped, ErrorKind, ServiceError};
use crate::jobs::{Finished, JobRecord, JobSnapshot, JobState, Outcome, ProgressKey};
use crate::queue::{Queue, Stage};

/// How often a queued job's place in the queue is rechecked for its progress feed.
const POSITION_POLL: Duration = Duration::from_millis(200);

impl Service {
    fn job(&self, id: &str) -> Result<Arc<JobRecord>, ServiceError> {
        self.jobs.get(id).ok_or_else(|| {
            ServiceError::not_found(
                "job_not_found",
                format!(
                    "no job `{}`: unknown id, deleted, or finished and evicted (kept {} s, at most {} finished jobs; --job-ttl-s, --max-jobs)",
                    clipped(id),
                    self.jobs.ttl().as_secs_f64(),
                    self.jobs.max_finished(),
                ),
            )
        })
    }

    pub fn job_status(&self, id: &str) -> Result<JobSnapshot, ServiceError> {
        Ok(self.job(id)?.snapshot(&self.queue))
    }

    /// The job's state now, then at every change until it ends.
    pub fn job_progress(&self, id: &str) -> Result<JobProgress, ServiceError> {
        let record = self.job(id)?;
        Ok(JobProgress {
            stage: record.progress.subscribe(),
            finished: record.subscribe_finished(),
            queue: self.queue.clone(),
            record,
            last: None,
            ended: false,
        })
    }

    /// The finished edit; a job not done, cancelled or failed is an error (a failed job's is
    /// the one a synchronous request would have got).
    pub fn job_result(&self, id: &str) -> Result<Arc<EditResult>, ServiceError> {
        let record = self.job(id)?;
        let Some(finished) = record.finished() else {
            let status = record.snapshot(&self.queue);
            let where_ = match (status.step, status.total_steps) {
                (Some(step), Some(total)) => format!("running, step {step} of {total}"),
                _ => format!(
                    "queued, {} edits ahead",
                    status.position.unwrap_or_default()
                ),
            };
            return Err(ServiceError::new(
                ErrorKind::Conflict,
                "job_not_done",
                format!(
                    "job `{id}` is not done ({where_}); follow /jobs/{id}/events or poll /jobs/{id}"
                ),
            ));
        };
        match &finished.outcome {
            Outcome::Done(result) => Ok(result.clone()),
            Outcome::Failed(error) => Err(error.clone()),
            // Only `DELETE` cancels a job, and it forgets the job too: kept for completeness.
            Outcome::Cancelled => Err(ServiceError::new(
                ErrorKind::Conflict,
                "job_cancelled",
                format!("job `{id}` was cancelled; it has no result"),
            )),
        }
    }

    /// `DELETE /jobs/{id}`: a queued job leaves the queue at once; a running one is cancelled at
    /// once and its batch stops at the next step unless others in it are still wanted. Either
    /// way the job is then forgotten (a deleted resource is gone, RFC 9110); followers of its
    /// events still get the last one. Returns the job's last state.
    pub fn cancel_job(&self, id: &str) -> Result<JobSnapshot, ServiceError> {
        let record = self.job(id)?;
        if record.finished().is_none() {
            record.cancel.cancel();
            if self.queue.remove(id) {
                tracing::info!(job = %log_id(id), "queued job cancelled");
            } else {
                tracing::info!(job = %log_id(id), "running job cancelled; its batch stops at the next step unless others in it are still wanted");
            }
            // Loses only to an outcome that arrived first; the answer then shows that one.
            self.jobs.finish(&record, Outcome::Cancelled);
        }
        self.jobs.forget(id);
        Ok(record.snapshot(&self.queue))
    }
}

/// A job's snapshots as it changes (steps may be coalesced for a slow reader).
pub struct JobProgress {
    queue: Arc<Queue>,
    record: Arc<JobRecord>,
    stage: watch::Receiver<Stage>,
    finished: watch::Receiver<Option<Arc<Finished>>>,
    last: Option<ProgressKey>,
    ended: bool,
}

impl JobProgress {
    /// The next change; None after the final state was returned.
    pub async fn next(&mut self) -> Option<JobSnapshot> {
        if self.ended {
            return None;
        }
        loop {
            // Marked seen before reading, so a change after the read wakes the wait below.
            self.stage.borrow_and_update();
            self.finished.borrow_and_update();
            let snapshot = self.record.snapshot(&self.queue);
            let key = snapshot.progress_key();
            if self.last != Some(key) {
                self.last = Some(key);
                self.ended = snapshot.state.is_final();
                return Some(snapshot);
            }
            let queued = snapshot.state == JobState::Queued;
            // The record holds both senders, so neither `changed` can fail while we wait.
            tokio::select! {
                _ = self.stage.changed() => {}
                _ = self.finished.changed() => {}
                _ = tokio::time::sleep(POSITION_POLL), if queued => {}
            }
        }
    }
}

/// How logs name a job: a job id is the only credential to its result, so logs carry a short
/// hash of it instead (enough to follow one job through a log, useless to fetch it).
pub fn log_id(id: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(id.as_bytes());
    digest[..4].iter().map(|b| format!("{b:02x}")).collect()
}
