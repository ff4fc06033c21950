//! The service layer, between the HTTP handlers and the machinery: the handlers parse and
//! check a request and call a `Service` method; the service talks to the queue, the async
//! jobs, the adapter registry and the attention cache, and answers with domain values or a
//! `crate::error::ServiceError` whose kind the HTTP layer turns into a status.
//!
//! `state` holds the service; each other file adds the methods of one concern: `edit`
//! (admission, the synchronous run, async submission and its supervisor), `jobs` (status,
//! progress, result, cancellation), `adapters` (the admin operations), `attention` (the kept
//! maps and their overlays) and `status` (readiness and what `/info` reports).

pub mod adapters;
pub mod attention;
pub mod edit;
pub mod jobs;
pub mod state;
pub mod status;

pub use state::{InputBounds, Service, ServiceParts};

use crate::error::ServiceError;

/// Runs blocking work (file IO, image work) off the async workers; a task that died is an
/// internal error naming `what`.
async fn blocking<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> Result<T, ServiceError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| ServiceError::internal(format!("{what} task failed: {e}")))?
}
