//! The one error type of the service layer, of what it calls (job store, codec) and of the HTTP
//! handlers above it: what kind of failure it is, a stable machine-readable code and a message
//! for people. The kind is all the HTTP layer needs to choose a status (`crate::http::error` is
//! the only place that does); the code is what clients match on (`error_type` in every answer).

use rl4pix_model::ModelError;

use crate::adapters::error::AdapterError;
use crate::backend::BackendError;
use crate::queue::{JobError, QueueError};

/// What went wrong, in the service's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request could not be read: broken JSON, multipart, base64, query or image data.
    Malformed,
    /// Read, but a value is missing, out of range or refused.
    Invalid,
    /// No or a wrong credential.
    Unauthorized,
    /// A path leads outside what may be touched.
    Forbidden,
    NotFound,
    /// The resource exists but not with this method.
    MethodNotAllowed,
    /// Not possible in the current state (a job not done or cancelled, no adapters folder).
    Conflict,
    TooLarge,
    UnsupportedMedia,
    /// The queue is full; `retry_after_s` says when to try again.
    Busy,
    /// The edit was cancelled before it produced an image.
    Cancelled,
    /// The deadline passed; the work was dropped.
    Timeout,
    /// Not ready, shutting down, or a resource is briefly unavailable.
    Unavailable,
    /// Our fault: the model failed, a task died.
    Internal,
    // --- connections and HTTP (docs/server.md, "Limits and hardening") ---
    /// The request body did not arrive within `--body-timeout-s`.
    RequestTimeout,
    /// The Host header names a site this server does not answer for (`--allowed-hosts`).
    Misdirected,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ServiceError {
    pub kind: ErrorKind,
    /// Stable and machine-readable, e.g. `invalid_parameter`, `overloaded`, `job_not_found`.
    pub code: &'static str,
    /// What went wrong, for people.
    pub message: String,
    /// Seconds after which trying again makes sense.
    pub retry_after_s: Option<u64>,
}

/// A client's string as an error message quotes it: its first 64 characters.
pub fn clipped(s: &str) -> String {
    s.chars().take(64).collect()
}

impl ServiceError {
    /// Our own failures (`Internal`) can carry paths, panic messages or the model's folder:
    /// their details are logged here with an error id, and the message a client sees is the id.
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        let mut message = message.into();
        if kind == ErrorKind::Internal {
            let error_id = format!("{:016x}", rand::random::<u64>());
            tracing::error!(%error_id, code, %message, "internal error");
            message =
                format!("internal error (error id {error_id}; the server's log has the details)");
        }
        Self {
            kind,
            code,
            message,
            retry_after_s: None,
        }
    }

    pub fn with_retry_after(mut self, seconds: u64) -> Self {
        self.retry_after_s = Some(seconds);
        self
    }

    /// The request could not be parsed (broken JSON, multipart or base64).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Malformed, "bad_request", message)
    }

    /// Parsed, but a value is missing or out of range.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Invalid, "invalid_parameter", message)
    }

    pub fn too_large(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::TooLarge, code, message)
    }

    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::new(
            ErrorKind::UnsupportedMedia,
            "unsupported_media_type",
            message,
        )
    }

    pub fn not_found(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(ErrorKind::NotFound, code, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unauthorized, "unauthorized", message)
    }

    pub fn busy(message: impl Into<String>, retry_after_s: u64) -> Self {
        Self::new(ErrorKind::Busy, "overloaded", message).with_retry_after(retry_after_s)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Unavailable, "unavailable", message)
    }

    pub fn cancelled() -> Self {
        Self::new(
            ErrorKind::Cancelled,
            "unavailable",
            "the edit was cancelled",
        )
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Timeout, "timeout", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Internal, "internal", message)
    }

    /// The body's last byte did not arrive in time.
    pub fn body_timeout() -> Self {
        Self::new(
            ErrorKind::RequestTimeout,
            "request_timeout",
            "the request body did not arrive within --body-timeout-s",
        )
    }

    pub fn misdirected(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Misdirected, "misdirected_request", message)
    }

    /// The worker thread is gone: nothing queued will ever run.
    pub fn worker_died() -> Self {
        Self::unavailable(
            "the model worker stopped; this server cannot run edits until it is restarted (see /health)",
        )
    }

    /// An image whose header or pixels cannot be read.
    pub fn invalid_image(message: impl Into<String>) -> Self {
        Self::new(ErrorKind::Malformed, "invalid_image", message)
    }

    /// What an adapter error means to an admin route: a refused file is the client's
    /// unprocessable input, a missing folder a conflict with how the server was started.
    pub fn from_admin(e: AdapterError) -> Self {
        let message = e.to_string();
        match e {
            AdapterError::InvalidName(_) => Self::invalid(message),
            AdapterError::NotFound { .. } => Self::not_found("adapter_not_found", message),
            AdapterError::Refused { .. } => {
                Self::new(ErrorKind::Invalid, "adapter_refused", message)
            }
            AdapterError::Unavailable { .. } => Self::unavailable(message).with_retry_after(1),
            AdapterError::Throttled { retry_after_s, .. } => {
                Self::unavailable(message).with_retry_after(retry_after_s)
            }
            AdapterError::NoFolder => Self::new(ErrorKind::Conflict, "no_adapters_folder", message),
            AdapterError::InObjectStore(_) => {
                Self::new(ErrorKind::Conflict, "adapters_in_object_store", message)
            }
            AdapterError::Shipped => Self::new(ErrorKind::Conflict, "shipped_adapters", message),
            AdapterError::PathOutside(_) => Self::new(
                ErrorKind::Forbidden,
                "path_outside_adapters_folder",
                message,
            ),
            AdapterError::MissingFile(_) => Self::not_found("file_not_found", message),
            AdapterError::Io(_) => Self::internal(message),
        }
    }
}

