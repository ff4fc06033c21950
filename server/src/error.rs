//! The HTTP layer's error: every failure becomes `{"error": ..., "error_type": ...}` with the
//! right status. The other layers' errors are mapped here and only here.

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use rl4pix_model::ModelError;
use serde::Serialize;
use utoipa::ToSchema;

use crate::backend::BackendError;
use crate::queue::{JobError, QueueError};

/// The body of every error answer.
#[derive(Debug, Serialize, ToSchema)]
#[schema(example = json!({"error": "steps must be between 1 and 100, got 500", "error_type": "invalid_parameter"}))]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// A stable machine-readable kind, e.g. `invalid_parameter`, `payload_too_large`,
    /// `unsupported_media_type`, `overloaded`, `timeout`, `not_found`.
    pub error_type: String,
}

#[derive(Debug, thiserror::Error)]
#[error("{status} {error_type}: {message}")]
pub struct ApiError {
    pub status: StatusCode,
    pub error_type: &'static str,
    pub message: String,
    pub retry_after_s: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, error_type: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            error_type,
            message: message.into(),
            retry_after_s: None,
        }
    }

    /// The request could not be parsed (broken JSON, multipart or base64).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    /// Parsed, but a value is missing or out of range.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameter",
            message,
        )
    }

    pub fn too_large(error_type: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::PAYLOAD_TOO_LARGE, error_type, message)
    }

    pub fn unsupported_media(message: impl Into<String>) -> Self {
        Self::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            message,
        )
    }

    pub fn not_found(error_type: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, error_type, message)
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn overloaded(message: impl Into<String>, retry_after_s: u64) -> Self {
        Self {
            retry_after_s: Some(retry_after_s),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "overloaded", message)
        }
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message)
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::new(StatusCode::GATEWAY_TIMEOUT, "timeout", message)
    }

    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            error_type: self.error_type.to_string(),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after_s {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> Self {
        match e {
            // Retry-After is filled in by the caller, which knows the recent batch times.
            QueueError::Full { .. } => Self::overloaded(e.to_string(), 1),
            QueueError::Closed => Self::unavailable(e.to_string()),
        }
    }
}

impl From<JobError> for ApiError {
    fn from(e: JobError) -> Self {
        match e {
            JobError::Cancelled => Self::unavailable("the edit was cancelled"),
            JobError::TimedOut => Self::timeout(
                "the edit did not finish within --request-timeout-s; its work was dropped",
            ),
            JobError::Backend(inner) => match inner.as_ref() {
                BackendError::Cancelled => Self::unavailable("the edit was cancelled"),
                BackendError::Model(model) => from_model_error(model),
            },
            JobError::WorkerGone(message) => Self::internal(message),
        }
    }
}

/// Errors the model reports about a request's content are the client's; the rest are ours.
pub fn from_model_error(e: &ModelError) -> ApiError {
    match e {
        ModelError::InvalidArgument(_) | ModelError::Image(_) | ModelError::Tokenizer(_) => {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_input",
                e.to_string(),
            )
        }
        ModelError::Adapter { .. } => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "adapter_refused",
            e.to_string(),
        ),
        ModelError::Cancelled => ApiError::unavailable("the edit was cancelled"),
        _ => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "model_error",
            e.to_string(),
        ),
    }
}
