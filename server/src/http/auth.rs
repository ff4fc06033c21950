//! Admin routes need `Authorization: Bearer <--api-key>`.

use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::service::error::ServiceError;

/// Checks the bearer token against `expected` in constant time (the lengths may leak).
pub fn check_admin(expected: Option<&str>, headers: &HeaderMap) -> Result<(), ServiceError> {
    let Some(expected) = expected else {
        return Err(ServiceError::unauthorized(
            "admin routes are closed: start the server with --api-key (RL4PIX_API_KEY)",
        ));
    };
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or_else(|| ServiceError::unauthorized("missing `Authorization: Bearer <api key>`"))?;
    if !bool::from(given.as_bytes().ct_eq(expected.as_bytes())) {
        return Err(ServiceError::unauthorized("wrong api key"));
    }
    Ok(())
}
