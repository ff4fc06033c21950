//! Image bytes in and out: which formats are accepted, the header check that runs before any
//! pixel is allocated, decoding under a memory limit, and encoding the result.

use std::io::Cursor;

use image::{ImageFormat, RgbImage};

use crate::error::ServiceError;

/// The formats an edit can be answered in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    WebP,
}

impl OutputFormat {
    pub fn parse(s: &str) -> Option<Self> {
        match s.to_ascii_lowercase().as_str() {
            "png" => Some(Self::Png),
            "jpeg" | "jpg" => Some(Self::Jpeg),
            "webp" => Some(Self::WebP),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::Png => "png",
            Self::Jpeg => "jpeg",
            Self::WebP => "webp",
        }
    }

    pub fn mime(self) -> &'static str {
        match self {
            Self::Png => "image/png",
            Self::Jpeg => "image/jpeg",
            Self::WebP => "image/webp",
        }
    }
}

/// Sniffs the format and reads only the header's dimensions, so a tiny file that claims a
/// huge canvas is refused before any pixel is allocated.
pub fn check_declared_image(bytes: &[u8], max_pixels: u64) -> Result<ImageFormat, ServiceError> {
    let format = match image::guess_format(bytes) {
        Ok(f @ (ImageFormat::Png | ImageFormat::Jpeg | ImageFormat::WebP)) => f,
        Ok(other) => {
            return Err(ServiceError::unsupported_media(format!(
                "{other:?} images are not accepted: send PNG, JPEG or WebP"
            )))
        }
        Err(_) => {
            return Err(ServiceError::unsupported_media(
                "`image` is not a recognised image: send PNG, JPEG or WebP",
            ))
        }
    };
    let (width, height) = image::ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| ServiceError::invalid_image(format!("cannot read the image header: {e}")))?;
    let pixels = width as u64 * height as u64;
    if pixels == 0 {
        return Err(ServiceError::invalid_image("the image has no pixels"));
    }
    if pixels > max_pixels {
        return Err(ServiceError::too_large(
            "image_too_large",
            format!(
                "the image is {width}x{height} = {pixels} pixels; the limit is {max_pixels} (--max-pixels)"
            ),
        ));
    }
    Ok(format)
}

/// Decodes to RGB; the decoder may allocate no more than the largest accepted image needs.
pub fn decode(
    bytes: &[u8],
    format: ImageFormat,
    max_pixels: u64,
) -> Result<RgbImage, ServiceError> {
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    let mut decode_limits = image::Limits::default();
    // RGBA at 16 bits per channel is the most a decoder may need per pixel.
    decode_limits.max_alloc = Some(max_pixels.saturating_mul(8).max(1 << 20));
    reader.limits(decode_limits);
    reader
        .decode()
        .map(|img| img.to_rgb8())
        .map_err(|e| ServiceError::invalid_image(format!("cannot decode the image: {e}")))
}

/// JPEG at quality 90; PNG and WebP lossless.
pub fn encode(image: &RgbImage, format: OutputFormat) -> Result<Vec<u8>, ServiceError> {
    let mut out = Cursor::new(Vec::new());
    let result = match format {
        OutputFormat::Png => image.write_to(&mut out, ImageFormat::Png),
        OutputFormat::WebP => image.write_to(&mut out, ImageFormat::WebP),
        OutputFormat::Jpeg => {
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, 90).encode_image(image)
        }
    };
    result.map_err(|e| ServiceError::internal(format!("cannot encode the result: {e}")))?;
    Ok(out.into_inner())
}
