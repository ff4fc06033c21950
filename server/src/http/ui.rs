//! `GET /`: the editing page. Its HTML, script and style are compiled into the binary, so the
//! page works offline and with nothing but the server; it calls only the public API.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};

/// Same-origin only: the page loads nothing from elsewhere, and the policy makes sure of it.
const CONTENT_SECURITY_POLICY: &str = "default-src 'self'; img-src 'self' blob: data:; \
     object-src 'none'; base-uri 'none'; frame-ancestors 'none'";

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, HeaderValue::from_static(content_type)),
            (
                header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(CONTENT_SECURITY_POLICY),
            ),
            (header::CACHE_CONTROL, HeaderValue::from_static("no-cache")),
        ],
        body,
    )
        .into_response()
}

#[utoipa::path(get, path = "/", tag = "service",
    responses((status = 200, description = "The editing page: pick, drop or paste an image, give an instruction, follow the job's progress, compare before and after, and lay each word's attention over the input. Self-contained (no external assets); it uses only this API.", content_type = "text/html")))]
pub async fn page() -> Response {
    asset("text/html; charset=utf-8", include_str!("ui/index.html"))
}

pub async fn script() -> Response {
    asset("text/javascript; charset=utf-8", include_str!("ui/app.js"))
}

pub async fn style() -> Response {
    asset("text/css; charset=utf-8", include_str!("ui/style.css"))
}
