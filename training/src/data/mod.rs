//! MagicBrush-format data: the sample types, the folder and parquet readers, image and mask decoding.
//!
//! Both readers stream one session (an image and its 1..n edit turns) at a time; nothing decodes more
//! than the session being read.

mod folder;
mod parquet;

use std::path::{Path, PathBuf};

use image::{DynamicImage, ImageBuffer, Luma, RgbImage};
use serde::{Deserialize, Serialize};

pub use self::folder::{FolderDataset, LOCAL_DESCRIPTIONS_FILE, SESSIONS_FILE};
pub use self::parquet::{ParquetDataset, REQUIRED_COLUMNS};

/// Greyscale mask in [0, 1]; 1 (white) marks the region the edit changes.
pub type Mask = ImageBuffer<Luma<f32>, Vec<f32>>;

/// The paper's four kinds of edit, recorded by the synthetic world.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EditKind {
    Insertion,
    Removal,
    Replacement,
    Transformation,
}

impl EditKind {
    pub const ALL: [EditKind; 4] = [
        EditKind::Insertion,
        EditKind::Removal,
        EditKind::Replacement,
        EditKind::Transformation,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EditKind::Insertion => "insertion",
            EditKind::Removal => "removal",
            EditKind::Replacement => "replacement",
            EditKind::Transformation => "transformation",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|kind| kind.as_str() == text)
    }
}

/// One edit: `source` edited by `instruction` gives `target`; `mask` marks where they differ.
#[derive(Debug, Clone)]
pub struct Turn {
    pub session_id: String,
    /// 1-based, as in MagicBrush's file names (`<id>-output<turn_index>.png`).
    pub turn_index: usize,
    pub instruction: String,
    pub source: RgbImage,
    pub target: RgbImage,
    pub mask: Mask,
    /// Caption of the edited region of `target` (MagicBrush's local description), used by CLIP-T.
    pub local_description: Option<String>,
    pub edit_kind: Option<EditKind>,
}

/// An image and the turns edited from it, in order: turn k's source is turn k-1's target.
#[derive(Debug, Clone)]
pub struct Session {
    pub id: String,
    pub turns: Vec<Turn>,
}

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{}: not found", path.display())]
    MissingFile { path: PathBuf },

    // The cause is in the message, not also a `source()`: error chains print each link once.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },

    #[error("{what}: cannot decode image: {message}")]
    Image { what: String, message: String },

    #[error("{}: invalid JSON: {message}", path.display())]
    Json { path: PathBuf, message: String },

    #[error("{}: session {session} turn {turn} names `{file}`, which is not there ({})", json.display(), path.display())]
    SessionFile {
        json: PathBuf,
        session: String,
        turn: usize,
        file: String,
        path: PathBuf,
    },

    #[error("{}: missing column `{column}` (columns: {found})", path.display())]
    MissingColumn {
        path: PathBuf,
        column: String,
        found: String,
    },

    #[error("{}: {message}", path.display())]
    Parquet { path: PathBuf, message: String },

    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
}

pub type Result<T> = std::result::Result<T, DataError>;

/// A MagicBrush data set on disk: the released folder layout or the hub's parquet shards.
pub enum Dataset {
    Folder(FolderDataset),
    Parquet(ParquetDataset),
}

impl Dataset {
    /// Opens `path`: a folder with `edit_sessions.json`, one `.parquet` file, or a folder searched
    /// recursively for parquet shards, of which `split` (`train`/`dev`/`test`) picks those named for it.
    pub fn open(path: &Path, split: Option<&str>) -> Result<Self> {
        if !path.exists() {
            return Err(DataError::MissingFile {
                path: path.to_path_buf(),
            });
        }
        if path.is_dir() && path.join(SESSIONS_FILE).is_file() {
            return Ok(Dataset::Folder(FolderDataset::open(path)?));
        }
        Ok(Dataset::Parquet(ParquetDataset::open(path, split)?))
    }

    /// Number of turns over all sessions (for progress bars).
    pub fn turn_count(&self) -> usize {
        match self {
            Dataset::Folder(d) => d.turn_count(),
            Dataset::Parquet(d) => d.row_count(),
        }
    }

