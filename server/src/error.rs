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

impl ServiceError {
    pub fn new(kind: ErrorKind, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            kind,
            code,
            message: message.into(),
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

/// An edit's view of an adapter error: a refused adapter does not exist (with the reason).
impl From<AdapterError> for ServiceError {
    fn from(e: AdapterError) -> Self {
        match e {
            AdapterError::InvalidName(_) => Self::invalid(e.to_string()),
            AdapterError::NotFound { .. } | AdapterError::Refused { .. } => {
                Self::not_found("adapter_not_found", e.to_string())
            }
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
