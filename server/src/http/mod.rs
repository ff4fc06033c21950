//! The HTTP layer: routes parse and check requests, call the service, and turn its answers
//! and errors into responses (statuses are chosen in `error` only).
//!
//! `routes` builds the router; `state` is what handlers share; `edit`, `jobs`, `attention`,
//! `admin` and `meta` are the routes; `edit_dto` and `edit_parse` the wire forms and parsing of
//! `POST /edit`; `body` and `auth` what several routes need.

pub mod admin;
pub mod attention;
pub mod auth;
pub mod body;
pub mod client;
pub mod connections;
pub mod edit;
pub mod edit_dto;
pub mod edit_parse;
pub mod error;
pub mod guard;
pub mod hosts;
pub mod jobs;
pub mod meta;
pub mod openai;
pub mod routes;
pub mod state;
pub mod ui;

pub use routes::router;
pub use state::AppState;

/// Headers holding only `name: value`, for the guards' unit tests.
#[cfg(test)]
pub(crate) fn one_header(name: axum::http::HeaderName, value: &str) -> axum::http::HeaderMap {
    let mut headers = axum::http::HeaderMap::new();
    headers.insert(name, axum::http::HeaderValue::from_str(value).unwrap());
    headers
}