/// An edit's view of an adapter error: a refused adapter does not exist (its reason, which can
/// name files, is for the admin routes).
impl From<AdapterError> for ServiceError {
    fn from(e: AdapterError) -> Self {
        match e {
            AdapterError::InvalidName(_) => Self::invalid(e.to_string()),
            AdapterError::NotFound { .. } => Self::not_found("adapter_not_found", e.to_string()),
            // The reason can name files and link targets: admins read it from `GET /adapters`.
            AdapterError::Refused { name, .. } => Self::not_found(
                "adapter_not_found",
                format!("adapter `{name}` was refused; GET /adapters (admin key) says why"),
            ),
            AdapterError::Unavailable { name, .. } => Self::unavailable(format!(
                "adapter `{name}` is not available right now; retry shortly"
            ))
            .with_retry_after(1),
            other => Self::from_admin(other),
        }
    }
}

impl From<QueueError> for ServiceError {
    fn from(e: QueueError) -> Self {
        match e {
            // The edit service replaces this Retry-After with one from the recent batch times.
            QueueError::Full { .. } => Self::busy(e.to_string(), 1),
            QueueError::Closed => Self::unavailable(e.to_string()),
        }
    }
}

impl From<JobError> for ServiceError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Cancelled => Self::cancelled(),
            JobError::TimedOut => Self::timeout(
                "the edit did not finish within --request-timeout-s; its work was dropped",
            ),
            JobError::Backend(inner) => match inner.as_ref() {
                BackendError::Cancelled => Self::cancelled(),
                BackendError::Model(model) => from_model_error(model),
            },
            JobError::WorkerGone(message) => Self::internal(message),
            JobError::WorkerDied => Self::worker_died(),
        }
    }
}

/// Errors the model reports about a request's content are the client's; the rest are ours.
pub fn from_model_error(e: &ModelError) -> ServiceError {
    match e {
        ModelError::InvalidArgument(_) | ModelError::Image(_) | ModelError::Tokenizer(_) => {
            ServiceError::new(ErrorKind::Invalid, "invalid_input", e.to_string())
        }
        ModelError::Adapter { .. } => {
            ServiceError::new(ErrorKind::Invalid, "adapter_refused", e.to_string())
        }
        ModelError::Cancelled => ServiceError::cancelled(),
        _ => ServiceError::new(ErrorKind::Internal, "model_error", e.to_string()),
    }
}
