//! `POST /edit` bodies into an `EditSubmission`: multipart or JSON (base64 image) parsed into
//! one raw form, then every parameter checked against the limits before any decoding.

use axum::body::Bytes;
use base64::Engine;
use rl4pix_model::pipeline::EditParams;
use rl4pix_model::scheduler::SchedulerKind;

use super::body::parse_json;
use super::edit_dto::EditJsonRequest;
use crate::backend::BackendInfo;
use crate::codec::OutputFormat;
use crate::config::Limits;
use crate::edit::EditSubmission;
use crate::error::{clipped, ServiceError};
use crate::working_size::SizeMode;

/// Everything a request asked for, before any checking.
#[derive(Default)]
pub struct RawEdit {
    pub image: Option<Bytes>,
    pub instruction: Option<String>,
    pub steps: Option<usize>,
    pub guidance_scale: Option<f64>,
    pub image_guidance_scale: Option<f64>,
    pub seed: Option<u64>,
    pub scheduler: Option<String>,
    pub adapter: Option<String>,
    pub output_format: Option<String>,
    pub working_size: Option<String>,
    pub keep_input: Option<bool>,
}

pub fn parse_json_edit(bytes: &[u8]) -> Result<RawEdit, ServiceError> {
    let request: EditJsonRequest = parse_json(bytes)?;
    let encoded = match request.image.find(";base64,") {
        Some(i) if request.image.starts_with("data:") => &request.image[i + 8..],
        _ => request.image.as_str(),
    };
    let image = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .map_err(|e| ServiceError::bad_request(format!("`image` is not valid base64: {e}")))?;
    Ok(RawEdit {
        image: Some(Bytes::from(image)),
        instruction: Some(request.instruction),
        steps: request.steps,
        guidance_scale: request.guidance_scale,
        image_guidance_scale: request.image_guidance_scale,
        seed: request.seed,
        scheduler: request.scheduler,
        adapter: request.adapter,
        output_format: request.output_format,
        working_size: request.working_size,
        keep_input: request.keep_input,
    })
}

pub async fn parse_multipart_edit(
    content_type: &str,
    bytes: Bytes,
) -> Result<RawEdit, ServiceError> {
    // The body is already read under --max-body-bytes; multer parses it as it is (axum's
    // extractor would apply its own 2 MiB default to a request rebuilt here).
    let boundary = multer::parse_boundary(content_type)
        .map_err(|e| ServiceError::bad_request(format!("bad multipart request: {e}")))?;
    let body = futures_util::stream::once(async move { Ok::<Bytes, std::io::Error>(bytes) });
    let mut form = multer::Multipart::new(body, boundary);
    let mut raw = RawEdit::default();
    let bad = |e: multer::Error| ServiceError::bad_request(format!("bad multipart body: {e}"));
    while let Some(field) = form.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or("").to_string();
        if name == "image" {
            set_once(&mut raw.image, field.bytes().await.map_err(bad)?, &name)?;
            continue;
        }
        let text = utf8_text(field.bytes().await.map_err(bad)?, &name)?;
        match name.as_str() {
            "instruction" => set_once(&mut raw.instruction, text, &name)?,
            "steps" => set_once(&mut raw.steps, parse_number(&name, &text)?, &name)?,
            "guidance_scale" => {
                set_once(&mut raw.guidance_scale, parse_number(&name, &text)?, &name)?
            }
            "image_guidance_scale" => set_once(
                &mut raw.image_guidance_scale,
                parse_number(&name, &text)?,
                &name,
            )?,
            "seed" => set_once(&mut raw.seed, parse_number(&name, &text)?, &name)?,
            "scheduler" => set_once(&mut raw.scheduler, text, &name)?,
            "adapter" => set_once(&mut raw.adapter, text, &name)?,
            "output_format" => set_once(&mut raw.output_format, text, &name)?,
            "working_size" => set_once(&mut raw.working_size, text, &name)?,
            "keep_input" => set_once(&mut raw.keep_input, parse_bool(&name, &text)?, &name)?,
            other => {
                return Err(ServiceError::invalid(format!(
                    "unknown form field `{}`; expected image, instruction, steps, guidance_scale, image_guidance_scale, seed, scheduler, adapter, output_format, working_size, keep_input",
                    clipped(other)
                )))
            }
        }
    }
    Ok(raw)
}

/// A multipart text field's bytes, decoded strictly: `text()` (multer's and axum's) replaces
/// invalid UTF-8 with U+FFFD, which would turn a corrupt field into a different, accepted value.
pub(crate) fn utf8_text(bytes: Bytes, name: &str) -> Result<String, ServiceError> {
    String::from_utf8(bytes.into())
        .map_err(|_| ServiceError::invalid(format!("`{name}` is not valid UTF-8 text")))
}

fn set_once<T>(slot: &mut Option<T>, value: T, name: &str) -> Result<(), ServiceError> {
    if slot.is_some() {
        return Err(ServiceError::invalid(format!(
            "form field `{name}` given twice"
        )));
    }
    *slot = Some(value);
    Ok(())
}

