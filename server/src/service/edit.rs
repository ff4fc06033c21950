//! Edits: admission (ready, room in the queue), preparation (the adapter version pinned, the
//! image checked and decoded), the synchronous run under its deadline, async submission with
//! the task that records a job's outcome, and the finish (attention maps kept, image encoded).

use std::sync::Arc;

use image::RgbImage;
use tokio::sync::oneshot;

use super::state::Service;
use crate::adapters::AdapterEntry;
use crate::attention_cache::CachedEdit;
use crate::backend::BatchItem;
use crate::codec::{self, OutputFormat};
use crate::edit::{EditResult, EditSubmission};
use crate::error::ServiceError;
use crate::jobs::{JobRecord, Outcome};
use crate::queue::{CancelToken, Job, JobError, JobOutput, PinnedAdapter, QueueError};
use crate::working_size::{self, SizeMode};

/// An edit that passed every check and is decoded, ready for the queue.
pub struct PreparedEdit {
    edit_id: String,
    item: BatchItem,
    adapter: Option<PinnedAdapter>,
    meta: ResultMeta,
}

/// What the answer needs besides the model's output.
struct ResultMeta {
    seed: u64,
    adapter: String,
    output_format: OutputFormat,
    instruction: String,
    /// The input as sent (the attention overlays are drawn on it).
    image: Arc<RgbImage>,
    /// Set when the model runs at another size than the input's.
    rescaled: Option<Rescaled>,
}

/// The input at the model's working size, to bring the result back to the input's size.
struct Rescaled {
    shrunk: Arc<RgbImage>,
    keep_input: bool,
}

type Reply = oneshot::Receiver<Result<JobOutput, JobError>>;

impl Service {
    /// The checks that need no body: the server is ready and the queue has room (`push` is
    /// the exact check; this one refuses before anything is read or decoded).
    pub fn check_admission(&self) -> Result<(), ServiceError> {
        if !self.is_ready() {
            return Err(ServiceError::unavailable(
                "the server is not ready (starting or shutting down)",
            ));
        }
        if !self.queue.has_room() {
            self.metrics.edit_outcome("rejected");
            return Err(ServiceError::busy(
                QueueError::Full {
                    capacity: self.queue.capacity(),
                }
                .to_string(),
                self.retry_after_s(),
            ));
        }
        Ok(())
    }

    /// Pins the adapter version the edit runs with (whatever happens to the name later),
    /// checks the image's declared size, then decodes it.
    pub async fn prepare(&self, submission: EditSubmission) -> Result<PreparedEdit, ServiceError> {
        let adapter = self
            .adapters
            .for_request_async(submission.adapter.as_deref())
            .await?;
        let max_pixels = self.limits.max_pixels;
        let image_format = codec::check_declared_image(&submission.image, max_pixels)?;
        let adapter_name = adapter
            .as_ref()
            .map(|a| a.adapter.name.clone())
            .unwrap_or_else(|| "none".into());
        let bytes = submission.image;
        let image =
            tokio::task::spawn_blocking(move || codec::decode(&bytes, image_format, max_pixels))
                .await
                .map_err(|e| ServiceError::internal(format!("decoding task failed: {e}")))??;
        let image = Arc::new(image);
        let rescaled = self.working_image(&image, submission.working_size, submission.keep_input);
        let meta = ResultMeta {
            seed: submission.params.seed,
            adapter: adapter_name,
            output_format: submission.output_format,
            instruction: submission.instruction.clone(),
            image: image.clone(),
            rescaled,
        };
        Ok(PreparedEdit {
            // Unguessable: async job ids double as the only credential to a job.
            edit_id: format!("{:032x}", rand::random::<u128>()),
            item: BatchItem {
                image: meta.rescaled.as_ref().map_or(image, |r| r.shrunk.clone()),
                instruction: submission.instruction,
                params: submission.params,
            },
            adapter: adapter.map(pin),
            meta,
        })
    }

    /// Runs the edit and waits for it, up to the request timeout. Dropping the future (the
    /// client left) abandons the edit: the worker skips it, or cancels its batch when no other
    /// member is still wanted.
    pub async fn run(&self, edit: PreparedEdit) -> Result<EditResult, ServiceError> {
        let (job, reply, meta) = self.job_for(edit);
        let edit_id = job.id.clone();
        let deadline = tokio::time::Instant::from_std(job.deadline);
        let _cancel_on_drop = CancelOnDrop(job.cancel.clone());
        self.push(job)?;
        let output = match tokio::time::timeout_at(deadline, reply).await {
            Ok(Ok(Ok(output))) => output,
            Ok(Ok(Err(job_error))) => {
                let outcome = match job_error {
                    JobError::TimedOut => "timeout",
                    _ => "error",
                };
                self.metrics.edit_outcome(outcome);
                return Err(job_error.into());
            }
            Ok(Err(_closed)) if tokio::time::Instant::now() < deadline => {
                self.metrics.edit_outcome("error");
                return Err(worker_dropped());
            }
            _ => {
                self.metrics.edit_outcome("timeout");
                return Err(ServiceError::timeout(format!(
                    "the edit did not finish within {} s (--request-timeout-s); its work was dropped",
                    self.limits.request_timeout_s
                )));
            }
        };
        self.metrics.edit_outcome("ok");
        self.finish(edit_id, meta, output).await
    }

