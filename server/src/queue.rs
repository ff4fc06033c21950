//! The bounded queue between HTTP handlers and the worker, and dynamic batching: the worker
//! takes the oldest live request, then gathers compatible ones (same VAE grid, steps,
//! scheduler, eta and adapter version) until the batch is full or the oldest has waited the
//! maximum wait. Requests whose client left, or whose deadline passed, are dropped unrun.

use std::any::Any;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use rl4pix_model::image_io::size_for_vae;
use rl4pix_model::lora::ResolvedAdapter;
use tokio::sync::{oneshot, watch};

use crate::backend::{AttentionSummary, BackendError, BatchItem};
use crate::metrics::Metrics;

#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    #[error("the queue is full: {capacity} edits already waiting (--max-queue); retry later")]
    Full { capacity: usize },
    #[error("the server is shutting down")]
    Closed,
}

/// Why an admitted edit produced no image.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JobError {
    #[error("cancelled")]
    Cancelled,
    /// Its deadline passed before it finished; its work was dropped.
    #[error("timed out")]
    TimedOut,
    #[error("the model failed: {0}")]
    Backend(Arc<BackendError>),
    #[error("the worker stopped: {0}")]
    WorkerGone(String),
    /// The worker thread ended (a panic outside a batch): nothing queued will run.
    #[error("the worker thread died")]
    WorkerDied,
}

pub struct JobOutput {
    pub image: image::RgbImage,
    pub attention: Option<AttentionSummary>,
    pub queue_time: Duration,
    pub inference_time: Duration,
    pub batch_size: usize,
}

/// Set when whoever waits for a job no longer wants it.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    pub fn cancel(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// How far the worker has got with a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Queued,
    /// Taken by the worker; `step` denoising steps of `total` are done.
    Running {
        step: usize,
        total: usize,
    },
}

/// A job's stage, written by the worker and watched by async-job readers (status, events).
#[derive(Debug)]
pub struct Progress {
    stage: watch::Sender<Stage>,
    started_at: OnceLock<SystemTime>,
}

impl Default for Progress {
    fn default() -> Self {
        Self {
            stage: watch::Sender::new(Stage::Queued),
            started_at: OnceLock::new(),
        }
    }
}

impl Progress {
    /// The worker took the job (its batch is forming or running).
    pub fn start(&self, total: usize) {
        let _ = self.started_at.set(SystemTime::now());
        self.stage.send_replace(Stage::Running { step: 0, total });
    }

    pub fn step(&self, step: usize, total: usize) {
        self.stage.send_replace(Stage::Running { step, total });
    }

    pub fn stage(&self) -> Stage {
        *self.stage.borrow()
    }

    pub fn started_at(&self) -> Option<SystemTime> {
        self.started_at.get().copied()
    }

    pub fn subscribe(&self) -> watch::Receiver<Stage> {
        self.stage.subscribe()
    }
}

/// The adapter version a job runs with. Holding it keeps that version alive (its owner counts
/// holders as requests in flight), whatever happens to its name meanwhile.
#[derive(Clone)]
pub struct PinnedAdapter {
    pub name: String,
    /// Which file version of `name`; jobs batch together only on the same one.
    pub generation: u64,
    pub resolved: Arc<ResolvedAdapter>,
    _pin: Arc<dyn Any + Send + Sync>,
}

impl PinnedAdapter {
    /// `pin`: what must stay alive while the job does (the registry's entry).
    pub fn new(
        name: String,
        generation: u64,
        resolved: Arc<ResolvedAdapter>,
        pin: Arc<dyn Any + Send + Sync>,
    ) -> Self {
        Self {
            name,
            generation,
            resolved,
            _pin: pin,
        }
    }
}

/// What requests must share to run in one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchKey {
    pub grid: (u32, u32),
    pub steps: usize,
    pub scheduler: Option<rl4pix_model::scheduler::SchedulerKind>,
    pub eta_bits: u64,
    /// (name, generation) of the pinned adapter version.
    pub adapter: Option<(String, u64)>,
}

pub struct Job {
    pub id: String,
    pub item: BatchItem,
    pub adapter: Option<PinnedAdapter>,
    pub key: BatchKey,
    pub admitted: Instant,
    pub deadline: Instant,
    pub cancel: CancelToken,
    pub progress: Arc<Progress>,
    pub reply: oneshot::Sender<Result<JobOutput, JobError>>,
}

