//! Bearer tokens: admin routes need `Authorization: Bearer <--api-key>`; the `/v1` routes
//! `<--openai-api-key>` when it is set.

use axum::http::{header, HeaderMap};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::ServiceError;

/// Checks the bearer token against `expected` (see `keys_match`).
pub fn check_admin(expected: Option<&str>, headers: &HeaderMap) -> Result<(), ServiceError> {
    let Some(expected) = expected else {
        return Err(ServiceError::unauthorized(
            "admin routes are closed: start the server with --api-key (RL4PIX_API_KEY)",
        ));
    };
    let given = bearer_token(headers)
        .ok_or_else(|| ServiceError::unauthorized("missing `Authorization: Bearer <api key>`"))?;
    if !keys_match(given, expected) {
        return Err(ServiceError::unauthorized("wrong api key"));
    }
    Ok(())
}

/// The token of `Authorization: Bearer <token>`; the scheme's case does not matter (RFC 9110).
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim_start())
}

/// Compares SHA-256 digests in constant time: neither the key's bytes nor its length show in
/// how long a wrong guess takes (a plain comparison stops at the first difference, and a
/// constant-time one over the raw bytes still stops at a length mismatch).
pub fn keys_match(given: &str, expected: &str) -> bool {
    let given = Sha256::digest(given.as_bytes());
    let expected = Sha256::digest(expected.as_bytes());
    bool::from(given.as_slice().ct_eq(expected.as_slice()))
}

#[cfg(test)]
mod tests {
    use axum::http::{header, HeaderMap};

    use super::{bearer_token, check_admin};
    use crate::http::one_header;

    fn authorization(value: &str) -> HeaderMap {
        one_header(header::AUTHORIZATION, value)
    }

    fn bearer(token: &str) -> HeaderMap {
        authorization(&format!("Bearer {token}"))
    }

    #[test]
    fn only_the_whole_key_opens_the_admin_routes() {
        let key = Some("s3cret-key");
        assert!(check_admin(key, &bearer("s3cret-key")).is_ok());
        for wrong in ["s3cret", "s3cret-key!", "s3cret-kez", ""] {
            let e = check_admin(key, &bearer(wrong)).unwrap_err();
            assert!(e.message.contains("api key"), "{wrong:?}: {}", e.message);
        }
        assert!(check_admin(key, &HeaderMap::new()).is_err(), "no header");
        assert!(
            check_admin(None, &bearer("anything")).is_err(),
            "no key configured"
        );
    }

    #[test]
    fn the_scheme_is_matched_without_regard_to_case() {
        for value in ["bearer k", "BEARER k", "Bearer   k", "bEaReR k"] {
            assert_eq!(bearer_token(&authorization(value)), Some("k"), "{value}");
        }
        for value in ["Basic k", "Bearerk", "k"] {
            assert_eq!(bearer_token(&authorization(value)), None, "{value}");
        }
    }
}
