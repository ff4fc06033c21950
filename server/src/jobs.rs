//! Async jobs (`POST /edit` with `Prefer: respond-async`): one record per admitted job, its
//! final outcome, and a store that keeps finished jobs for a bounded time and count.
//!
//! The record shares the queue job's cancel token and progress, so the worker's per-step
//! reports reach status readers without going through HTTP. Only the first outcome counts: a
//! job cancelled while its batch runs on (other members still wanted) is `cancelled` at once,
//! and the result that arrives later is discarded.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;

use crate::edit::EditResult;
use crate::error::ServiceError;
use crate::metrics::Metrics;
use crate::queue::{CancelToken, Progress, Queue, Stage};

/// How a job ended.
#[derive(Debug)]
pub enum Outcome {
    Done(Arc<EditResult>),
    /// The error a synchronous request would have been answered with.
    Failed(ServiceError),
    Cancelled,
}

impl Outcome {
    pub fn status(&self) -> JobState {
        match self {
            Self::Done(_) => JobState::Done,
            Self::Failed(_) => JobState::Failed,
            Self::Cancelled => JobState::Cancelled,
        }
    }
}

#[derive(Debug)]
pub struct Finished {
    pub outcome: Outcome,
    pub at: SystemTime,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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

/// Where a job is now: what `GET /jobs/{id}` and every event of its stream show.
#[derive(Debug, Clone)]
pub struct JobSnapshot {
    pub id: String,
    pub state: JobState,
    /// While queued: live edits ahead of this one in the queue (0: it runs next).
    pub position: Option<usize>,
    /// Denoising steps done, once the worker took the job (kept after it ends: how far it got).
    pub step: Option<usize>,
    pub total_steps: Option<usize>,
    pub seed: u64,
    pub adapter: String,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    /// When failed: the error a synchronous request would have got.
    pub error: Option<ServiceError>,
}

/// What changes while a job progresses: state, position, step, total.
pub type ProgressKey = (JobState, Option<usize>, Option<usize>, Option<usize>);

impl JobSnapshot {
    /// An event is sent when this changes.
    pub fn progress_key(&self) -> ProgressKey {
        (self.state, self.position, self.step, self.total_steps)
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

    pub fn snapshot(&self, queue: &Queue) -> JobSnapshot {
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
            Outcome::Failed(error) => Some(error.clone()),
            _ => None,
        });
        JobSnapshot {
            id: self.id.clone(),
            state,
            position,
            step,
            total_steps,
            seed: self.seed,
            adapter: self.adapter.clone(),
            created_at: self.created_at,
            started_at: self.progress.started_at(),
            finished_at: finished.as_ref().map(|f| f.at),
            error,
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
    /// Finished jobs, oldest first, with when they finished and the bytes of their result.
    finished: VecDeque<(Instant, String, u64)>,
    /// Sum of those bytes.
    finished_bytes: u64,
}

impl Entries {
    fn evict_oldest(&mut self) {
        if let Some((_, id, bytes)) = self.finished.pop_front() {
            self.jobs.remove(&id);
            self.finished_bytes = self.finished_bytes.saturating_sub(bytes);
        }
    }
}

/// Every async job not yet evicted. Unfinished jobs are bounded by the queue; finished ones by
/// `max_finished`, `max_bytes` (their encoded results together) and `ttl`.
pub struct JobStore {
    entries: Mutex<Entries>,
    ttl: Duration,
    max_finished: usize,
    max_bytes: u64,
    metrics: Metrics,
}

impl JobStore {
    pub fn new(ttl: Duration, max_finished: usize, metrics: Metrics) -> Self {
        Self {
            entries: Mutex::new(Entries::default()),
            ttl,
            max_finished,
            max_bytes: u64::MAX,
            metrics,
        }
    }

    /// Bounds the bytes of finished jobs' results kept together (`--max-job-bytes`).
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes of results the finished jobs hold.
    pub fn finished_bytes(&self) -> u64 {
        self.lock().finished_bytes
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
        while let Some((at, _, _)) = entries.finished.front() {
            if now.duration_since(*at) < self.ttl {
                break;
            }
            entries.evict_oldest();
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
        let bytes = match &outcome {
            Outcome::Done(result) => result.bytes.len() as u64,
            _ => 0,
        };
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
                .push_back((Instant::now(), record.id.clone(), bytes));
            entries.finished_bytes += bytes;
            // The newest result stays even alone over the byte bound: its client is polling.
            while entries.finished.len() > self.max_finished
                || (entries.finished_bytes > self.max_bytes && entries.finished.len() > 1)
            {
                entries.evict_oldest();
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
            let mut freed = 0;
            entries.finished.retain(|(_, other, bytes)| {
                let keep = other != id;
                if !keep {
                    freed += bytes;
                }
                keep
            });
            entries.finished_bytes = entries.finished_bytes.saturating_sub(freed);
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
    fn the_first_outcome_counts_and_finished_jobs_are_bounded() {
        let store = JobStore::new(Duration::from_secs(60), 2, Metrics::new(1));
        let jobs: Vec<_> = ["a", "b", "c"].iter().map(|id| record(id)).collect();
        for job in &jobs {
            store.insert(job.clone());
        }
        assert!(store.finish(&jobs[0], Outcome::Cancelled));
        assert!(
            !store.finish(&jobs[0], Outcome::Failed(ServiceError::internal("late"))),
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

    fn done(bytes: usize) -> Outcome {
        Outcome::Done(Arc::new(EditResult {
            edit_id: "e".into(),
            seed: 1,
            adapter: "none".into(),
            width: 1,
            height: 1,
            working_width: 1,
            working_height: 1,
            format: crate::codec::OutputFormat::Png,
            queue_ms: 0,
            inference_ms: 0,
            batch_size: 1,
            bytes: vec![0u8; bytes].into(),
        }))
    }

    #[test]
    fn finished_results_are_bounded_by_bytes_oldest_first() {
        let store =
            JobStore::new(Duration::from_secs(60), 100, Metrics::new(1)).with_max_bytes(250);
        let jobs: Vec<_> = ["a", "b", "c", "d"].iter().map(|id| record(id)).collect();
        for job in &jobs {
            store.insert(job.clone());
        }
        store.finish(&jobs[0], done(100));
        store.finish(&jobs[1], done(100));
        assert_eq!(store.finished_bytes(), 200);
        store.finish(&jobs[2], done(100));
        assert!(store.get("a").is_none(), "the oldest result made room");
        assert!(store.get("b").is_some() && store.get("c").is_some());
        assert_eq!(store.finished_bytes(), 200);
        // Failures and cancellations hold no result and cost nothing.
        store.finish(&jobs[3], Outcome::Cancelled);
        assert_eq!(store.finished_bytes(), 200);
        assert!(store.forget("b"));
        assert_eq!(store.finished_bytes(), 100);
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