impl Job {
    pub fn new(
        id: String,
        item: BatchItem,
        adapter: Option<PinnedAdapter>,
        vae_scale_factor: usize,
        timeout: Duration,
    ) -> (Self, oneshot::Receiver<Result<JobOutput, JobError>>) {
        let factor = vae_scale_factor.max(1) as u32;
        let key = BatchKey {
            grid: size_for_vae(item.image.width(), item.image.height(), factor),
            steps: item.params.steps,
            scheduler: item.params.scheduler,
            eta_bits: item.params.eta.to_bits(),
            adapter: adapter.as_ref().map(|a| (a.name.clone(), a.generation)),
        };
        let (reply, rx) = oneshot::channel();
        let admitted = Instant::now();
        let job = Self {
            id,
            item,
            adapter,
            key,
            admitted,
            deadline: admitted + timeout,
            cancel: CancelToken::default(),
            progress: Arc::new(Progress::default()),
            reply,
        };
        (job, rx)
    }

    /// Nobody will read this job's result.
    pub fn is_abandoned(&self, now: Instant) -> bool {
        self.cancel.is_cancelled() || self.reply.is_closed() || now >= self.deadline
    }
}

pub struct Queue {
    capacity: usize,
    state: Mutex<State>,
    wake: Condvar,
    metrics: Metrics,
    #[cfg(feature = "fault-injection")]
    pub faults: Faults,
}

/// Test-only faults the worker meets when it next asks for a batch (`fault-injection`).
#[cfg(feature = "fault-injection")]
#[derive(Debug, Default)]
pub struct Faults {
    /// The worker takes no batch while this is set (jobs stay queued).
    pub hold: AtomicBool,
    /// The worker thread panics outside any batch, as a bug in its loop would.
    pub kill: AtomicBool,
}

#[derive(Default)]
struct State {
    jobs: VecDeque<Job>,
    closed: bool,
}

