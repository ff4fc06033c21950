//! What the server does with the bytes of an uploaded image, and what a request may cost, over
//! real HTTP with the fixture model: compressed-metadata bombs refused before inflation, EXIF
//! orientation, transparency, 16-bit, grey, CMYK and animated inputs, the VAE-grid rounding
//! checked against `--max-pixels`, the cost budget (per edit, per queue, per client), and the
//! byte bounds of the job store and the attention cache.
//!
//! What the server decoded is read back exactly from `/attention/{edit_id}?opacity=0`: the
//! overlay at opacity 0 is the decoded input itself.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use image::codecs::jpeg::JpegEncoder;
use image::codecs::png::PngEncoder;
use image::codecs::webp::WebPEncoder;
use image::{ExtendedColorType, ImageEncoder, Rgb, RgbImage, Rgba, RgbaImage};
use serde_json::Value;

// --- inputs ---------------------------------------------------------------------------------

/// Four flat quadrants (red, green / blue, yellow), so any rotation or flip is visible.
fn quadrants(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        match (x < width / 2, y < height / 2) {
            (true, true) => Rgb([220, 30, 30]),
            (false, true) => Rgb([30, 200, 30]),
            (true, false) => Rgb([30, 30, 220]),
            (false, false) => Rgb([230, 220, 30]),
        }
    })
}

/// A big-endian TIFF block holding only an orientation tag (what EXIF carries).
fn exif_orientation(value: u16) -> Vec<u8> {
    let mut tiff = b"MM\0\x2a\0\0\0\x08".to_vec();
    tiff.extend_from_slice(&1u16.to_be_bytes());
    tiff.extend_from_slice(&0x0112u16.to_be_bytes());
    tiff.extend_from_slice(&3u16.to_be_bytes());
    tiff.extend_from_slice(&1u32.to_be_bytes());
    tiff.extend_from_slice(&value.to_be_bytes());
    tiff.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    tiff
}

fn encode_with(
    encoder: impl ImageEncoder,
    exif: Option<Vec<u8>>,
    pixels: &[u8],
    (width, height): (u32, u32),
    color: ExtendedColorType,
) {
    let mut encoder = encoder;
    if let Some(exif) = exif {
        encoder.set_exif_metadata(exif).unwrap();
    }
    encoder.write_image(pixels, width, height, color).unwrap();
}

fn jpeg_of(image: &RgbImage, exif: Option<Vec<u8>>) -> Vec<u8> {
    let mut out = Vec::new();
    let encoder = JpegEncoder::new_with_quality(&mut out, 95);
    encode_with(
        encoder,
        exif,
        image.as_raw(),
        image.dimensions(),
        ExtendedColorType::Rgb8,
    );
    out
}

/// The lossless formats a test input is written in.
#[derive(Clone, Copy)]
enum Lossless {
    Png,
    WebP,
}

/// `pixels` in `format`, carrying `exif` when given.
fn lossless(
    format: Lossless,
    pixels: &[u8],
    dims: (u32, u32),
    color: ExtendedColorType,
    exif: Option<Vec<u8>>,
) -> Vec<u8> {
    let mut out = Vec::new();
    match format {
        Lossless::Png => encode_with(PngEncoder::new(&mut out), exif, pixels, dims, color),
        Lossless::WebP => encode_with(
            WebPEncoder::new_lossless(&mut out),
            exif,
            pixels,
            dims,
            color,
        ),
    }
    out
}

fn png_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
    let mut out = (data.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let mut crc = crc32fast::Hasher::new();
    crc.update(kind);
    crc.update(data);
    out.extend_from_slice(&crc.finalize().to_be_bytes());
    out
}

/// `png` with `chunk` inserted right after IHDR (where iCCP must be).
fn with_chunk_after_header(png: &[u8], chunk: &[u8]) -> Vec<u8> {
    let ihdr_end = 8 + 8 + 13 + 4;
    let mut out = png[..ihdr_end].to_vec();
    out.extend_from_slice(chunk);
    out.extend_from_slice(&png[ihdr_end..]);
    out
}