fn parse_bool(name: &str, text: &str) -> Result<bool, ServiceError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        other => Err(ServiceError::invalid(format!(
            "`{name}` must be true or false, got {:?}",
            other.chars().take(32).collect::<String>()
        ))),
    }
}

fn parse_number<T: std::str::FromStr>(name: &str, text: &str) -> Result<T, ServiceError> {
    parse_integral(text.trim()).ok_or_else(|| {
        ServiceError::invalid(format!(
            "`{name}` must be a number, got {:?}",
            text.chars().take(32).collect::<String>()
        ))
    })
}

/// `text` as a `T`; for integer fields also a whole number written as a float (`2.0`, `1e3`),
/// which JSON Schema's `integer` admits and so the OpenAPI document does.
pub(crate) fn parse_integral<T: std::str::FromStr>(text: &str) -> Option<T> {
    text.parse().ok().or_else(|| {
        let value: f64 = text.parse().ok()?;
        let whole =
            value.is_finite() && value.fract() == 0.0 && value >= 0.0 && value < 2f64.powi(64);
        whole.then(|| (value as u64).to_string().parse().ok())?
    })
}

/// Every parameter check: present, in range, known names; defaults from the model and the
/// limits. The adapter name and the image are checked by the service.
pub fn validate(
    raw: RawEdit,
    limits: &Limits,
    model: &BackendInfo,
) -> Result<EditSubmission, ServiceError> {
    let image = raw
        .image
        .ok_or_else(|| ServiceError::invalid("missing `image` (a PNG, JPEG or WebP file)"))?;
    let instruction = raw
        .instruction
        .ok_or_else(|| ServiceError::invalid("missing `instruction`"))?;
    let chars = instruction.chars().count();
    // The same rule as the OpenAPI pattern (`INSTRUCTION_PATTERN`): at least one character
    // that is neither whitespace nor a control character. Plain `trim` let through text of
    // only \x1c-\x1f separators, which are control characters but not Unicode whitespace.
    if !instruction
        .chars()
        .any(|c| !c.is_whitespace() && !c.is_control())
    {
        return Err(ServiceError::invalid("`instruction` must not be empty"));
    }
    if chars > limits.max_instruction_chars {
        return Err(ServiceError::invalid(format!(
            "`instruction` has {chars} characters; the limit is {}",
            limits.max_instruction_chars
        )));
    }
    let steps = raw.steps.unwrap_or(limits.default_steps);
    if steps == 0 || steps > limits.max_steps {
        return Err(ServiceError::invalid(format!(
            "steps must be between 1 and {}, got {steps}",
            limits.max_steps
        )));
    }
    let guidance_scale = raw.guidance_scale.unwrap_or(model.default_guidance_scale);
    let image_guidance_scale = raw
        .image_guidance_scale
        .unwrap_or(model.default_image_guidance_scale);
    check_range("guidance_scale", guidance_scale, limits.max_guidance_scale)?;
    check_range(
        "image_guidance_scale",
        image_guidance_scale,
        limits.max_image_guidance_scale,
    )?;
    let scheduler = match raw.scheduler.as_deref() {
        None | Some("") | Some("default") => None,
        Some(name) => Some(SchedulerKind::from_cli_name(name).map_err(|unknown| {
            ServiceError::invalid(format!(
                "scheduler must be ddim or euler-ancestral, got {:?}",
                unknown.0
            ))
        })?),
    };
    let output_format = match raw.output_format.as_deref() {
        None | Some("") => OutputFormat::Png,
        Some(name) => OutputFormat::parse(name).ok_or_else(|| {
            ServiceError::invalid(format!(
                "output_format must be png, jpeg or webp, got {:?}",
                name.chars().take(32).collect::<String>()
            ))
        })?,
    };
    let working_size = match raw.working_size.as_deref() {
        None | Some("") => limits.working_size,
        Some(name) => SizeMode::parse(name).ok_or_else(|| {
            ServiceError::invalid(format!(
                "working_size must be model or input, got {:?}",
                name.chars().take(32).collect::<String>()
            ))
        })?,
    };
    Ok(EditSubmission {
        image,
        instruction,
        params: EditParams {
            steps,
            guidance_scale,
            image_guidance_scale,
            seed: raw.seed.unwrap_or_else(random_seed),
            scheduler,
            eta: 0.0,
            capture_attention: false,
        },
        adapter: raw.adapter,
        output_format,
        working_size,
        keep_input: raw.keep_input.unwrap_or(true),
    })
}

/// Seeds stay below 2^53 so that JSON clients read them back exactly.
fn random_seed() -> u64 {
    rand::random::<u64>() >> 11
}

fn check_range(name: &str, value: f64, max: f64) -> Result<(), ServiceError> {
    if !value.is_finite() || !(0.0..=max).contains(&value) {
        return Err(ServiceError::invalid(format!(
            "{name} must be between 0 and {max}, got {value}"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_fields_must_be_valid_utf8() {
        let ok = utf8_text(Bytes::from_static("ciel bleu".as_bytes()), "instruction");
        assert_eq!(ok.unwrap(), "ciel bleu");
        let corrupt = utf8_text(Bytes::from_static(b"\x0b\xd0\xf2 sky"), "instruction");
        assert!(corrupt.is_err());
    }
}
