//! Image bytes in and out: which formats are accepted, the checks that run before any pixel is
//! allocated or any compressed metadata inflated, decoding under memory limits (EXIF
//! orientation applied, transparency composited over white), and encoding the result.
//!
//! Every image a client sends goes through `inspect` then `decode`, nothing else.

use std::io::{Cursor, Read};

use image::{DynamicImage, ImageDecoder, ImageFormat, RgbImage};

use crate::error::ServiceError;

/// Inflated bytes all of a PNG's compressed metadata chunks (iCCP, zTXt, compressed iTXt) may
/// hold together. Real ICC profiles are a few KB to a few hundred; the PNG decoder inflates
/// iCCP whole before the first pixel, so without this bound a 400 KB file costs 400 MB.
pub const MAX_PNG_METADATA_BYTES: u64 = 4 << 20;
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

/// What the header of an accepted image says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageHeader {
    pub format: ImageFormat,
    pub width: u32,
    pub height: u32,
}

/// Sniffs the format, bounds a PNG's compressed metadata without keeping what it inflates, and
/// reads the header's dimensions under the decoder limits, so that a tiny file claiming a huge
/// canvas or hiding a decompression bomb is refused before anything large is allocated.
/// CPU-bound for a second at worst: call it off the async threads.
pub fn inspect(bytes: &[u8], max_pixels: u64) -> Result<ImageHeader, ServiceError> {
    if bytes.is_empty() {
        return Err(ServiceError::invalid_image("`image` is empty"));
    }
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
    if format == ImageFormat::Png {
        check_png_metadata(bytes, MAX_PNG_METADATA_BYTES)?;
    }
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decoder_limits(max_pixels));
    let (width, height) = reader
        .into_dimensions()
        .map_err(|e| header_error(e, max_pixels))?;
    let pixels = width as u64 * height as u64;
    if pixels == 0 {
        return Err(ServiceError::invalid_image("the image has no pixels"));
    }
    if pixels > max_pixels {
        return Err(too_many_pixels(width, height, max_pixels));
    }
    Ok(ImageHeader {
        format,
        width,
        height,
    })
}

fn too_many_pixels(width: u32, height: u32, max_pixels: u64) -> ServiceError {
    ServiceError::too_large(
        "image_too_large",
        format!(
            "the image is {width}x{height} = {} pixels; the limit is {max_pixels} (--max-pixels)",
            width as u64 * height as u64
        ),
    )
}

fn header_error(e: image::ImageError, max_pixels: u64) -> ServiceError {
    match e {
        image::ImageError::Limits(_) => ServiceError::too_large(
            "image_too_large",
            format!(
                "the image is larger than the decoder limits allow (--max-pixels {max_pixels})"
            ),
        ),
        other => ServiceError::invalid_image(format!("cannot read the image header: {other}")),
    }
}

/// No side longer than the most pixels an image may have, and no allocation beyond what the
/// largest accepted image needs at 16 bits per RGBA channel plus its metadata.
fn decoder_limits(max_pixels: u64) -> image::Limits {
    let side = u32::try_from(max_pixels).unwrap_or(u32::MAX);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(side);
    limits.max_image_height = Some(side);
    limits.max_alloc = Some(
        max_pixels
            .saturating_mul(8)
            .saturating_add(MAX_PNG_METADATA_BYTES)
            .max(1 << 20),
    );
    limits
}

