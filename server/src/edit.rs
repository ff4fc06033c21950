//! An edit in the service's terms: what a client asked for once its parameters are checked,
//! and the finished, encoded result that the synchronous answer and an async job both serve.

use bytes::Bytes;
use rl4pix_model::pipeline::EditParams;

use crate::codec::OutputFormat;
use crate::working_size::SizeMode;

/// A request whose parameters passed every check; the image is still the client's bytes.
pub struct EditSubmission {
    pub image: Bytes,
    pub instruction: String,
    pub params: EditParams,
    /// As asked: absent, `""` or `"default"`: the default adapter; `"none"`: the base model.
    pub adapter: Option<String>,
    pub output_format: OutputFormat,
    /// Run at the model's working size or the picture's own.
    pub working_size: SizeMode,
    /// When the working size differs: keep the input's pixels where the model changed nothing.
    pub keep_input: bool,
}

/// A finished edit, encoded.
#[derive(Debug)]
pub struct EditResult {
    /// Also the id of its attention maps (and of its job, when it ran as one).
    pub edit_id: String,
    pub seed: u64,
    /// The adapter applied, or `none`.
    pub adapter: String,
    pub width: u32,
    pub height: u32,
    /// The size the model ran at (the result is scaled back to `width x height`).
    pub working_width: u32,
    pub working_height: u32,
    pub format: OutputFormat,
    pub queue_ms: u64,
    pub inference_ms: u64,
    pub batch_size: usize,
    pub bytes: Bytes,
}
