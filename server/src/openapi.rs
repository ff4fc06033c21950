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

/// The document as committed: for a server started with the default limits (pretty JSON,
/// trailing newline).
pub fn json() -> String {
    json_for(&DocumentLimits::defaults())
}

pub use exact::DocumentLimits;

/// The document for a server with these limits (as `/openapi.json` serves it).
pub fn json_for(limits: &DocumentLimits) -> String {
    let mut text = match serde_json::to_value(ApiDoc::openapi()) {
        Ok(mut doc) => {
            exact::tighten(&mut doc, limits);
            serde_json::to_string_pretty(&doc).unwrap_or_default()
        }
        Err(e) => format!("{{\"error\": \"cannot serialize the OpenAPI document: {e}\"}}"),
    };
    text.push('\n');
    text
}

/// What the annotations cannot say: the exact values each field takes (ranges at the default
/// limits, enums, name patterns), that a form field is never `null`, which images are
/// accepted, and the links from an edit to its job and attention maps. A client (or a fuzzer)
/// that keeps to the document is never refused for its input.
mod exact {
    use clap::CommandFactory;
    use serde_json::{json, Value};

    use crate::config::{
        Args, Limits, MAX_ADAPTER_NAME_CHARS, MAX_GUIDANCE_SCALE, MAX_IMAGE_GUIDANCE_SCALE,
    };
    use crate::http::openai::MAX_IMAGES;

    /// The limits the document states.
    pub struct DocumentLimits {
        pub max_steps: u64,
        pub max_instruction_chars: u64,
        pub max_pixels: u64,
    }

    impl DocumentLimits {
        pub fn defaults() -> Self {
            Self {
                max_steps: default_of("max_steps"),
                max_instruction_chars: default_of("max_instruction_chars"),
                max_pixels: default_of("max_pixels"),
            }
        }

        pub fn of(limits: &Limits) -> Self {
            Self {
                max_steps: limits.max_steps as u64,
                max_instruction_chars: limits.max_instruction_chars as u64,
                max_pixels: limits.max_pixels,
            }
        }
    }

    /// Images are PNG, JPEG or WebP; JSON Schema cannot say "a decodable image", so a format
    /// names it (clients generating data register it; `.ci/schemathesis-hooks.py` does).
    const IMAGE_FORMAT: &str = "image";
    const BASE64_IMAGE_FORMAT: &str = "base64-image";
    /// A job or edit id: 128 random bits in hex.
    const ID_PATTERN: &str = "^[0-9a-f]{32}$";

    /// A flag's default (the document describes a server started with the defaults; `/info`
    /// says what this one allows).
    fn default_of(flag: &str) -> u64 {
        Args::command()
            .get_arguments()
            .find(|a| a.get_id() == flag)
            .and_then(|a| a.get_default_values().first()?.to_str()?.parse().ok())
            .unwrap_or_else(|| panic!("--{flag} has a numeric default"))
    }

    /// What a request's `adapter` may say: a name, or `none` / `default`.
    fn adapter_name_pattern() -> String {
        format!(
            "^[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{}}}$",
            MAX_ADAPTER_NAME_CHARS - 1
        )
    }

    /// What an adapter may be called: not the two reserved words.
    fn stored_name_pattern() -> String {
        format!(
            "^(?!(none|default)$)[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{}}}$",
            MAX_ADAPTER_NAME_CHARS - 1
        )
    }

    /// At least one character that is neither whitespace nor a control character: what
    /// `edit_parse` accepts, stated so that Python's `re` (which counts \x1c-\x1f as
    /// whitespace) and ECMA-262 regexes agree with the server.
    const INSTRUCTION_PATTERN: &str = "[^\\s\\x00-\\x1f\\x7f-\\x9f]";

