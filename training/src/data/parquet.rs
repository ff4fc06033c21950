//! MagicBrush as the hub publishes it: parquet shards (`data/train-00000-of-00051.parquet`, ...) with
//! `img_id`, `turn_index`, `source_img`/`mask_img`/`target_img` as `{bytes, path}` structs (the way
//! `datasets` stores an `Image` column) and `instruction`. Rows of one session are consecutive.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::file::reader::{FileReader, SerializedFileReader};
use parquet::record::reader::RowIter;
use parquet::record::{Field, Row};
use parquet::schema::types::Type;

use super::{decode_image_bytes, mask_from_image, DataError, EditKind, Result, Session, Turn};

pub const REQUIRED_COLUMNS: [&str; 6] = [
    "img_id",
    "turn_index",
    "source_img",
    "mask_img",
    "target_img",
    "instruction",
];
/// Read when present; the hub's MagicBrush has neither.
const OPTIONAL_COLUMNS: [&str; 2] = ["local_description", "edit_kind"];

/// Parquet shards chosen on open (schemas checked then); rows are streamed row group by row group.
pub struct ParquetDataset {
    files: Vec<PathBuf>,
    rows: usize,
}

/// Does `file` (found under `root`) belong to `split`? Hub shards are named `<split>-00000-of-00001…`,
/// converted ones live in a folder named for the split (`default/test/0000.parquet`).
fn file_in_split(root: &Path, file: &Path, split: &str) -> bool {
    let stem = file.file_stem().and_then(|s| s.to_str()).unwrap_or("");
    let named = stem == split
        || [
            format!("{split}-"),
            format!("{split}_"),
            format!("{split}."),
        ]
        .iter()
        .any(|prefix| stem.starts_with(prefix.as_str()));
    let in_folder = file
        .parent()
        .and_then(|p| p.strip_prefix(root).ok())
        .is_some_and(|rel| rel.components().any(|c| c.as_os_str() == split));
    named || in_folder
}

fn collect_parquet_files(dir: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let entries = std::fs::read_dir(dir).map_err(|source| DataError::Io {
        path: dir.to_path_buf(),
        cause: source,
    })?;
    for entry in entries {
        let path = entry
            .map_err(|source| DataError::Io {
                path: dir.to_path_buf(),
                cause: source,
            })?
            .path();
        if path.is_dir() {
            collect_parquet_files(&path, out)?;
        } else if path.extension().is_some_and(|e| e == "parquet") {
            out.push(path);
        }
    }
    Ok(())
}

fn parquet_error(path: &Path, e: impl std::fmt::Display) -> DataError {
    DataError::Parquet {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}

fn open_reader(path: &Path) -> Result<SerializedFileReader<File>> {
    let file = File::open(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        cause: source,
    })?;
    SerializedFileReader::new(file).map_err(|e| parquet_error(path, e))
}

/// The projection of the file's schema onto the columns we read; errors name a missing column.
fn projection(path: &Path, reader: &SerializedFileReader<File>) -> Result<Type> {
    let root = reader
        .metadata()
        .file_metadata()
        .schema_descr()
        .root_schema();
    let fields = root.get_fields();
    let names: Vec<&str> = fields.iter().map(|f| f.name()).collect();
    if let Some(missing) = REQUIRED_COLUMNS.iter().find(|c| !names.contains(c)) {
        return Err(DataError::MissingColumn {
            path: path.to_path_buf(),
            column: missing.to_string(),
            found: names.join(", "),
        });
    }
    let wanted: Vec<_> = fields
        .iter()
        .filter(|f| REQUIRED_COLUMNS.contains(&f.name()) || OPTIONAL_COLUMNS.contains(&f.name()))
        .cloned()
        .collect();
    Type::group_type_builder(root.name())
        .with_fields(wanted)
        .build()
        .map_err(|e| parquet_error(path, e))
}