/// Walks a PNG's chunks and inflates its compressed metadata (iCCP, zTXt, compressed iTXt)
/// into a small scratch buffer, counting bytes and keeping none, refusing the file once the
/// total passes `limit`. The png crate would inflate an iCCP profile whole (and silently drop
/// it past its limit, decoding on), so a bomb must be stopped here.
pub fn check_png_metadata(bytes: &[u8], limit: u64) -> Result<(), ServiceError> {
    const SIGNATURE: &[u8; 8] = b"\x89PNG\r\n\x1a\n";
    let corrupt = |what: &str| ServiceError::invalid_image(format!("corrupt PNG: {what}"));
    let mut rest = bytes
        .strip_prefix(SIGNATURE)
        .ok_or_else(|| corrupt("no PNG signature"))?;
    let mut inflated_total = 0u64;
    while !rest.is_empty() {
        if rest.len() < 12 {
            return Err(corrupt("a chunk is cut short"));
        }
        let length = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        let kind: [u8; 4] = [rest[4], rest[5], rest[6], rest[7]];
        let data = rest
            .get(8..8 + length)
            .ok_or_else(|| corrupt("a chunk runs past the end of the file"))?;
        rest = rest.get(12 + length..).unwrap_or(&[]);
        let compressed = match &kind {
            b"iCCP" | b"zTXt" => after_keyword(data).and_then(|d| d.get(1..)),
            // iTXt: keyword, compression flag, method, language, translated keyword, text.
            b"iTXt" => after_keyword(data).and_then(|d| match d {
                [1, _, tail @ ..] => after_keyword(tail).and_then(after_keyword),
                _ => None,
            }),
            b"IEND" => break,
            _ => None,
        };
        if let Some(stream) = compressed {
            let budget = limit.saturating_sub(inflated_total);
            inflated_total += inflated_size(stream, budget);
            if inflated_total > limit {
                return Err(ServiceError::too_large(
                    "image_too_large",
                    format!(
                        "the PNG's compressed metadata ({} chunk) inflates past {} MiB; such files are refused before decoding",
                        String::from_utf8_lossy(&kind),
                        limit >> 20
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The bytes after a NUL-terminated field.
fn after_keyword(data: &[u8]) -> Option<&[u8]> {
    let end = data.iter().position(|&b| b == 0)?;
    data.get(end + 1..)
}

/// How many bytes a zlib stream inflates to, counting at most `budget + 1` (a broken stream
/// counts what it gave before breaking; the decoder reports it).
fn inflated_size(stream: &[u8], budget: u64) -> u64 {
    let mut decoder = flate2::read::ZlibDecoder::new(stream).take(budget.saturating_add(1));
    std::io::copy(&mut decoder, &mut std::io::sink()).unwrap_or(0)
}

/// Decodes an image `inspect` accepted to RGB: the decoder under the same limits, the EXIF
/// orientation (JPEG, PNG eXIf, WebP) applied, the first frame of an animation, and any
/// transparency composited over white. CPU-bound: call it off the async threads.
pub fn decode(
    bytes: &[u8],
    header: ImageHeader,
    max_pixels: u64,
) -> Result<RgbImage, ServiceError> {
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), header.format);
    reader.limits(decoder_limits(max_pixels));
    let decode_error =
        |e: image::ImageError| ServiceError::invalid_image(format!("cannot decode the image: {e}"));
    let mut decoder = reader.into_decoder().map_err(decode_error)?;
    // A broken EXIF block leaves the image as stored rather than refusing it.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image = DynamicImage::from_decoder(decoder).map_err(decode_error)?;
    image.apply_orientation(orientation);
    Ok(over_white(image))
}

/// RGB with any alpha composited over white, computed at 16 bits so 16-bit inputs keep their
/// precision until the final rounding.
pub fn over_white(image: DynamicImage) -> RgbImage {
    if !image.color().has_alpha() {
        return image.to_rgb8();
    }
    let rgba = image.to_rgba16();
    let (width, height) = rgba.dimensions();
    RgbImage::from_fn(width, height, |x, y| {
        let [r, g, b, a] = rgba.get_pixel(x, y).0;
        let a = a as u64;
        let blend = |c: u16| {
            let c16 = (c as u64 * a + 65535 * (65535 - a) + 32767) / 65535;
            ((c16 * 255 + 32767) / 65535) as u8
        };
        image::Rgb([blend(r), blend(g), blend(b)])
    })
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