    pub fn tighten(doc: &mut Value, limits: &DocumentLimits) {
        let max_steps = limits.max_steps;
        let max_chars = limits.max_instruction_chars;
        let edit_fields = json!({
            "instruction": {"minLength": 1, "maxLength": max_chars, "pattern": INSTRUCTION_PATTERN},
            "steps": {"minimum": 1, "maximum": max_steps},
            "guidance_scale": {"minimum": 0, "maximum": MAX_GUIDANCE_SCALE},
            "image_guidance_scale": {"minimum": 0, "maximum": MAX_IMAGE_GUIDANCE_SCALE},
            "seed": {"minimum": 0, "maximum": u64::MAX, "format": null},
            "scheduler": {"enum": ["ddim", "euler-ancestral", "default", ""]},
            "output_format": {"enum": ["png", "jpeg", "jpg", "webp", ""]},
            "working_size": {"enum": ["model", "input", ""]},
            // A request may also say "none" (the base), "default" or "" (the default adapter).
            "adapter": {"pattern": format!("{}|^$", adapter_name_pattern()), "maxLength": MAX_ADAPTER_NAME_CHARS},
        });
        let edit = &mut doc["paths"]["/edit"]["post"];
        let json_body = "#/components/schemas/EditJsonRequest";
        assert_eq!(
            edit["requestBody"]["content"]["application/json"]["schema"]["$ref"],
            json_body
        );
        let schema = &mut doc["components"]["schemas"]["EditJsonRequest"];
        constrain(schema, &edit_fields);
        constrain(
            schema,
            &json!({"image": {"format": BASE64_IMAGE_FORMAT, "contentEncoding": "base64", "contentMediaType": "image/*"}}),
        );
        let edit = &mut doc["paths"]["/edit"]["post"];
        let form = &mut edit["requestBody"]["content"]["multipart/form-data"]["schema"];
        constrain(form, &edit_fields);
        form_fields(form);
        // Links: an async edit's job, and the attention maps of any edit.
        edit["responses"]["202"]["links"] = json!({
            "GetJob": {"operationId": "job_status", "parameters": {"id": "$response.body#/id"}},
            "GetJobResult": {"operationId": "job_result", "parameters": {"id": "$response.body#/id"}},
            "GetJobEvents": {"operationId": "job_events", "parameters": {"id": "$response.body#/id"}},
            "CancelJob": {"operationId": "cancel_job", "parameters": {"id": "$response.body#/id"}},
        });
        edit["responses"]["200"]["links"] = json!({
            "GetAttention": {"operationId": "overlay", "parameters": {"edit_id": "$response.header.x-edit-id"}},
            "GetAttentionTokens": {"operationId": "tokens", "parameters": {"edit_id": "$response.header.x-edit-id"}},
        });

        // Server-sent events: before OpenAPI 3.2's `itemSchema`, `schema` describes one event,
        // as `{event, data}`; our data is the job's status as JSON text.
        let events = &mut doc["paths"]["/jobs/{id}/events"]["get"]["responses"]["200"]["content"]
            ["text/event-stream"];
        assert!(events.is_object(), "the job events stream");
        events["schema"] = json!({
            "type": "object",
            "required": ["event", "data"],
            "properties": {
                "event": {"type": "string", "enum": ["queued", "running", "done", "failed", "cancelled"]},
                "data": {
                    "type": "string",
                    "contentMediaType": "application/json",
                    "contentSchema": {"$ref": "#/components/schemas/JobStatus"},
                },
            },
        });

        for (path, name) in [
            ("/jobs/{id}", "id"),
            ("/jobs/{id}/events", "id"),
            ("/jobs/{id}/result", "id"),
            ("/attention/{edit_id}", "edit_id"),
            ("/attention/{edit_id}/tokens", "edit_id"),
        ] {
            for operation in doc["paths"][path]
                .as_object_mut()
                .into_iter()
                .flat_map(|o| o.values_mut())
            {
                path_parameter(
                    operation,
                    name,
                    json!({"type": "string", "pattern": ID_PATTERN}),
                );
            }
        }
        let name_schema = json!({"type": "string", "pattern": stored_name_pattern(), "maxLength": MAX_ADAPTER_NAME_CHARS});
        for operation in doc["paths"]["/attention/{edit_id}"]
            .as_object_mut()
            .into_iter()
            .flat_map(|o| o.values_mut())
        {
            for parameter in operation["parameters"].as_array_mut().into_iter().flatten() {
                if parameter["name"] == "opacity" {
                    parameter["schema"] = json!({"type": "number", "minimum": 0, "maximum": 1});
                }
            }
        }
        let default_name =
            &mut doc["components"]["schemas"]["DefaultAdapter"]["properties"]["name"];
        assert!(default_name.is_object(), "DefaultAdapter.name");
        default_name["pattern"] = json!(stored_name_pattern());
        default_name["maxLength"] = json!(MAX_ADAPTER_NAME_CHARS);
        let add_name = &mut doc["components"]["schemas"]["AddAdapterRequest"]["properties"]["name"];
        assert!(add_name.is_object(), "AddAdapterRequest.name");
        add_name["pattern"] = json!(stored_name_pattern());
        add_name["maxLength"] = json!(MAX_ADAPTER_NAME_CHARS);
        path_parameter(
            &mut doc["paths"]["/adapters/{name}"]["delete"],
            "name",
            name_schema.clone(),
        );

        // The OpenAI route: its own names for two fields, and `n`, `size`, `response_format`.
        let openai = &mut doc["paths"]["/v1/images/edits"]["post"]["requestBody"]["content"]
            ["multipart/form-data"]["schema"];
        let mut fields = edit_fields.clone();
        let fields = fields.as_object_mut().expect("an object");
        fields.remove("adapter");
        let instruction = fields.remove("instruction").expect("instruction");
        fields.insert("prompt".into(), instruction);
        // Sides up to the largest square within --max-pixels.
        let side_digits = (limits.max_pixels as f64)
            .sqrt()
            .floor()
            .max(1.0)
            .log10()
            .floor() as u32;
        let size_pattern = format!(
            "^(auto|[1-9][0-9]{{0,{d}}}x[1-9][0-9]{{0,{d}}})?$",
            d = side_digits.saturating_sub(1)
        );
        fields.insert("n".into(), json!({"minimum": 1, "maximum": MAX_IMAGES}));
        fields.insert("size".into(), json!({"pattern": size_pattern}));
        fields.insert("response_format".into(), json!({"enum": ["b64_json", ""]}));
        constrain(openai, &Value::Object(fields.clone()));
        form_fields(openai);
    }

