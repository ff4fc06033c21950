//! Request bodies and content negotiation shared by the routes: declared length, media type,
//! reading under a limit, JSON bodies, and whether the client wants JSON back.

use axum::body::{Body, Bytes};
use axum::http::{header, HeaderMap};

use crate::error::ServiceError;

pub fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The full `Content-Type` header ("" when absent or not text).
pub fn content_type(headers: &HeaderMap) -> &str {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
}

/// The media type alone, lower case: `multipart/form-data; boundary=x` -> `multipart/form-data`.
pub fn media_type(content_type: &str) -> String {
    content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

pub fn body_too_large(limit: usize) -> ServiceError {
    ServiceError::too_large(
        "payload_too_large",
        format!("the body is larger than {limit} bytes (--max-body-bytes)"),
    )
}

/// The whole body, refused past `limit` bytes.
pub async fn read_body(body: Body, limit: usize) -> Result<Bytes, ServiceError> {
    use http_body_util::BodyExt;
    match http_body_util::Limited::new(body, limit).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(body_too_large(limit)),
        Err(e) if super::guard::is_body_timeout(e.as_ref()) => Err(ServiceError::body_timeout()),
        Err(e) => Err(ServiceError::bad_request(format!(
            "cannot read the body: {e}"
        ))),
    }
}

/// Broken JSON is unreadable (400); JSON of the wrong shape is invalid (422).
pub fn parse_json<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ServiceError> {
    serde_json::from_slice(bytes).map_err(|e| {
        if e.classify() == serde_json::error::Category::Data {
            ServiceError::invalid(format!("JSON body: {e}"))
        } else {
            ServiceError::bad_request(format!("the body is not valid JSON: {e}"))
        }
    })
}

pub fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("application/json"))
}