/// zlib of `zeros` zero bytes, written in slices so the test never holds them.
fn zlib_of_zeros(zeros: usize) -> Vec<u8> {
    let mut encoder = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let slice = vec![0u8; 1 << 20];
    let mut left = zeros;
    while left > 0 {
        let n = left.min(slice.len());
        encoder.write_all(&slice[..n]).unwrap();
        left -= n;
    }
    encoder.finish().unwrap()
}

/// The compressed-metadata chunks whose inflated size the server bounds, each hiding
/// `inflated` bytes.
fn metadata_bombs(inflated: usize) -> Vec<(&'static str, Vec<u8>)> {
    let stream = zlib_of_zeros(inflated);
    let base = png(&scene(32, 32, 1));
    let mut iccp = b"bomb\0\0".to_vec();
    iccp.extend_from_slice(&stream);
    let mut ztxt = b"Comment\0\0".to_vec();
    ztxt.extend_from_slice(&stream);
    let mut itxt = b"Comment\0\x01\0en\0\0".to_vec();
    itxt.extend_from_slice(&stream);
    vec![
        (
            "iCCP",
            with_chunk_after_header(&base, &png_chunk(b"iCCP", &iccp)),
        ),
        (
            "zTXt",
            with_chunk_after_header(&base, &png_chunk(b"zTXt", &ztxt)),
        ),
        (
            "iTXt",
            with_chunk_after_header(&base, &png_chunk(b"iTXt", &itxt)),
        ),
    ]
}

/// A two-frame APNG: the default image (also the first frame) `first`, then `second`.
fn apng(first: &RgbImage, second: &RgbImage) -> Vec<u8> {
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, first.width(), first.height());
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_animated(2, 0).unwrap();
        let mut writer = encoder.write_header().unwrap();
        writer.write_image_data(first.as_raw()).unwrap();
        writer.write_image_data(second.as_raw()).unwrap();
        writer.finish().unwrap();
    }
    out
}

/// A two-frame animated WebP assembled from lossless stills (the image crate writes no
/// animations): RIFF, VP8X with the animation flag, ANIM, then one ANMF per frame.
fn animated_webp(first: &RgbImage, second: &RgbImage) -> Vec<u8> {
    fn riff_chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = kind.to_vec();
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
        if data.len() % 2 == 1 {
            out.push(0);
        }
        out
    }
    fn u24(v: u32) -> [u8; 3] {
        let b = v.to_le_bytes();
        [b[0], b[1], b[2]]
    }
    let (w, h) = first.dimensions();
    let mut body = b"WEBP".to_vec();
    let mut vp8x = vec![0x02, 0, 0, 0];
    vp8x.extend_from_slice(&u24(w - 1));
    vp8x.extend_from_slice(&u24(h - 1));
    body.extend(riff_chunk(b"VP8X", &vp8x));
    body.extend(riff_chunk(b"ANIM", &[255, 255, 255, 255, 0, 0]));
    for frame in [first, second] {
        let still = lossless(
            Lossless::WebP,
            frame.as_raw(),
            (w, h),
            ExtendedColorType::Rgb8,
            None,
        );
        // The still is RIFF(12 bytes) + its VP8L chunk.
        let vp8l = &still[12..];
        let mut anmf = Vec::new();
        anmf.extend_from_slice(&u24(0));
        anmf.extend_from_slice(&u24(0));
        anmf.extend_from_slice(&u24(w - 1));
        anmf.extend_from_slice(&u24(h - 1));
        anmf.extend_from_slice(&u24(100));
        anmf.push(0);
        anmf.extend_from_slice(vp8l);
        body.extend(riff_chunk(b"ANMF", &anmf));
    }
    let mut out = b"RIFF".to_vec();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend(body);
    out
}