    /// Number of turns in the first `limit` sessions (all without a limit), where known without
    /// reading the data: always for folders, for parquet only without a limit.
    pub fn turn_count_of_first(&self, limit: Option<usize>) -> Option<usize> {
        match (self, limit) {
            (Dataset::Folder(d), Some(n)) => Some(d.turn_count_of_first(n)),
            (_, None) => Some(self.turn_count()),
            (Dataset::Parquet(_), Some(_)) => None,
        }
    }

    /// Number of sessions, where known without reading the data (folders only).
    pub fn session_count(&self) -> Option<usize> {
        match self {
            Dataset::Folder(d) => Some(d.session_count()),
            Dataset::Parquet(_) => None,
        }
    }

    /// Streams the sessions in order, decoding one at a time.
    pub fn sessions(&self) -> Box<dyn Iterator<Item = Result<Session>> + '_> {
        match self {
            Dataset::Folder(d) => Box::new(d.sessions()),
            Dataset::Parquet(d) => Box::new(d.sessions()),
        }
    }
}

/// Decodes an image file, naming it in every error.
pub fn read_image_file(path: &Path) -> Result<DynamicImage> {
    if !path.is_file() {
        return Err(DataError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    let bytes = std::fs::read(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        cause: source,
    })?;
    decode_image_bytes(&bytes, &path.display().to_string())
}

/// Decodes an encoded image (PNG, JPEG, WebP); `what` names its origin in errors.
pub fn decode_image_bytes(bytes: &[u8], what: &str) -> Result<DynamicImage> {
    image::load_from_memory(bytes).map_err(|e| DataError::Image {
        what: what.to_string(),
        message: e.to_string(),
    })
}

/// A mask in [0, 1] from any encoding: white-on-black greyscale or RGB, and with alpha the image
/// composited over black (so a transparent pixel is outside the region whatever its colour).
pub fn mask_from_image(image: &DynamicImage) -> Mask {
    let rgba = image.to_rgba32f();
    let mut mask = Mask::new(rgba.width(), rgba.height());
    for (out, px) in mask.pixels_mut().zip(rgba.pixels()) {
        let [r, g, b, a] = px.0;
        // ITU-R 601 luma, as PIL's convert("L").
        let luma = 0.299 * r + 0.587 * g + 0.114 * b;
        out.0[0] = (luma * a).clamp(0.0, 1.0);
    }
    mask
}

/// Encodes a mask as an 8-bit greyscale PNG-ready image (white = 1).
pub fn mask_to_luma8(mask: &Mask) -> image::GrayImage {
    image::GrayImage::from_fn(mask.width(), mask.height(), |x, y| {
        Luma([(mask.get_pixel(x, y).0[0].clamp(0.0, 1.0) * 255.0).round() as u8])
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgba, RgbaImage};

    #[test]
    fn mask_encodings_agree() {
        let grey = DynamicImage::ImageLuma8(image::GrayImage::from_fn(4, 2, |x, _| {
            Luma([if x < 2 { 255 } else { 0 }])
        }));
        let rgb = DynamicImage::ImageRgb8(grey.to_rgb8());
        let alpha_only = DynamicImage::ImageRgba8(RgbaImage::from_fn(4, 2, |x, _| {
            Rgba([255, 255, 255, if x < 2 { 255 } else { 0 }])
        }));
        for image in [grey, rgb, alpha_only] {
            let mask = mask_from_image(&image);
            let values: Vec<f32> = mask.pixels().map(|p| p.0[0]).collect();
            assert_eq!(values, vec![1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]);
        }
    }

    #[test]
    fn edit_kind_round_trips() {
        for kind in EditKind::ALL {
            assert_eq!(EditKind::parse(kind.as_str()), Some(kind));
            let json = serde_json::to_string(&kind).unwrap();
            assert_eq!(json, format!("\"{}\"", kind.as_str()));
        }
        assert_eq!(EditKind::parse("rotation"), None);
    }
}
