//! The OpenAPI 3.1 document, generated from the handlers' annotations. `openapi/openapi.json`
//! is a committed copy; a test fails when it differs from this.

use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::http::{admin, attention, edit, jobs, meta, openai, ui};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "rl4pix",
        description = "Instruction-based image editing (InstructPix2Pix on Candle) with cross-attention maps.\n\nEvery error is JSON `{\"error\": ..., \"error_type\": ...}`.",
        license(name = "Apache-2.0")
    ),
    paths(
        edit::edit,
        jobs::status,
        jobs::events,
        jobs::result,
        jobs::cancel,
        attention::overlay,
        attention::tokens,
        meta::health,
        meta::ready,
        meta::info,
        meta::metrics,
        admin::list_adapters,
        admin::add_adapter,
        admin::delete_adapter,
        admin::set_default_adapter,
        meta::openapi_json,
        meta::docs,
        ui::page,
        openai::images_edits,
        openai::models,
    ),
    components(schemas(crate::http::error::ErrorBody)),
    modifiers(&BearerAuth),
    tags(
        (name = "edit", description = "Edit an image by instruction"),
        (name = "jobs", description = "Async edits (`Prefer: respond-async`): status, progress events, result, cancel"),
        (name = "attention", description = "Where the model looked"),
        (name = "service", description = "Health, readiness, info, metrics, docs"),
        (name = "openai", description = "OpenAI-compatible image edits, for the `openai` SDKs and tools built on them. Errors here are OpenAI's `{\"error\": {\"message\", \"type\", \"code\", \"param\"}}`. With `--openai-api-key` these routes need `Authorization: Bearer <it>`."),
        (name = "admin", description = "Adapters: list, add (upload or a file in the folder), delete, choose the default. Needs `Authorization: Bearer <--api-key>`; without --api-key these routes answer 401."),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
    }
}

/// The document as served and committed (pretty JSON, trailing newline).
pub fn json() -> String {
    let mut text = ApiDoc::openapi().to_pretty_json().unwrap_or_else(|e| {
        format!("{{\"error\": \"cannot serialize the OpenAPI document: {e}\"}}")
    });
    text.push('\n');
    text
}