impl ParquetDataset {
    /// `path` is one parquet file (used whatever `split` says) or a folder searched recursively.
    pub fn open(path: &Path, split: Option<&str>) -> Result<Self> {
        let files = if path.is_dir() {
            let mut all = Vec::new();
            collect_parquet_files(path, &mut all)?;
            all.sort();
            let chosen: Vec<PathBuf> = match split {
                Some(split) => all
                    .iter()
                    .filter(|f| file_in_split(path, f, split))
                    .cloned()
                    .collect(),
                None => all.clone(),
            };
            if chosen.is_empty() {
                let message = match (split, all.is_empty()) {
                    (_, true) => "no edit_sessions.json and no .parquet files here".to_string(),
                    (Some(split), false) => format!(
                        "no parquet shard for split `{split}` among {}",
                        all.iter()
                            .map(|f| f.display().to_string())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                    (None, false) => unreachable!("all files are chosen without a split"),
                };
                return Err(DataError::Invalid {
                    path: path.to_path_buf(),
                    message,
                });
            }
            chosen
        } else {
            vec![path.to_path_buf()]
        };
        let mut rows = 0usize;
        for file in &files {
            let reader = open_reader(file)?;
            projection(file, &reader)?;
            rows += usize::try_from(reader.metadata().file_metadata().num_rows()).unwrap_or(0);
        }
        Ok(ParquetDataset { files, rows })
    }

    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    pub fn row_count(&self) -> usize {
        self.rows
    }

    pub fn sessions(&self) -> ParquetSessions<'_> {
        ParquetSessions {
            files: &self.files,
            next_file: 0,
            current: None,
            pending: None,
            finished_ids: HashSet::new(),
            failed: false,
        }
    }
}

struct OpenFile {
    path: PathBuf,
    rows: RowIter<'static>,
    row_number: usize,
}

/// Groups consecutive rows with the same `img_id` into sessions.
pub struct ParquetSessions<'a> {
    files: &'a [PathBuf],
    next_file: usize,
    current: Option<OpenFile>,
    /// First turn of the next session, read while looking for the end of the current one.
    pending: Option<Turn>,
    finished_ids: HashSet<String>,
    failed: bool,
}

impl ParquetSessions<'_> {
    fn next_turn(&mut self) -> Result<Option<Turn>> {
        loop {
            if self.current.is_none() {
                let Some(path) = self.files.get(self.next_file) else {
                    return Ok(None);
                };
                self.next_file += 1;
                let reader = open_reader(path)?;
                let proj = projection(path, &reader)?;
                let rows = RowIter::from_file_into(Box::new(reader))
                    .project(Some(proj))
                    .map_err(|e| parquet_error(path, e))?;
                self.current = Some(OpenFile {
                    path: path.clone(),
                    rows,
                    row_number: 0,
                });
            }
            let Some(open) = self.current.as_mut() else {
                continue;
            };
            match open.rows.next() {
                None => self.current = None,
                Some(row) => {
                    let row = row.map_err(|e| parquet_error(&open.path, e))?;
                    let turn = turn_from_row(&open.path, open.row_number, &row)?;
                    open.row_number += 1;
                    return Ok(Some(turn));
                }
            }
        }
    }

    fn next_session(&mut self) -> Result<Option<Session>> {
        let first = match self.pending.take() {
            Some(turn) => turn,
            None => match self.next_turn()? {
                Some(turn) => turn,
                None => return Ok(None),
            },
        };
        let id = first.session_id.clone();
        if self.finished_ids.contains(&id) {
            return Err(DataError::Invalid {
                path: self.current_path(),
                message: format!("rows of session {id} are not consecutive"),
            });
        }
        let mut turns = vec![first];
        while let Some(turn) = self.next_turn()? {
            if turn.session_id == id {
                turns.push(turn);
            } else {
                self.pending = Some(turn);
                break;
            }
        }
        turns.sort_by_key(|t| t.turn_index);
        self.finished_ids.insert(id.clone());
        Ok(Some(Session { id, turns }))
    }

    fn current_path(&self) -> PathBuf {
        match &self.current {
            Some(open) => open.path.clone(),
            None => self.files.last().cloned().unwrap_or_default(),
        }
    }
}

impl Iterator for ParquetSessions<'_> {
    type Item = Result<Session>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.failed {
            return None;
        }
        let result = self.next_session().transpose();
        if matches!(result, Some(Err(_))) {
            self.failed = true;
        }
        result
    }
}

fn column<'r>(row: &'r Row, name: &str) -> Option<&'r Field> {
    row.get_column_iter()
        .find(|(column, _)| column.as_str() == name)
        .map(|(_, field)| field)
}

fn row_error(path: &Path, row: usize, column: &str, message: impl std::fmt::Display) -> DataError {
    DataError::Parquet {
        path: path.to_path_buf(),
        message: format!("row {row}, column `{column}`: {message}"),
    }
}

fn string_column(path: &Path, row_number: usize, row: &Row, name: &str) -> Result<Option<String>> {
    match column(row, name) {
        None | Some(Field::Null) => Ok(None),
        Some(Field::Str(s)) => Ok(Some(s.clone())),
        Some(Field::Int(v)) => Ok(Some(v.to_string())),
        Some(Field::Long(v)) => Ok(Some(v.to_string())),
        Some(other) => Err(row_error(
            path,
            row_number,
            name,
            format!("expected a string, found {other}"),
        )),
    }
}

