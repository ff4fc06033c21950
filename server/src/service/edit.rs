//! Edits: admission (ready, room in the queue), preparation (the adapter version pinned, the
//! image checked and decoded), the synchronous run under its deadline, async submission with
//! the task that records a job's outcome, and the finish (attention maps kept, image encoded).

use std::sync::Arc;

use image::RgbImage;
use tokio::sync::oneshot;

use super::blocking;
use super::state::Service;
use crate::adapters::AdapterEntry;
use crate::attention_cache::CachedEdit;
use crate::backend::BatchItem;
use crate::budget::{Client, Refusal, Reservation};
use crate::codec::{self, ImageHeader, OutputFormat};
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
    /// Held from before the decode until the worker answers (or the job is dropped unrun).
    cost: Reservation,
    /// When the request's head arrived: its deadline (`--request-timeout-s`) counts from then,
    /// so reading and decoding the body spend from the same budget. None: from admission.
    arrived: Option<std::time::Instant>,
}

impl PreparedEdit {
    /// Counts the edit's deadline from `arrived` (its request's head) instead of its queueing.
    pub fn arrived_at(mut self, arrived: std::time::Instant) -> Self {
        self.arrived = Some(arrived);
        self
    }
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

    /// Admission before any work: the checks above and a permit, held until the request is
    /// answered (or its job queued). Without a free permit the answer is 429 at once and the
    /// body is never read, so bodies in flight are bounded by the queue, not by the clients.
    pub fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ServiceError> {
        self.check_admission()?;
        self.admission.clone().try_acquire_owned().map_err(|_| {
            self.metrics.edit_outcome("rejected");
            ServiceError::busy(
                format!(
                    "{} edit requests are already being received or run (--max-queue + --max-batch-size); retry later",
                    self.batching.max_queue + self.batching.max_batch_size
                ),
                self.retry_after_s(),
            )
        })
    }

    /// Pins the adapter version the edit runs with (whatever happens to the name later),
    /// inspects the image (format, size, metadata bombs), charges its cost to `client`, then
    /// decodes it. Inspection and decoding run on blocking threads, at most
    /// `--max-concurrent-decodes` at once.
    pub async fn prepare(
        &self,
        submission: EditSubmission,
        client: Client,
    ) -> Result<PreparedEdit, ServiceError> {
        let adapter = self
            .adapters
            .for_request_async(submission.adapter.as_deref())
            .await?;
        let max_pixels = self.limits.max_pixels;
        let decode_turn = self
            .decodes
            .acquire()
            .await
            .map_err(|_| ServiceError::unavailable("the server is shutting down"))?;
        let bytes = submission.image.clone();
        let header = blocking("image", move || codec::inspect(&bytes, max_pixels)).await?;
        let grid = self.planned_grid(header, submission.working_size)?;
        let cost = grid.0 as u64 * grid.1 as u64 * submission.params.steps as u64;
        let cost = self
            .costs
            .reserve(client, cost)
            .map_err(|refusal| self.refused(refusal))?;
        let adapter_name = adapter
            .as_ref()
            .map(|a| a.adapter.name.clone())
            .unwrap_or_else(|| "none".into());
        let bytes = submission.image;
        let image = blocking("image", move || codec::decode(&bytes, header, max_pixels)).await?;
        drop(decode_turn);
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
            cost,
            arrived: None,
        })
    }

    /// Runs the edit and waits for it, up to the request timeout. Dropping the future (the
    /// client left) abandons the edit: the worker skips it, or cancels its batch when no other
    /// member is still wanted.
    pub async fn run(&self, edit: PreparedEdit) -> Result<EditResult, ServiceError> {
        let (job, reply, meta, cost) = self.job_for(edit);
        let edit_id = job.id.clone();
        let deadline = tokio::time::Instant::from_std(job.deadline);
        let _cancel_on_drop = CancelOnDrop(job.cancel.clone());
        self.push(job)?;
        let answer = tokio::time::timeout_at(deadline, reply).await;
        drop(cost);
        let output = match answer {
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
                return Err(self.worker_dropped());
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
        let (job, reply, meta, cost) = self.job_for(edit);
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
        tokio::spawn(self.clone().supervise(record, reply, meta, cost));
        Ok(id)
    }

    fn job_for(&self, edit: PreparedEdit) -> (Job, Reply, ResultMeta, Reservation) {
        let timeout = self.limits.request_timeout();
        let (mut job, reply) = Job::new(
            edit.edit_id,
            edit.item,
            edit.adapter,
            self.info.vae_scale_factor,
            timeout,
        );
        if let Some(deadline) = edit.arrived.and_then(|at| at.checked_add(timeout)) {
            job.deadline = deadline;
        }
        (job, reply, edit.meta, edit.cost)
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

    async fn supervise(
        self: Arc<Self>,
        record: Arc<JobRecord>,
        reply: Reply,
        meta: ResultMeta,
        cost: Reservation,
    ) {
        // The reply comes when the worker is done with the job, or the queue dropped it.
        let received = reply.await;
        drop(cost);
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
            Err(_closed) => Outcome::Failed(self.worker_dropped()),
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

    /// The grid the model will run a `header`-sized picture at (working size, then the VAE
    /// grid); refused when that grid has more pixels than `--max-pixels` (a 1x1048576 picture
    /// runs at 4x1048576 on a 4-pixel grid).
    fn planned_grid(
        &self,
        header: ImageHeader,
        mode: SizeMode,
    ) -> Result<(u32, u32), ServiceError> {
        let factor = self.info.vae_scale_factor.max(1) as u32;
        let (width, height) = (header.width, header.height);
        let dims = match (self.info.working_size, mode) {
            (Some(side), SizeMode::Model) => {
                working_size::working_dims(width, height, side, factor)
            }
            _ => (width, height),
        };
        let grid = rl4pix_model::image_io::size_for_vae(dims.0, dims.1, factor);
        let pixels = grid.0 as u64 * grid.1 as u64;
        if pixels > self.limits.max_pixels {
            return Err(ServiceError::too_large(
                "image_too_large",
                format!(
                    "a {width}x{height} picture runs at {}x{} = {pixels} pixels (rounded to the model's {factor}-pixel grid); the limit is {} (--max-pixels)",
                    grid.0, grid.1, self.limits.max_pixels
                ),
            ));
        }
        Ok(grid)
    }

    /// An edit the cost budget refused: too costly for any queue (413), or not now (429).
    fn refused(&self, refusal: Refusal) -> ServiceError {
        match refusal {
            Refusal::TooCostly { .. } => {
                ServiceError::too_large("edit_too_costly", refusal.to_string())
            }
            Refusal::ClientShare { .. } | Refusal::Full { .. } => {
                self.metrics.edit_outcome("rejected");
                ServiceError::busy(refusal.to_string(), self.retry_after_s())
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
        let (image, encoded) = blocking("encoding", move || {
            let image = match rescaled {
                Some(r) => working_size::restore(&input, &r.shrunk, &model_output, r.keep_input),
                None => model_output,
            };
            let encoded = codec::encode(&image, format)?;
            Ok((image.dimensions(), encoded))
        })
        .await?;
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

impl Service {
    /// Why an edit's reply channel closed without an answer.
    fn worker_dropped(&self) -> ServiceError {
        if self.worker_runs() {
            ServiceError::unavailable("the worker dropped the edit (shutting down?)")
        } else {
            ServiceError::worker_died()
        }
    }
}

struct CancelOnDrop(CancelToken);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}
