//! What every request passes through before and after its route: the Host check
//! ([`super::hosts`]), the body deadline, the headers every answer carries, and the request metrics with their fixed
//! label sets.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http_body::{Body as HttpBody, Frame, SizeHint};

use super::state::AppState;

/// A request body whose last byte has not arrived by the deadline.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within --body-timeout-s")]
pub struct BodyTimedOut;

/// The request body, failing with `BodyTimedOut` once its deadline passes.
struct TimedBody {
    inner: Body,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        if let Poll::Ready(frame) = Pin::new(&mut self.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        match self.deadline.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Some(Err(Box::new(BodyTimedOut)))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Whether reading a body failed because its deadline passed (anywhere in the error's chain).
pub fn is_body_timeout(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<BodyTimedOut>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// The route template a response answered (set by the router's route layer and the 405
/// fallback); requests without one are counted as `unmatched`.
#[derive(Debug, Clone)]
pub struct RouteLabel(pub String);

const UNMATCHED: &str = "unmatched";

/// The methods counted by name; every other is `other`, so clients cannot add series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        Method::PATCH => "PATCH",
        _ => "other",
    }
}

/// Routes whose answers hold a user's images or a job's result: never stored by caches.
fn is_private(route: &str) -> bool {
    route == "/edit"
        || route == "/v1/images/edits"
        || route.starts_with("/jobs/")
        || route.starts_with("/attention/")
}

/// The outermost layer: Host check, body deadline, common headers, metrics and the log line.
pub async fn frontline(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let started = Instant::now();
    let method = method_label(request.method());
    let mut response = match state.hosts.check(request.headers()) {
        Err(refused) => refused.into_response(),
        Ok(()) => {
            let deadline = Box::pin(tokio::time::sleep(state.body_timeout));
            let request = request.map(|inner| Body::new(TimedBody { inner, deadline }));
            next.run(request).await
        }
    };
    let route = response
        .extensions()
        .get::<RouteLabel>()
        .map_or(UNMATCHED.to_string(), |r| r.0.clone());
    let headers = response.headers_mut();
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if is_private(&route) {
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if response.status() == StatusCode::REQUEST_TIMEOUT {
        // The rest of the body was never read: the connection cannot carry another request.
        response
            .headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    record(&state, &route, method, response.status(), started);
    response
}

fn record(state: &AppState, route: &str, method: &str, status: StatusCode, started: Instant) {
    let elapsed = started.elapsed();
    let metrics = state.service.metrics();
    metrics
        .http_requests
        .with_label_values(&[route, method, status.as_str()])
        .inc();
    metrics
        .http_duration
        .with_label_values(&[route])
        .observe(elapsed.as_secs_f64());
    tracing::info!(
        method,
        route,
        status = status.as_u16(),
        ms = elapsed.as_millis() as u64,
        "request"
    );
}