    /// Queues the edit as an async job and returns its id at once; a task waits for the worker
    /// and records the outcome. The job is tied to no connection: only `cancel_job` stops it.
    pub fn submit(self: &Arc<Self>, edit: PreparedEdit) -> Result<String, ServiceError> {
        let (job, reply, meta) = self.job_for(edit);
        let id = job.id.clone();
        let record = Arc::new(JobRecord::new(
            id.clone(),
            meta.seed,
            meta.adapter.clone(),
            job.cancel.clone(),
            job.progress.clone(),
        ));
        // Stored before it is queued: the worker may finish it before this returns.
        self.jobs.insert(record.clone());
        if let Err(e) = self.push(job) {
            self.jobs.withdraw(&id);
            return Err(e);
        }
        tokio::spawn(self.clone().supervise(record, reply, meta));
        Ok(id)
    }

    fn job_for(&self, edit: PreparedEdit) -> (Job, Reply, ResultMeta) {
        let (job, reply) = Job::new(
            edit.edit_id,
            edit.item,
            edit.adapter,
            self.info.vae_scale_factor,
            self.limits.request_timeout(),
        );
        (job, reply, edit.meta)
    }

    /// Admits a job or says why not (busy, with a Retry-After from the recent batch times).
    fn push(&self, job: Job) -> Result<(), ServiceError> {
        self.queue.push(job).map_err(|e| match e {
            QueueError::Full { .. } => {
                self.metrics.edit_outcome("rejected");
                ServiceError::busy(e.to_string(), self.retry_after_s())
            }
            QueueError::Closed => e.into(),
        })
    }

    /// Seconds until the queue has likely room again, from the mean batch time so far.
    fn retry_after_s(&self) -> u64 {
        let hist = &self.metrics.inference_seconds;
        let mean = if hist.get_sample_count() > 0 {
            hist.get_sample_sum() / hist.get_sample_count() as f64
        } else {
            1.0
        };
        let batches_ahead = self.queue.depth() as f64 / self.batching.max_batch_size as f64;
        (mean * (batches_ahead + 1.0)).ceil().clamp(1.0, 60.0) as u64
    }

    async fn supervise(self: Arc<Self>, record: Arc<JobRecord>, reply: Reply, meta: ResultMeta) {
        let received = reply.await;
        // Cancelled meanwhile: the result, if any, is discarded unencoded.
        if record.finished().is_some() {
            return;
        }
        let outcome = match received {
            Ok(Ok(output)) => match self.finish(record.id.clone(), meta, output).await {
                Ok(result) => Outcome::Done(Arc::new(result)),
                Err(e) => Outcome::Failed(e),
            },
            Ok(Err(JobError::Cancelled)) => Outcome::Cancelled,
            Ok(Err(JobError::Backend(e)))
                if matches!(*e, crate::backend::BackendError::Cancelled) =>
            {
                Outcome::Cancelled
            }
            Ok(Err(e)) => Outcome::Failed(e.into()),
            Err(_closed) if record.cancel.is_cancelled() => Outcome::Cancelled,
            Err(_closed) => Outcome::Failed(worker_dropped()),
        };
        let edit_outcome = match &outcome {
            Outcome::Done(_) => Some("ok"),
            Outcome::Failed(e) if e.kind == crate::error::ErrorKind::Timeout => Some("timeout"),
            Outcome::Failed(_) => Some("error"),
            // The queue or the worker counted it.
            Outcome::Cancelled => None,
        };
        if self.jobs.finish(&record, outcome) {
            if let Some(label) = edit_outcome {
                self.metrics.edit_outcome(label);
            }
        }
    }

    /// The input at the model's working size, when the edit runs there and that differs.
    fn working_image(
        &self,
        image: &RgbImage,
        mode: SizeMode,
        keep_input: bool,
    ) -> Option<Rescaled> {
        let side = self.info.working_size?;
        if mode != SizeMode::Model {
            return None;
        }
        let (width, height) = image.dimensions();
        let grid = self.info.vae_scale_factor as u32;
        let dims = working_size::working_dims(width, height, side, grid);
        (dims != (width, height)).then(|| Rescaled {
            shrunk: Arc::new(working_size::shrink(image, dims)),
            keep_input,
        })
    }

    /// Keeps the attention maps for `/attention` and encodes the image.
    async fn finish(
        &self,
        edit_id: String,
        meta: ResultMeta,
        output: JobOutput,
    ) -> Result<EditResult, ServiceError> {
        let (working_width, working_height) = output.image.dimensions();
        let format = meta.output_format;
        let model_output = output.image;
        let input = meta.image.clone();
        let rescaled = meta.rescaled;
        let (image, encoded) = tokio::task::spawn_blocking(move || {
            let image = match rescaled {
                Some(r) => working_size::restore(&input, &r.shrunk, &model_output, r.keep_input),
                None => model_output,
            };
            let encoded = codec::encode(&image, format)?;
            Ok::<_, ServiceError>((image.dimensions(), encoded))
        })
        .await
        .map_err(|e| ServiceError::internal(format!("encoding task failed: {e}")))??;
        let (width, height) = image;
        if let Some(attention) = output.attention {
            self.attention.insert(
                edit_id.clone(),
                CachedEdit {
                    instruction: meta.instruction,
                    image: meta.image,
                    attention,
                },
            );
        }
        Ok(EditResult {
            edit_id,
            seed: meta.seed,
            adapter: meta.adapter,
            width,
            height,
            working_width,
            working_height,
            format,
            queue_ms: output.queue_time.as_millis() as u64,
            inference_ms: output.inference_time.as_millis() as u64,
            batch_size: output.batch_size,
            bytes: encoded.into(),
        })
    }
}

/// The queue's handle on a registry version: holding the entry keeps it counted as in flight.
fn pin(entry: Arc<AdapterEntry>) -> PinnedAdapter {
    PinnedAdapter::new(
        entry.adapter.name.clone(),
        entry.generation,
        entry.adapter.resolved.clone(),
        entry,
    )
}

fn worker_dropped() -> ServiceError {
    ServiceError::unavailable("the worker dropped the edit (shutting down?)")
}

struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