fn required_string(path: &Path, row_number: usize, row: &Row, name: &str) -> Result<String> {
    string_column(path, row_number, row, name)?
        .ok_or_else(|| row_error(path, row_number, name, "value is null"))
}

fn integer_column(path: &Path, row_number: usize, row: &Row, name: &str) -> Result<i64> {
    match column(row, name) {
        Some(Field::Int(v)) => Ok(i64::from(*v)),
        Some(Field::Long(v)) => Ok(*v),
        Some(Field::Short(v)) => Ok(i64::from(*v)),
        Some(Field::Byte(v)) => Ok(i64::from(*v)),
        Some(Field::UInt(v)) => Ok(i64::from(*v)),
        Some(Field::Str(s)) => s
            .parse()
            .map_err(|_| row_error(path, row_number, name, format!("not an integer: `{s}`"))),
        Some(other) => Err(row_error(
            path,
            row_number,
            name,
            format!("expected an integer, found {other}"),
        )),
        None => Err(row_error(path, row_number, name, "column missing")),
    }
}

/// An image column: `{bytes, path}` (bytes may be null when `path` names a file beside the shard),
/// or plain binary.
fn image_column(
    path: &Path,
    row_number: usize,
    row: &Row,
    name: &str,
) -> Result<image::DynamicImage> {
    let what = format!("{} row {row_number}, column `{name}`", path.display());
    match column(row, name) {
        Some(Field::Bytes(bytes)) => decode_image_bytes(bytes.data(), &what),
        Some(Field::Group(image)) => {
            if let Some(Field::Bytes(bytes)) = column(image, "bytes") {
                return decode_image_bytes(bytes.data(), &what);
            }
            match column(image, "path") {
                Some(Field::Str(file)) if !file.is_empty() => {
                    let file = path.parent().unwrap_or(Path::new(".")).join(file);
                    super::read_image_file(&file)
                }
                _ => Err(row_error(
                    path,
                    row_number,
                    name,
                    "image has neither bytes nor path",
                )),
            }
        }
        Some(Field::Null) | None => Err(row_error(path, row_number, name, "value is null")),
        Some(other) => Err(row_error(
            path,
            row_number,
            name,
            format!("expected an image struct, found {other}"),
        )),
    }
}

fn turn_from_row(path: &Path, row_number: usize, row: &Row) -> Result<Turn> {
    let turn_index = integer_column(path, row_number, row, "turn_index")?;
    let turn_index = usize::try_from(turn_index).map_err(|_| {
        row_error(
            path,
            row_number,
            "turn_index",
            format!("negative: {turn_index}"),
        )
    })?;
    let edit_kind = match string_column(path, row_number, row, "edit_kind")? {
        Some(kind) => Some(EditKind::parse(&kind).ok_or_else(|| {
            row_error(
                path,
                row_number,
                "edit_kind",
                format!("unknown edit kind `{kind}`"),
            )
        })?),
        None => None,
    };
    Ok(Turn {
        session_id: required_string(path, row_number, row, "img_id")?,
        turn_index,
        instruction: required_string(path, row_number, row, "instruction")?,
        source: image_column(path, row_number, row, "source_img")?.to_rgb8(),
        target: image_column(path, row_number, row, "target_img")?.to_rgb8(),
        mask: mask_from_image(&image_column(path, row_number, row, "mask_img")?),
        local_description: string_column(path, row_number, row, "local_description")?,
        edit_kind,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_matching_follows_hub_names() {
        let root = Path::new("/d");
        assert!(file_in_split(
            root,
            Path::new("/d/data/train-00000-of-00051-abc.parquet"),
            "train"
        ));
        assert!(file_in_split(
            root,
            Path::new("/d/data/dev-00000-of-00001.parquet"),
            "dev"
        ));
        assert!(!file_in_split(
            root,
            Path::new("/d/data/dev-00000-of-00001.parquet"),
            "train"
        ));
        assert!(file_in_split(
            root,
            Path::new("/d/default/test/0000.parquet"),
            "test"
        ));
        assert!(!file_in_split(
            root,
            Path::new("/d/data/testing-0.parquet"),
            "test"
        ));
        // The root's own name says nothing about the split.
        assert!(!file_in_split(
            Path::new("/train"),
            Path::new("/train/data/dev-0.parquet"),
            "train"
        ));
    }
}
