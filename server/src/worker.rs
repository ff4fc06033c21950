//! The worker thread: it builds the backend (so the model and device live on this thread
//! only), loads the adapters, then runs batches from the queue until the queue closes.
//!
//! Cancellation: a batch is cancelled at its next step only when every request in it has been
//! abandoned (client gone, or deadline passed). A request that leaves a batch whose others are
//! still wanted rides along and its result is discarded: stopping the batch would throw away
//! the others' finished steps, and their bytes must not depend on who else was in the batch.
//! An async job cancelled with `DELETE /jobs/{id}` is abandoned the same way.
//!
//! Progress: every member's `Progress` hears each step, for `/jobs/{id}` and its events.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use rl4pix_model::ModelError;
use tokio::sync::oneshot;

use crate::backend::{Backend, BackendError, BackendInfo, Batch};
use crate::config::BatchingConfig;
use crate::metrics::Metrics;
use crate::queue::{Job, JobError, JobOutput, Queue};

pub struct WorkerHandle {
    pub info: BackendInfo,
    pub alive: Arc<AtomicBool>,
    pub thread: JoinHandle<()>,
}

/// Starts the worker and waits until the backend is loaded (or failed to load).
pub async fn start<B, F>(
    factory: F,
    queue: Arc<Queue>,
    batching: BatchingConfig,
    metrics: Metrics,
) -> Result<WorkerHandle, BackendError>
where
    B: Backend,
    F: FnOnce() -> Result<B, BackendError> + Send + 'static,
{
    let (ready_tx, ready_rx) = oneshot::channel();
    let alive = Arc::new(AtomicBool::new(false));
    let alive_in_thread = alive.clone();
    let thread = std::thread::Builder::new()
        .name("rl4pix-worker".into())
        .spawn(move || {
            let backend = match factory() {
                Ok(b) => b,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            alive_in_thread.store(true, Ordering::SeqCst);
            let _ = ready_tx.send(Ok(backend.info()));
            // Marks the worker dead and fails what is queued however the loop ends (a panic
            // outside a batch included).
            let _guard = ExitGuard {
                alive: alive_in_thread.clone(),
                queue: queue.clone(),
            };
            run(&backend, &queue, &batching, &metrics, &alive_in_thread);
        })
        .map_err(|e| {
            BackendError::Model(rl4pix_model::ModelError::InvalidArgument(format!(
                "cannot start the worker thread: {e}"
            )))
        })?;
    let info = match ready_rx.await {
        Ok(result) => result?,
        Err(_) => {
            let _ = thread.join();
            return Err(BackendError::Model(
                rl4pix_model::ModelError::InvalidArgument(
                    "the worker thread died while loading the model".into(),
                ),
            ));
        }
    };
    Ok(WorkerHandle {
        info,
        alive,
        thread,
    })
}

struct ExitGuard {
    alive: Arc<AtomicBool>,
    queue: Arc<Queue>,
}

impl Drop for ExitGuard {
    fn drop(&mut self) {
        self.alive.store(false, Ordering::SeqCst);
        if std::thread::panicking() {
            tracing::error!("the worker thread panicked outside a batch: failing every queued edit; /health and /ready now answer 503");
        }
        // Sync callers and async jobs hear at once instead of waiting for their deadline.
        self.queue.fail_all();
    }
}

/// Runs batches until the queue is closed and drained; a batch's failure (a model panic
/// included) fails its requests, never the loop. After a failed batch the backend is checked:
/// `alive` (what `/health` and `/ready` report) follows that check.
fn run(
    backend: &dyn Backend,
    queue: &Queue,
    batching: &BatchingConfig,
    metrics: &Metrics,
    alive: &AtomicBool,
) {
    while let Some(jobs) = queue.next_batch(batching.max_batch_size, batching.max_wait()) {
        if !run_batch(backend, jobs, metrics) {
            let health = backend.health();
            if let Err(e) = &health {
                tracing::error!(error = %e, "the backend failed its check after a failed batch");
            }
            alive.store(health.is_ok(), Ordering::SeqCst);
        }
    }
    tracing::info!("worker stopped: queue closed and drained");
}

/// Runs one batch and answers its jobs; false when it failed for a reason of ours.
fn run_batch(backend: &dyn Backend, jobs: Vec<Job>, metrics: &Metrics) -> bool {
    let started = Instant::now();
    for job in &jobs {
        metrics
            .queue_seconds
            .observe((started - job.admitted).as_secs_f64());
    }
    let batch_size = jobs.len();
    metrics.batch_size.observe(batch_size as f64);
    metrics.running.set(batch_size as i64);
    let batch = Batch {
        items: jobs.iter().map(|j| j.item.clone()).collect(),
        adapter: jobs[0]
            .adapter
            .as_ref()
            .map(|pinned| pinned.resolved.clone()),
    };
    let mut on_step = |step: usize, total: usize| {
        // Every member hears of every step, a cancelled one too: its status is already final,
        // and the step it reached shows how far its batch went.
        for job in &jobs {
            job.progress.step(step, total);
        }
        let now = Instant::now();
        jobs.iter().any(|job| !job.is_abandoned(now))
    };
    // A panic inside the model must fail this batch, not kill the server.
    let result =
        std::panic::catch_unwind(AssertUnwindSafe(|| backend.run_batch(&batch, &mut on_step)));
    let inference_time = started.elapsed();
    metrics
        .inference_seconds
        .observe(inference_time.as_secs_f64());
    metrics.running.set(0);
    tracing::debug!(
        batch_size,
        inference_ms = inference_time.as_millis() as u64,
        "batch done"
    );
    match result {
        Ok(Ok(outputs)) => {
            for (job, out) in jobs.into_iter().zip(outputs) {
                let output = JobOutput {
                    image: out.image,
                    attention: out.attention,
                    queue_time: started - job.admitted,
                    inference_time,
                    batch_size,
                };
                // The receiver may be gone (client left); nothing to do then.
                let _ = job.reply.send(Ok(output));
            }
            true
        }
        Ok(Err(BackendError::Cancelled)) => {
            metrics
                .edits
                .with_label_values(&["cancelled"])
                .inc_by(batch_size as u64);
            tracing::info!(batch_size, "batch cancelled: every request was abandoned");
            let now = Instant::now();
            for job in jobs {
                let why = if now >= job.deadline {
                    JobError::TimedOut
                } else {
                    JobError::Cancelled
                };
                let _ = job.reply.send(Err(why));
            }
            true
        }
        Ok(Err(e)) => {
            tracing::error!(error = %e, batch_size, "batch failed");
            let e = Arc::new(e);
            for job in jobs {
                let _ = job.reply.send(Err(JobError::Backend(e.clone())));
            }
            // A request the model refused says nothing about the backend's health.
            matches!(
                &*e,
                BackendError::Model(
                    ModelError::InvalidArgument(_)
                        | ModelError::Image(_)
                        | ModelError::Tokenizer(_)
                        | ModelError::Adapter { .. }
                )
            )
        }
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "unknown panic".into());
            tracing::error!(%message, batch_size, "the model panicked");
            for job in jobs {
                let _ = job.reply.send(Err(JobError::WorkerGone(format!(
                    "the model panicked: {message}"
                ))));
            }
            false
        }
    }
}