/// A baseline 16x16 JPEG with four components and Adobe's "no transform" marker: CMYK, every
/// sample 128. Its Huffman tables hold one code each (DC difference 0, end of block), so every
/// block is two bits.
fn cmyk_jpeg() -> Vec<u8> {
    let mut out = vec![0xFF, 0xD8];
    let segment = |out: &mut Vec<u8>, marker: u8, data: &[u8]| {
        out.extend_from_slice(&[0xFF, marker]);
        out.extend_from_slice(&((data.len() + 2) as u16).to_be_bytes());
        out.extend_from_slice(data);
    };
    // APP14 Adobe, version 100, flags 0, 0, transform 0 (CMYK as stored).
    segment(&mut out, 0xEE, b"Adobe\0\x64\0\0\0\0\0");
    let mut dqt = vec![0u8];
    dqt.extend_from_slice(&[1u8; 64]);
    segment(&mut out, 0xDB, &dqt);
    // SOF0: 8 bits, 16x16, four components, 1x1 sampling, table 0.
    let mut sof = vec![8, 0, 16, 0, 16, 4];
    for id in 1..=4u8 {
        sof.extend_from_slice(&[id, 0x11, 0]);
    }
    segment(&mut out, 0xC0, &sof);
    // DHT: DC table 0 and AC table 0, one code of length 1 each (symbol 0).
    for class in [0x00u8, 0x10] {
        let mut dht = vec![class, 1];
        dht.extend_from_slice(&[0u8; 15]);
        dht.push(0);
        segment(&mut out, 0xC4, &dht);
    }
    let mut sos = vec![4];
    for id in 1..=4u8 {
        sos.extend_from_slice(&[id, 0x00]);
    }
    sos.extend_from_slice(&[0, 63, 0]);
    segment(&mut out, 0xDA, &sos);
    // 4 MCUs x 4 blocks x 2 zero bits = 32 bits.
    out.extend_from_slice(&[0, 0, 0, 0]);
    out.extend_from_slice(&[0xFF, 0xD9]);
    out
}

// --- HTTP helpers ---------------------------------------------------------------------------

fn raw_form(bytes: Vec<u8>, fields: &[(&str, String)]) -> reqwest::multipart::Form {
    let mut form = image_form(
        bytes,
        ("in", "application/octet-stream"),
        "make the red square blue",
    )
    .text("seed", "7");
    if !fields.iter().any(|(name, _)| *name == "steps") {
        form = form.text("steps", "1");
    }
    with_fields(form, fields)
}

/// Edits `bytes` and returns the image the server decoded them to.
async fn decoded_by_server(
    http: &reqwest::Client,
    url: &str,
    bytes: Vec<u8>,
    what: &str,
) -> RgbImage {
    let r = post_edit(http, url, raw_form(bytes, &[])).await;
    let status = r.status();
    let edit_id = r
        .headers()
        .get("x-edit-id")
        .map(|v| v.to_str().unwrap().to_string());
    assert_eq!(status, 200, "{what}: {:?}", r.text().await);
    let edit_id = edit_id.unwrap();
    let r = get(http, &format!("{url}/attention/{edit_id}?opacity=0")).await;
    assert_eq!(r.status(), 200, "{what}");
    decode_png(&r.bytes().await.unwrap())
}

fn close(a: &Rgb<u8>, b: &Rgb<u8>, tolerance: u8) -> bool {
    (0..3).all(|c| a[c].abs_diff(b[c]) <= tolerance)
}

/// The colour at the centre of each quadrant, clockwise from the top left.
fn quadrant_colours(image: &RgbImage) -> [Rgb<u8>; 4] {
    let (w, h) = image.dimensions();
    [
        *image.get_pixel(w / 4, h / 4),
        *image.get_pixel(3 * w / 4, h / 4),
        *image.get_pixel(3 * w / 4, 3 * h / 4),
        *image.get_pixel(w / 4, 3 * h / 4),
    ]
}

