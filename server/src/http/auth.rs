//! Admin routes need `Authorization: Bearer <--api-key>`.

use axum::http::HeaderMap;
use subtle::ConstantTimeEq;

use crate::error::ServiceError;

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

#[cfg(test)]
mod tests {
    use axum::http::{header, HeaderMap, HeaderValue};

    use super::check_admin;

    fn bearer(token: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        let value = HeaderValue::from_str(&format!("Bearer {token}")).unwrap();
        headers.insert(header::AUTHORIZATION, value);
        headers
    }

    #[test]
    fn only_the_whole_key_opens_the_admin_routes() {
        let key = Some("s3cret-key");
        assert!(check_admin(key, &bearer("s3cret-key")).is_ok());
        for wrong in ["s3cret", "s3cret-key!", "s3cret-kez", ""] {
            let e = check_admin(key, &bearer(wrong)).unwrap_err();
            assert_eq!(e.message, "wrong api key", "{wrong:?}");
        }
        assert!(check_admin(key, &HeaderMap::new()).is_err(), "no header");
        assert!(
            check_admin(None, &bearer("anything")).is_err(),
            "no key configured"
        );
    }
}