    /// Adds `extra`'s keywords to the named properties of an object schema (`null` removes one).
    fn constrain(schema: &mut Value, extra: &Value) {
        for (field, keywords) in extra.as_object().into_iter().flatten() {
            let property = &mut schema["properties"][field];
            assert!(property.is_object(), "no property `{field}` to constrain");
            for (keyword, value) in keywords.as_object().into_iter().flatten() {
                match value {
                    Value::Null => {
                        property.as_object_mut().map(|p| p.remove(keyword));
                    }
                    _ => property[keyword] = value.clone(),
                }
            }
        }
    }

    /// A form field is text or a file: absent is how a form says "the default", never `null`;
    /// the file part is an image.
    fn form_fields(form: &mut Value) {
        // The server refuses fields it does not know.
        form["additionalProperties"] = json!(false);
        for (name, property) in form["properties"].as_object_mut().into_iter().flatten() {
            if let Some(types) = property["type"].as_array() {
                let kept: Vec<Value> = types.iter().filter(|t| *t != "null").cloned().collect();
                property["type"] = if kept.len() == 1 {
                    kept[0].clone()
                } else {
                    Value::Array(kept)
                };
            }
            if name == "image" {
                property["format"] = json!(IMAGE_FORMAT);
                property["contentMediaType"] = json!("image/*");
            }
        }
    }

    fn path_parameter(operation: &mut Value, name: &str, schema: Value) {
        let parameter = operation["parameters"].as_array_mut().and_then(|ps| {
            ps.iter_mut()
                .find(|p| p["name"] == name && p["in"] == "path")
        });
        match parameter {
            Some(p) => p["schema"] = schema,
            None => panic!("no path parameter `{name}`"),
        }
    }
}