// --- tests ----------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn png_metadata_bombs_are_refused_before_they_inflate() {
    let TestServer { server, url, http } = TestServer::start(|_| {}).await;
    // The bomb: 32x32 pixels, an iCCP chunk that inflates to 400 MiB.
    for (chunk, bomb) in metadata_bombs(400 << 20) {
        assert!(bomb.len() < 600 << 10, "{chunk}: {} bytes", bomb.len());
        let started = Instant::now();
        let r = post_edit(&http, &url, raw_form(bomb, &[])).await;
        let r_status = r.status();
        let body: Value = r.json().await.unwrap();
        assert_eq!(r_status, 413, "{chunk}: {body}");
        assert_eq!(body["error_type"], "image_too_large", "{chunk}");
        let message = body["error"].as_str().unwrap();
        assert!(message.contains(chunk), "{message}");
        // Generous: refusing costs a few MiB of inflation, not 400.
        assert!(started.elapsed() < Duration::from_secs(10), "{chunk}");
    }
    // Real metadata of ordinary size still passes: a 64 KiB profile, a compressed comment.
    let base = png(&scene(32, 32, 2));
    let mut profile = b"sRGB-ish\0\0".to_vec();
    profile.extend_from_slice(&zlib_of_zeros(64 << 10));
    let with_profile = with_chunk_after_header(&base, &png_chunk(b"iCCP", &profile));
    let decoded = decoded_by_server(&http, &url, with_profile, "PNG with a profile").await;
    assert_eq!(decoded, scene(32, 32, 2));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exif_orientation_is_applied_for_jpeg_png_and_webp() {
    let TestServer { server, url, http } = TestServer::start(|_| {}).await;
    let stored = quadrants(40, 24);
    // Orientation 6: the stored picture is shown turned 90° clockwise.
    let shown = image::imageops::rotate90(&stored);
    let exif = || Some(exif_orientation(6));
    let dims = stored.dimensions();
    let inputs = [
        ("JPEG", jpeg_of(&stored, exif())),
        (
            "PNG eXIf",
            lossless(
                Lossless::Png,
                stored.as_raw(),
                dims,
                ExtendedColorType::Rgb8,
                exif(),
            ),
        ),
        (
            "WebP EXIF",
            lossless(
                Lossless::WebP,
                stored.as_raw(),
                dims,
                ExtendedColorType::Rgb8,
                exif(),
            ),
        ),
    ];
    for (what, bytes) in inputs {
        let decoded = decoded_by_server(&http, &url, bytes, what).await;
        assert_eq!(decoded.dimensions(), (24, 40), "{what}: turned upright");
        let (got, want) = (quadrant_colours(&decoded), quadrant_colours(&shown));
        for (g, w) in got.iter().zip(&want) {
            assert!(close(g, w, 12), "{what}: {got:?} vs {want:?}");
        }
    }
    // Without the tag nothing turns.
    let plain = decoded_by_server(&http, &url, jpeg_of(&stored, None), "plain JPEG").await;
    assert_eq!(plain.dimensions(), (40, 24));
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transparency_is_composited_over_white_at_every_depth() {
    let TestServer { server, url, http } = TestServer::start(|_| {}).await;
    let (w, h) = (32u32, 16u32);
    // Left half transparent black, right half half-transparent blue.
    let rgba = RgbaImage::from_fn(w, h, |x, _| {
        if x < w / 2 {
            Rgba([0, 0, 0, 0])
        } else {
            Rgba([0, 0, 255, 128])
        }
    });
    let rgba16: Vec<u8> = rgba
        .pixels()
        .flat_map(|p| p.0.map(|c| c as u16 * 257))
        .flat_map(u16::to_ne_bytes)
        .collect();
    // Grey + alpha: transparent on the left, opaque mid-grey on the right.
    let gray_alpha: Vec<u8> = (0..w * h)
        .flat_map(|i| if i % w < w / 2 { [0u8, 0] } else { [100, 255] })
        .collect();
    let encode = |format, pixels: &[u8], color| lossless(format, pixels, (w, h), color, None);
    let inputs = [
        (
            "RGBA PNG",
            encode(Lossless::Png, rgba.as_raw(), ExtendedColorType::Rgba8),
            Rgb([0, 0, 255]),
            Rgb([127, 127, 255]),
        ),
        (
            "16-bit RGBA PNG",
            encode(Lossless::Png, &rgba16, ExtendedColorType::Rgba16),
            Rgb([0, 0, 255]),
            Rgb([127, 127, 255]),
        ),
        (
            "RGBA WebP",
            encode(Lossless::WebP, rgba.as_raw(), ExtendedColorType::Rgba8),
            Rgb([0, 0, 255]),
            Rgb([127, 127, 255]),
        ),
        (
            "grey+alpha PNG",
            encode(Lossless::Png, &gray_alpha, ExtendedColorType::La8),
            Rgb([100, 100, 100]),
            Rgb([100, 100, 100]),
        ),
    ];
    for (what, bytes, _, right) in inputs {
        let decoded = decoded_by_server(&http, &url, bytes, what).await;
        let left = decoded.get_pixel(3, 8);
        assert_eq!(left, &Rgb([255, 255, 255]), "{what}: transparent is white");
        let got = decoded.get_pixel(w - 3, 8);
        assert!(close(got, &right, 1), "{what}: {got:?} vs {right:?}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sixteen_bit_grey_jpeg_and_cmyk_inputs_decode() {
    let TestServer { server, url, http } = TestServer::start(|_| {}).await;
    let picture = quadrants(32, 16);
    let rgb16: Vec<u8> = picture
        .as_raw()
        .iter()
        .flat_map(|&c| (c as u16 * 257).saturating_sub(60).to_ne_bytes())
        .collect();
    let decoded = decoded_by_server(
        &http,
        &url,
        lossless(
            Lossless::Png,
            &rgb16,
            (32, 16),
            ExtendedColorType::Rgb16,
            None,
        ),
        "16-bit PNG",
    )
    .await;
    assert_eq!(decoded, picture, "16-bit rounds to the nearest 8-bit value");

    let grey = image::GrayImage::from_fn(32, 16, |x, _| image::Luma([(x * 8) as u8]));
    let decoded = decoded_by_server(
        &http,
        &url,
        lossless(
            Lossless::Png,
            grey.as_raw(),
            (32, 16),
            ExtendedColorType::L8,
            None,
        ),
        "grey PNG",
    )
    .await;
    assert_eq!(decoded.get_pixel(10, 3), &Rgb([80, 80, 80]));

    let decoded = decoded_by_server(&http, &url, jpeg_of(&picture, None), "JPEG").await;
    let (got, want) = (quadrant_colours(&decoded), quadrant_colours(&picture));
    for (g, w) in got.iter().zip(&want) {
        assert!(close(g, w, 12), "JPEG: {got:?} vs {want:?}");
    }

    // CMYK (every sample 128, no transform): the decoder converts it to RGB by the ink model;
    // a flat input stays one flat colour.
    let r = post_edit(&http, &url, raw_form(cmyk_jpeg(), &[])).await;
    assert_eq!(r.status(), 200, "CMYK JPEG");
    let id = r.headers()["x-edit-id"].to_str().unwrap().to_string();
    let overlay = get(&http, &format!("{url}/attention/{id}?opacity=0"))
        .await
        .bytes()
        .await
        .unwrap();
    let decoded = decode_png(&overlay);
    assert_eq!(decoded.dimensions(), (16, 16));
    let first = *decoded.get_pixel(0, 0);
    assert!(
        decoded.pixels().all(|p| p == &first),
        "flat CMYK stays flat"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn animations_are_edited_from_their_first_frame() {
    let TestServer { server, url, http } = TestServer::start(|_| {}).await;
    let first = quadrants(32, 16);
    let second = RgbImage::from_pixel(32, 16, Rgb([10, 10, 10]));
    for (what, bytes) in [
        ("APNG", apng(&first, &second)),
        ("animated WebP", animated_webp(&first, &second)),
    ] {
        let decoded = decoded_by_server(&http, &url, bytes, what).await;
        assert_eq!(decoded.dimensions(), first.dimensions());
        // The WebP decoder composites frames on its canvas, a level off here and there.
        let off = decoded
            .pixels()
            .zip(first.pixels())
            .find(|(got, want)| !close(got, want, 2));
        assert!(off.is_none(), "{what}: the first frame, not {off:?}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rounded_working_area_is_checked_against_max_pixels() {
    let TestServer { server, url, http } = TestServer::start(|args| args.max_pixels = 4096).await;
    // 1x4096 has 4096 pixels, but the model's 2-pixel grid runs it at 2x4096.
    let thin = png(&RgbImage::from_pixel(1, 4096, Rgb([90, 90, 90])));
    let r = post_edit(
        &http,
        &url,
        raw_form(thin, &[("working_size", "input".into())]),
    )
    .await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error_type"], "image_too_large", "{body}");
    assert!(body["error"].as_str().unwrap().contains("2x4096"), "{body}");
    // A picture on the grid at the limit passes.
    let square = png(&scene(64, 64, 3));
    let r = post_edit(&http, &url, raw_form(square, &[])).await;
    assert_eq!(r.status(), 200);
    server.shutdown().await.unwrap();
}

async fn submit_async(
    http: &reqwest::Client,
    url: &str,
    bearer: Option<&str>,
    dims: (u32, u32),
    steps: usize,
) -> reqwest::Response {
    let mut request = http
        .post(format!("{url}/edit"))
        .header("prefer", "respond-async")
        .multipart(raw_form(
            png(&scene(dims.0, dims.1, steps as u32)),
            &[("steps", steps.to_string())],
        ));
    if let Some(key) = bearer {
        request = request.bearer_auth(key);
    }
    request.send().await.unwrap()
}

async fn job_id(r: reqwest::Response) -> String {
    assert_eq!(r.status(), 202, "{:?}", r.text().await);
    let body: Value = r.json().await.unwrap();
    body["id"].as_str().unwrap().to_string()
}

async fn refused_busy(r: reqwest::Response, flag: &str) {
    assert_eq!(r.status(), 429);
    let retry: u64 = r.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=60).contains(&retry));
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error_type"], "overloaded");
    assert!(body["error"].as_str().unwrap().contains(flag), "{body}");
}

/// The cost of a 40x24, 900-step edit: the largest one edit may cost under [`cost_budget`].
const BIG_EDIT: u64 = 40 * 24 * 900;

/// One edit at a time; the queue holds three big edits, one client one and small ones.
fn cost_budget(args: &mut rl4pix_server::Args) {
    args.max_batch_size = 1;
    args.max_steps = 900;
    args.max_edit_cost = Some(BIG_EDIT);
    args.max_queued_cost = Some(3 * BIG_EDIT);
    args.max_client_share = 0.5;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_are_charged_steps_times_pixels_per_edit_per_client_and_in_all() {
    let TestServer { server, url, http } = TestServer::start(|args| {
        cost_budget(args);
        args.api_key = Some(ADMIN_KEY.into());
        args.openai_api_key = Some("second-key".into());
    })
    .await;

    // Over the per-edit limit: refused outright, whoever asks.
    let r = submit_async(&http, &url, None, (48, 24), 900).await;
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error_type"], "edit_too_costly", "{body}");

    // The address's client: one big edit runs, a second passes its share; small ones fit.
    let blocker = job_id(submit_async(&http, &url, None, (40, 24), 900).await).await;
    refused_busy(
        submit_async(&http, &url, None, (40, 24), 900).await,
        "--max-client-share",
    )
    .await;
    let small = job_id(submit_async(&http, &url, None, (40, 24), 2).await).await;
    // A key the server does not know earns no share of its own.
    refused_busy(
        submit_async(&http, &url, Some("made-up"), (40, 24), 900).await,
        "--max-client-share",
    )
    .await;
    // The two configured keys are two more clients, until the whole budget is held.
    let keyed = job_id(submit_async(&http, &url, Some(ADMIN_KEY), (40, 24), 900).await).await;
    refused_busy(
        submit_async(&http, &url, Some("second-key"), (40, 24), 900).await,
        "the server has",
    )
    .await;

    // Cancelling gives the cost back: the address may queue a big edit again.
    for id in [&blocker, &keyed] {
        let r = delete(&http, &format!("{url}/jobs/{id}")).await;
        assert_eq!(r.status(), 200);
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let again = loop {
        let r = submit_async(&http, &url, None, (40, 24), 900).await;
        if r.status() == 202 {
            break job_id(r).await;
        }
        assert_eq!(r.status(), 429);
        assert!(Instant::now() < deadline, "the cost was never given back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    for id in [&again, &small] {
        let _ = delete(&http, &format!("{url}/jobs/{id}")).await;
    }
    server.shutdown().await.unwrap();
}

/// Bytes one edit of a 64x64 picture holds in the attention cache: its input and its maps.
async fn attention_entry_bytes() -> u64 {
    let TestServer { server, url, http } = TestServer::start(|_| {}).await;
    let r = post_edit(&http, &url, raw_form(png(&scene(64, 64, 9)), &[])).await;
    let id = r.headers()["x-edit-id"].to_str().unwrap().to_string();
    let tokens: Value = get_json(&http, &format!("{url}/attention/{id}/tokens")).await;
    server.shutdown().await.unwrap();
    let map = tokens["height"].as_u64().unwrap() * tokens["width"].as_u64().unwrap();
    let maps = 1 + tokens["words"].as_array().unwrap().len() as u64;
    let instruction = tokens["instruction"].as_str().unwrap().len() as u64;
    64 * 64 * 3 + maps * map * 4 + instruction
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_results_and_attention_maps_are_bounded_by_bytes() {
    let entry = attention_entry_bytes().await;
    let TestServer { server, url, http } = TestServer::start(|args| {
        // Every result passes this alone: only the newest is kept.
        args.max_job_bytes = 1;
        // Room for one edit's attention entry, not two.
        args.attention_cache_bytes = entry * 3 / 2;
    })
    .await;

    let mut ids = Vec::new();
    for variant in 0..3u32 {
        let r = post_edit_async(&http, &url, raw_form(png(&scene(64, 64, variant)), &[])).await;
        let id = job_id(r).await;
        wait_for_status(&http, &url, &id, "done", Duration::from_secs(60)).await;
        ids.push(id);
    }
    for (i, id) in ids.iter().enumerate() {
        let r = get(&http, &format!("{url}/jobs/{id}/result")).await;
        if i == ids.len() - 1 {
            assert_eq!(r.status(), 200, "the newest result stays");
        } else {
            assert_eq!(error_type(r, 404).await, "job_not_found", "job {i}");
        }
    }
    for (i, id) in ids.iter().enumerate() {
        let r = get(&http, &format!("{url}/attention/{id}")).await;
        let expected = if i == ids.len() - 1 { 200 } else { 404 };
        assert_eq!(r.status().as_u16(), expected, "attention of edit {i}");
    }
    server.shutdown().await.unwrap();
}

/// Two peer addresses are two clients: the accept loop hands each request its peer as
/// ConnectInfo (without it, both would share one "unknown" client and the second be refused).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_peer_address_is_its_own_client() {
    let TestServer { server, url, .. } = TestServer::start(cost_budget).await;
    let from = |ip: [u8; 4]| {
        reqwest::Client::builder()
            .local_address(std::net::IpAddr::from(ip))
            .build()
            .unwrap()
    };
    let (first, second) = (from([127, 0, 0, 1]), from([127, 0, 0, 2]));
    let running = job_id(submit_async(&first, &url, None, (40, 24), 900).await).await;
    refused_busy(
        submit_async(&first, &url, None, (40, 24), 900).await,
        "--max-client-share",
    )
    .await;
    let other = job_id(submit_async(&second, &url, None, (40, 24), 900).await).await;
    for id in [&running, &other] {
        let r = delete(&first, &format!("{url}/jobs/{id}")).await;
        assert_eq!(r.status(), 200);
    }
    server.shutdown().await.unwrap();
}
