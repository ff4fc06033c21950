//! Prometheus metrics: HTTP requests by route and status, queue depth, batch sizes, and the
//! time requests spend queued and in inference.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub http_duration: HistogramVec,
    pub queue_depth: IntGauge,
    pub running: IntGauge,
    pub batch_size: Histogram,
    pub queue_seconds: Histogram,
    pub inference_seconds: Histogram,
    /// Edits by outcome: ok, error, cancelled, timeout, rejected (queue full).
    pub edits: IntCounterVec,
    /// Async jobs by final status: done, failed, cancelled.
    pub jobs: IntCounterVec,
}

const SECONDS_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// A histogram of durations in seconds, on [`SECONDS_BUCKETS`].
fn seconds_histogram(name: &str, help: &str) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(SECONDS_BUCKETS.to_vec()))
        .expect("static metric definition")
}

impl Metrics {
    pub fn new(max_batch_size: usize) -> Self {
        let registry = Registry::new();
        let http_requests = IntCounterVec::new(
            Opts::new("rl4pix_http_requests_total", "HTTP requests answered"),
            &["route", "method", "status"],
        )
        .expect("static metric definition");
        let http_duration = HistogramVec::new(
            HistogramOpts::new(
                "rl4pix_http_request_duration_seconds",
                "Time from request to response head",
            )
            .buckets(SECONDS_BUCKETS.to_vec()),
            &["route"],
        )
        .expect("static metric definition");
        let queue_depth = IntGauge::new(
            "rl4pix_queue_depth",
            "Edits waiting for the worker (not yet running)",
        )
        .expect("static metric definition");
        let running = IntGauge::new("rl4pix_running_edits", "Edits in the running batch")
            .expect("static metric definition");
        let batch_buckets: Vec<f64> = (1..=max_batch_size.max(1)).map(|b| b as f64).collect();
        let batch_size = Histogram::with_opts(
            HistogramOpts::new("rl4pix_batch_size", "Edits per model batch").buckets(batch_buckets),
        )
        .expect("static metric definition");
        let queue_seconds = seconds_histogram(
            "rl4pix_queue_duration_seconds",
            "Time from admission to the start of the edit's batch",
        );
        let inference_seconds = seconds_histogram(
            "rl4pix_inference_duration_seconds",
            "Time the model spent on a batch",
        );
        let edits = IntCounterVec::new(
            Opts::new("rl4pix_edits_total", "Edits by outcome"),
            &["outcome"],
        )
        .expect("static metric definition");
        let jobs = IntCounterVec::new(
            Opts::new("rl4pix_jobs_total", "Async jobs by final status"),
            &["status"],
        )
        .expect("static metric definition");
        for c in [
            Box::new(http_requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(http_duration.clone()),
            Box::new(queue_depth.clone()),
            Box::new(running.clone()),
            Box::new(batch_size.clone()),
            Box::new(queue_seconds.clone()),
            Box::new(inference_seconds.clone()),
            Box::new(edits.clone()),
            Box::new(jobs.clone()),
        ] {
            registry.register(c).expect("metric names are unique");
        }
        Self {
            registry,
            http_requests,
            http_duration,
            queue_depth,
            running,
            batch_size,
            queue_seconds,
            inference_seconds,
            edits,
            jobs,
        }
    }

    pub fn edit_outcome(&self, outcome: &str) {
        self.edits.with_label_values(&[outcome]).inc();
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding into a Vec cannot fail for well-formed metrics.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    }
}
