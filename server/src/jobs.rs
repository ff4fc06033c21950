//! Async jobs (`POST /edit` with `Prefer: respond-async`): one record per admitted job, its
//! final outcome, and a store that keeps finished jobs for a bounded time and count.
//!
//! The record shares the queue job's cancel token and progress, so the worker's per-step
//! reports reach status readers without going through HTTP. Only the first outcome counts: a
//! job cancelled while its batch runs on (other members still wanted) is `cancelled` at once,
//! and the result that arrives later is discarded.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use serde::Serialize;
use tokio::sync::watch;
use utoipa::ToSchema;

use crate::error::{ApiError, ErrorBody};
use crate::http::edit::EditResult;
use crate::metrics::Metrics;
use crate::queue::{CancelToken, Progress, Queue, Stage};

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    Done(EditResult),
    /// The error a synchronous request would have been answered with.
    Failed {
        status: StatusCode,
        error_type: &'static str,
        message: String,
    },
    Cancelled,
}

impl Outcome {
    pub fn failed(error: ApiError) -> Self {
        Self::Failed {
            status: error.status,
            error_type: error.error_type,
            message: error.message,
        }
    }

    pub fn status(&self) -> JobState {
        match self {
            Self::Done(_) => JobState::Done,
            Self::Failed { .. } => JobState::Failed,
            Self::Cancelled => JobState::Cancelled,
        }
    }
}

#[derive(Debug)]
pub struct Finished {
    pub outcome: Outcome,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Queued,
    Running,
    Done,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn name(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Done => "done",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }

    pub fn is_final(self) -> bool {
        matches!(self, Self::Done | Self::Failed | Self::Cancelled)
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

/// What changes while a job progresses: state, position, step, total.
pub type ProgressKey = (JobState, Option<usize>, Option<usize>, Option<usize>);

impl JobStatus {
    /// An event is sent when this changes.
    pub fn progress_key(&self) -> ProgressKey {
        (self.status, self.position, self.step, self.total_steps)
    }
}

/// One async job.
pub struct JobRecord {
    pub id: String,
    pub created_at: SystemTime,
    pub seed: u64,
    pub adapter: String,
    pub cancel: CancelToken,
    pub progress: Arc<Progress>,
    finished: watch::Sender<Option<Arc<Finished>>>,
}

impl JobRecord {
    pub fn new(
        id: String,
        seed: u64,
        adapter: String,
        cancel: CancelToken,
        progress: Arc<Progress>,
    ) -> Self {
        Self {
            id,
            created_at: SystemTime::now(),
            seed,
            adapter,
            cancel,
            progress,
            finished: watch::Sender::new(None),
        }
    }

    pub fn finished(&self) -> Option<Arc<Finished>> {
        self.finished.borrow().clone()
    }

    pub fn subscribe_finished(&self) -> watch::Receiver<Option<Arc<Finished>>> {
        self.finished.subscribe()
    }

    pub fn state(&self) -> JobState {
        state_of(self.finished().as_deref(), self.progress.stage())
    }

    pub fn status(&self, queue: &Queue) -> JobStatus {
        let finished = self.finished();
        let stage = self.progress.stage();
        let state = state_of(finished.as_deref(), stage);
        // Between leaving the queue and the batch starting the job is next in line.
        let position = (state == JobState::Queued).then(|| queue.position(&self.id).unwrap_or(0));
        let (step, total_steps) = match stage {
            Stage::Running { step, total } => (Some(step), Some(total)),
            Stage::Queued => (None, None),
        };
        let error = finished.as_ref().and_then(|f| match &f.outcome {
            Outcome::Failed {
                error_type,
                message,
                ..
            } => Some(ErrorBody {
                error: message.clone(),
                error_type: error_type.to_string(),
            }),
            _ => None,
        });
        let base = format!("/jobs/{}", self.id);
        JobStatus {
            id: self.id.clone(),
            status: state,
            position,
            step,
            total_steps,
            seed: self.seed,
            adapter: self.adapter.clone(),
            created_at: rfc3339(self.created_at),
            started_at: self.progress.started_at().map(rfc3339),
            finished_at: finished.as_ref().map(|f| rfc3339(f.at)),
            error,
            events_url: format!("{base}/events"),
            result_url: format!("{base}/result"),
            status_url: base,
        }
    }
}

fn state_of(finished: Option<&Finished>, stage: Stage) -> JobState {
    match (finished, stage) {
        (Some(finished), _) => finished.outcome.status(),
        (None, Stage::Queued) => JobState::Queued,
        (None, Stage::Running { .. }) => JobState::Running,
    }
}

#[derive(Default)]
struct Entries {
    jobs: HashMap<String, Arc<JobRecord>>,
    /// Finished jobs, oldest first, with when they finished.
    finished: VecDeque<(Instant, String)>,
}

/// Every async job not yet evicted. Unfinished jobs are bounded by the queue; finished ones by
/// `max_finished` and `ttl`.
pub struct JobStore {
    entries: Mutex<Entries>,
    ttl: Duration,
    max_finished: usize,
    metrics: Metrics,
}

impl JobStore {
    pub fn new(ttl: Duration, max_finished: usize, metrics: Metrics) -> Self {
        Self {
            entries: Mutex::new(Entries::default()),
            ttl,
            max_finished,
            metrics,
        }
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn max_finished(&self) -> usize {
        self.max_finished
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        let mut entries = self.entries.lock().unwrap_or_else(|e| e.into_inner());
        self.evict_expired(&mut entries);
        entries
    }

    fn evict_expired(&self, entries: &mut Entries) {
        let now = Instant::now();
        while let Some((at, _)) = entries.finished.front() {
            if now.duration_since(*at) < self.ttl {
                break;
            }
            if let Some((_, id)) = entries.finished.pop_front() {
                entries.jobs.remove(&id);
            }
        }
    }

    pub fn insert(&self, record: Arc<JobRecord>) {
        self.lock().jobs.insert(record.id.clone(), record);
    }

    /// Removes a job that was never admitted (the queue refused it).
    pub fn withdraw(&self, id: &str) {
        self.lock().jobs.remove(id);
    }

    pub fn get(&self, id: &str) -> Option<Arc<JobRecord>> {
        self.lock().jobs.get(id).cloned()
    }

    /// Records how `record` ended, unless it already had (the first outcome counts). Returns
    /// whether this outcome was the one recorded.
    pub fn finish(&self, record: &JobRecord, outcome: Outcome) -> bool {
        let status = outcome.status();
        let mut slot = Some(outcome);
        let recorded = record.finished.send_if_modified(|current| {
            if current.is_some() {
                return false;
            }
            *current = slot.take().map(|outcome| {
                Arc::new(Finished {
                    outcome,
                    at: SystemTime::now(),
                })
            });
            true
        });
        if !recorded {
            return false;
        }
        self.metrics.jobs.with_label_values(&[status.name()]).inc();
        let mut entries = self.lock();
        // A job forgotten (DELETE) before its outcome arrived stays forgotten.
        if entries.jobs.contains_key(&record.id) {
            entries
                .finished
                .push_back((Instant::now(), record.id.clone()));
            while entries.finished.len() > self.max_finished {
                if let Some((_, id)) = entries.finished.pop_front() {
                    entries.jobs.remove(&id);
                }
            }
        }
        true
    }

    /// Drops a finished job at once; false when it is unknown or not finished.
    pub fn forget(&self, id: &str) -> bool {
        let mut entries = self.lock();
        let finished = entries
            .jobs
            .get(id)
            .is_some_and(|record| record.finished().is_some());
        if finished {
            entries.jobs.remove(id);
            entries.finished.retain(|(_, other)| other != id);
        }
        finished
    }

    /// Jobs held: unfinished ones and finished ones not yet evicted.
    pub fn len(&self) -> usize {
        self.lock().jobs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` (civil-from-days after Howard Hinnant; no date crate needed).
pub fn rfc3339(time: SystemTime) -> String {
    let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since_epoch.as_secs() as i64;
    let millis = since_epoch.subsec_millis();
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str) -> Arc<JobRecord> {
        Arc::new(JobRecord::new(
            id.into(),
            1,
            "none".into(),
            CancelToken::default(),
            Arc::new(Progress::default()),
        ))
    }

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap_day = UNIX_EPOCH + Duration::from_millis(951_782_400_123);
        assert_eq!(rfc3339(leap_day), "2000-02-29T00:00:00.123Z");
        let later = UNIX_EPOCH + Duration::from_secs(1_798_761_599);
        assert_eq!(rfc3339(later), "2026-12-31T23:59:59.000Z");
    }

    #[test]
    fn the_first_outcome_counts_and_finished_jobs_are_bounded() {
        let store = JobStore::new(Duration::from_secs(60), 2, Metrics::new(1));
        let jobs: Vec<_> = ["a", "b", "c"].iter().map(|id| record(id)).collect();
        for job in &jobs {
            store.insert(job.clone());
        }
        assert!(store.finish(&jobs[0], Outcome::Cancelled));
        assert!(
            !store.finish(&jobs[0], Outcome::failed(ApiError::internal("late"))),
            "a cancelled job stays cancelled"
        );
        assert_eq!(jobs[0].state(), JobState::Cancelled);
        assert_eq!(store.len(), 3, "unfinished jobs are not evicted");
        store.finish(&jobs[1], Outcome::Cancelled);
        store.finish(&jobs[2], Outcome::Cancelled);
        assert!(store.get("a").is_none(), "the oldest finished job left");
        assert!(store.get("b").is_some() && store.get("c").is_some());
        assert!(store.forget("b"));
        assert!(store.get("b").is_none());
        assert!(!store.forget("zzz"));
    }

    #[test]
    fn finished_jobs_expire_after_the_ttl() {
        let store = JobStore::new(Duration::from_millis(30), 10, Metrics::new(1));
        let job = record("a");
        store.insert(job.clone());
        store.finish(&job, Outcome::Cancelled);
        assert!(store.get("a").is_some());
        std::thread::sleep(Duration::from_millis(40));
        assert!(store.get("a").is_none());
        assert!(store.is_empty());
    }
}
