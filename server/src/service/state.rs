//! The service: everything a request may need, behind methods (see the sibling files).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::adapters::AdapterRegistry;
use crate::attention_cache::AttentionCache;
use crate::backend::BackendInfo;
use crate::budget::CostBudget;
use crate::config::{BatchingConfig, CostLimits, Limits};
use crate::jobs::JobStore;
use crate::metrics::Metrics;
use crate::queue::Queue;

pub struct Service {
    pub(super) info: BackendInfo,
    pub(super) limits: Limits,
    pub(super) batching: BatchingConfig,
    pub(super) queue: Arc<Queue>,
    pub(super) adapters: Arc<AdapterRegistry>,
    pub(super) attention: AttentionCache,
    /// Async edits (`Prefer: respond-async`).
    pub(super) jobs: JobStore,
    pub(super) metrics: Metrics,
    pub(super) worker_alive: Arc<AtomicBool>,
    pub(super) shutting_down: AtomicBool,
    /// SIGTERM with `--shutdown-drain-s`: readiness is withdrawn while edits are still admitted.
    pub(super) draining: AtomicBool,
    /// Images being inspected or decoded at once (`--max-concurrent-decodes`).
    pub(super) decodes: tokio::sync::Semaphore,
    /// Pixel-steps of admitted, unfinished edits, per client and in all.
    pub(super) costs: Arc<CostBudget>,
    /// Edit requests admitted at once, from before their body is read until they are answered
    /// (or queued, for async jobs): room for a full queue and a running batch.
    pub(super) admission: Arc<tokio::sync::Semaphore>,
}

/// What the server wiring hands the service.
pub struct ServiceParts {
    pub info: BackendInfo,
    pub limits: Limits,
    pub batching: BatchingConfig,
    pub queue: Arc<Queue>,
    pub adapters: Arc<AdapterRegistry>,
    /// Recent edits whose attention maps are kept; 0: none.
    pub attention_capacity: usize,
    /// How long, and how many, finished async jobs are kept.
    pub job_ttl: Duration,
    pub max_jobs: usize,
    pub metrics: Metrics,
    /// Set by the worker thread while it runs.
    pub worker_alive: Arc<AtomicBool>,
    /// Input decoding and cost bounds (issue 17).
    pub input: InputBounds,
}

/// How many images decode at once, what edits may cost, and the byte bounds of what the
/// server keeps after an edit.
#[derive(Debug, Clone)]
pub struct InputBounds {
    pub max_concurrent_decodes: usize,
    pub costs: CostLimits,
    /// Encoded results of finished async jobs.
    pub max_job_bytes: u64,
    /// Inputs and maps in the attention cache.
    pub attention_cache_bytes: u64,
}

impl Service {
    pub fn new(parts: ServiceParts) -> Self {
        let admission = Arc::new(tokio::sync::Semaphore::new(
            parts.batching.max_queue + parts.batching.max_batch_size,
        ));
        Self {
            info: parts.info,
            limits: parts.limits,
            batching: parts.batching,
            queue: parts.queue,
            adapters: parts.adapters,
            attention: AttentionCache::new(
                parts.attention_capacity,
                parts.input.attention_cache_bytes,
            ),
            jobs: JobStore::new(parts.job_ttl, parts.max_jobs, parts.metrics.clone())
                .with_max_bytes(parts.input.max_job_bytes),
            metrics: parts.metrics,
            worker_alive: parts.worker_alive,
            shutting_down: AtomicBool::new(false),
            draining: AtomicBool::new(false),
            decodes: tokio::sync::Semaphore::new(parts.input.max_concurrent_decodes.max(1)),
            costs: CostBudget::new(parts.input.costs),
            admission,
        }
    }

    pub fn info(&self) -> &BackendInfo {
        &self.info
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    pub fn batching(&self) -> &BatchingConfig {
        &self.batching
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Test-only faults for the worker (`fault-injection`).
    #[cfg(feature = "fault-injection")]
    pub fn faults(&self) -> &crate::queue::Faults {
        &self.queue.faults
    }

    /// The worker thread runs and its backend passed its last check.
    pub fn worker_runs(&self) -> bool {
        self.worker_alive.load(Ordering::SeqCst)
    }

    /// The worker runs and the server is not shutting down.
    pub fn is_ready(&self) -> bool {
        self.worker_alive.load(Ordering::SeqCst) && !self.shutting_down.load(Ordering::SeqCst)
    }

    /// Whether load balancers should send edits here: ready and not draining.
    pub fn accepts_traffic(&self) -> bool {
        self.is_ready() && !self.draining.load(Ordering::SeqCst)
    }

    /// Withdraws readiness (`/ready` answers 503) while edits are still admitted, so that load
    /// balancers stop sending before the listener closes.
    pub fn begin_drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// From now on no edit is admitted; admitted ones still finish.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// The worker drains what is queued, then stops.
    pub fn close_queue(&self) {
        self.queue.close();
    }
}