impl Queue {
    pub fn new(capacity: usize, metrics: Metrics) -> Self {
        Self {
            capacity,
            state: Mutex::new(State::default()),
            wake: Condvar::new(),
            metrics,
            #[cfg(feature = "fault-injection")]
            faults: Faults::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Admits a job or refuses it at once; never blocks on the worker.
    pub fn push(&self, job: Job) -> Result<(), QueueError> {
        let mut state = self.lock();
        if state.closed {
            return Err(QueueError::Closed);
        }
        self.drop_abandoned(&mut state);
        if state.jobs.len() >= self.capacity {
            return Err(QueueError::Full {
                capacity: self.capacity,
            });
        }
        state.jobs.push_back(job);
        self.metrics.queue_depth.set(state.jobs.len() as i64);
        self.wake.notify_all();
        Ok(())
    }

    pub fn depth(&self) -> usize {
        self.lock().jobs.len()
    }

    /// How many live queued edits are ahead of job `id`; None when it is not queued.
    pub fn position(&self, id: &str) -> Option<usize> {
        let state = self.lock();
        let now = Instant::now();
        let mut ahead = 0;
        for job in &state.jobs {
            if job.id == id {
                return Some(ahead);
            }
            if !job.is_abandoned(now) {
                ahead += 1;
            }
        }
        None
    }

    /// Takes job `id` out of the queue at once (dropping it closes its reply channel);
    /// false when it is not queued (already taken by the worker, or unknown).
    pub fn remove(&self, id: &str) -> bool {
        let mut state = self.lock();
        let Some(index) = state.jobs.iter().position(|job| job.id == id) else {
            return false;
        };
        state.jobs.remove(index);
        self.metrics
            .edits
            .with_label_values(&["abandoned_in_queue"])
            .inc();
        self.metrics.queue_depth.set(state.jobs.len() as i64);
        true
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Whether a push now would be admitted (abandoned jobs do not count).
    pub fn has_room(&self) -> bool {
        let mut state = self.lock();
        self.drop_abandoned(&mut state);
        !state.closed && state.jobs.len() < self.capacity
    }

    /// Stops admitting; the worker drains what is queued, then `next_batch` returns None.
    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_all();
    }

    /// The worker is gone: closes the queue and fails every queued job at once.
    pub fn fail_all(&self) {
        let jobs = {
            let mut state = self.lock();
            state.closed = true;
            std::mem::take(&mut state.jobs)
        };
        self.metrics.queue_depth.set(0);
        if !jobs.is_empty() {
            self.metrics
                .edits
                .with_label_values(&["error"])
                .inc_by(jobs.len() as u64);
        }
        for job in jobs {
            let _ = job.reply.send(Err(JobError::WorkerDied));
        }
        self.wake.notify_all();
    }

    fn drop_abandoned(&self, state: &mut State) {
        let now = Instant::now();
        let before = state.jobs.len();
        let (abandoned, kept): (VecDeque<Job>, VecDeque<Job>) = std::mem::take(&mut state.jobs)
            .into_iter()
            .partition(|job| job.is_abandoned(now));
        state.jobs = kept;
        for job in abandoned {
            if now >= job.deadline {
                let _ = job.reply.send(Err(JobError::TimedOut));
            }
        }
        let dropped = before - state.jobs.len();
        if dropped > 0 {
            self.metrics
                .edits
                .with_label_values(&["abandoned_in_queue"])
                .inc_by(dropped as u64);
            self.metrics.queue_depth.set(state.jobs.len() as i64);
        }
    }

    /// Blocks until a batch is ready; None once the queue is closed and empty.
    pub fn next_batch(&self, max_batch: usize, max_wait: Duration) -> Option<Vec<Job>> {
        let mut state = self.lock();
        let first = loop {
            #[cfg(feature = "fault-injection")]
            {
                if self.faults.kill.load(Ordering::SeqCst) {
                    drop(state);
                    panic!("fault injection: the worker thread is killed");
                }
                if self.faults.hold.load(Ordering::SeqCst) {
                    state = self
                        .wake
                        .wait_timeout(state, Duration::from_millis(10))
                        .unwrap_or_else(|e| e.into_inner())
                        .0;
                    continue;
                }
            }
            self.drop_abandoned(&mut state);
            if let Some(job) = state.jobs.pop_front() {
                break job;
            }
            if state.closed {
                return None;
            }
            // Wake now and then so abandoned jobs leave the queue even without new arrivals.
            state = self
                .wake
                .wait_timeout(state, Duration::from_millis(200))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        // The window starts at admission: a request that already waited behind a running batch
        // does not wait again.
        let window_end = first.admitted + max_wait;
        let mut batch = vec![first];
        loop {
            let mut i = 0;
            while i < state.jobs.len() && batch.len() < max_batch {
                if state.jobs[i].key == batch[0].key {
                    if let Some(job) = state.jobs.remove(i) {
                        batch.push(job);
                    }
                } else {
                    i += 1;
                }
            }
            let now = Instant::now();
            if batch.len() >= max_batch || state.closed || now >= window_end {
                break;
            }
            state = self
                .wake
                .wait_timeout(state, window_end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
            self.drop_abandoned(&mut state);
        }
        self.metrics.queue_depth.set(state.jobs.len() as i64);
        for job in &batch {
            job.progress.start(job.item.params.steps);
        }
        Some(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::RgbImage;
    use rl4pix_model::pipeline::EditParams;

    fn job(size: u32, steps: usize) -> (Job, oneshot::Receiver<Result<JobOutput, JobError>>) {
        let item = BatchItem {
            image: Arc::new(RgbImage::new(size, size)),
            instruction: "x".into(),
            params: EditParams {
                steps,
                ..EditParams::default()
            },
        };
        Job::new("id".into(), item, None, 8, Duration::from_secs(60))
    }

    #[test]
    fn full_queue_refuses_and_batches_group_compatible_requests() {
        let queue = Queue::new(3, Metrics::new(4));
        let (a, _ra) = job(16, 4);
        let (b, _rb) = job(32, 4);
        let (c, _rc) = job(16, 4);
        let (d, _rd) = job(16, 4);
        queue.push(a).unwrap();
        queue.push(b).unwrap();
        queue.push(c).unwrap();
        assert!(matches!(queue.push(d), Err(QueueError::Full { .. })));
        let first = queue.next_batch(4, Duration::ZERO).unwrap();
        assert_eq!(first.len(), 2, "the two 16x16 requests run together");
        let second = queue.next_batch(4, Duration::ZERO).unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].key.grid, (32, 32));
    }

    #[test]
    fn a_job_can_be_found_and_taken_out_by_id() {
        let queue = Queue::new(4, Metrics::new(4));
        let mut receivers = Vec::new();
        for id in ["a", "b", "c"] {
            let (mut j, rx) = job(16, 4);
            j.id = id.into();
            queue.push(j).unwrap();
            receivers.push(rx);
        }
        assert_eq!(queue.position("b"), Some(1));
        assert!(queue.remove("b"));
        assert!(!queue.remove("b"), "already gone");
        assert_eq!(queue.position("c"), Some(1));
        assert_eq!(queue.depth(), 2);
        let batch = queue.next_batch(4, Duration::ZERO).unwrap();
        assert_eq!(batch.len(), 2);
        assert!(
            batch
                .iter()
                .all(|j| j.progress.stage() == Stage::Running { step: 0, total: 4 }),
            "the worker's batch is marked running"
        );
        assert_eq!(queue.position("a"), None);
    }

    #[test]
    fn abandoned_jobs_free_their_slot() {
        let queue = Queue::new(1, Metrics::new(4));
        let (a, ra) = job(16, 4);
        queue.push(a).unwrap();
        drop(ra);
        let (b, _rb) = job(16, 4);
        queue.push(b).expect("the abandoned job no longer counts");
        queue.close();
        assert_eq!(queue.next_batch(4, Duration::ZERO).unwrap().len(), 1);
        assert!(queue.next_batch(4, Duration::ZERO).is_none());
    }
}
