//! Who a request is charged to in the cost budget (`crate::budget::Client`).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap};
use subtle::ConstantTimeEq;

use super::state::AppState;
use crate::budget::Client;

/// The request's client: a configured key it sends as a bearer (any case of `Bearer`), else
/// its peer address. Keys the server does not know are ignored, so inventing keys earns no
/// extra share.
pub struct ClientOf(pub Client);

impl FromRequestParts<Arc<AppState>> for ClientOf {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|info| info.0.ip());
        Ok(Self(client_of(state, &parts.headers, peer)))
    }
}

pub fn client_of(state: &AppState, headers: &HeaderMap, peer: Option<std::net::IpAddr>) -> Client {
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.trim().split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    if let Some(given) = bearer {
        let known = [
            ("api-key", state.api_key.as_deref()),
            ("openai-api-key", state.openai_api_key.as_deref()),
        ];
        for (which, key) in known {
            if let Some(key) = key.filter(|k| !k.is_empty()) {
                if bool::from(given.as_bytes().ct_eq(key.as_bytes())) {
                    return Client::Key(which);
                }
            }
        }
    }
    peer.map_or(Client::Unknown, Client::Peer)
}
