//! MagicBrush's released folder layout:
//! `DIR/edit_sessions.json` = `{id: [{"input", "mask", "instruction", "output"}, ...]}`,
//! images under `DIR/images/<id>/`, optional `DIR/local_descriptions.json` = `{id: {output: caption}}`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{mask_from_image, read_image_file, DataError, EditKind, Result, Session, Turn};

pub const SESSIONS_FILE: &str = "edit_sessions.json";
pub const LOCAL_DESCRIPTIONS_FILE: &str = "local_descriptions.json";

/// One entry of `edit_sessions.json`; fields MagicBrush's tools do not know are ignored by them.
#[derive(Debug, Clone, Deserialize)]
struct TurnEntry {
    input: String,
    mask: String,
    instruction: String,
    output: String,
    #[serde(default)]
    edit_kind: Option<String>,
}

struct SessionEntry {
    id: String,
    turns: Vec<TurnEntry>,
}

/// A MagicBrush folder: the session index is read (and every file it names checked) on open; images
/// are decoded session by session.
pub struct FolderDataset {
    root: PathBuf,
    sessions: Vec<SessionEntry>,
    local_descriptions: HashMap<String, HashMap<String, String>>,
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    if !path.is_file() {
        return Err(DataError::MissingFile {
            path: path.to_path_buf(),
        });
    }
    let text = std::fs::read_to_string(path).map_err(|source| DataError::Io {
        path: path.to_path_buf(),
        cause: source,
    })?;
    serde_json::from_str(&text).map_err(|e| DataError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })
}

impl FolderDataset {
    pub fn open(root: &Path) -> Result<Self> {
        let json_path = root.join(SESSIONS_FILE);
        // BTreeMap: sessions in id order, whatever order the JSON object has.
        let index: BTreeMap<String, Vec<TurnEntry>> = read_json(&json_path)?;
        let descriptions_path = root.join(LOCAL_DESCRIPTIONS_FILE);
        let local_descriptions = if descriptions_path.is_file() {
            read_json(&descriptions_path)?
        } else {
            HashMap::new()
        };
        let dataset = FolderDataset {
            root: root.to_path_buf(),
            sessions: index
                .into_iter()
                .map(|(id, turns)| SessionEntry { id, turns })
                .collect(),
            local_descriptions,
        };
        dataset.check_files(&json_path)?;
        Ok(dataset)
    }

    /// Fails early, naming the session, turn and file, if the index points at a missing image.
    fn check_files(&self, json_path: &Path) -> Result<()> {
        for session in &self.sessions {
            if session.turns.is_empty() {
                return Err(DataError::Invalid {
                    path: json_path.to_path_buf(),
                    message: format!("session {} has no turns", session.id),
                });
            }
            for (i, turn) in session.turns.iter().enumerate() {
                for file in [&turn.input, &turn.mask, &turn.output] {
                    let path = self.image_path(&session.id, file);
                    if !path.is_file() {
                        return Err(DataError::SessionFile {
                            json: json_path.to_path_buf(),
                            session: session.id.clone(),
                            turn: i + 1,
                            file: file.clone(),
                            path,
                        });
                    }
                }
                if let Some(kind) = &turn.edit_kind {
                    if EditKind::parse(kind).is_none() {
                        return Err(DataError::Invalid {
                            path: json_path.to_path_buf(),
                            message: format!(
                                "session {} turn {}: unknown edit_kind `{kind}`",
                                session.id,
                                i + 1
                            ),
                        });
                    }
                }
            }
        }
        Ok(())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    fn image_path(&self, session_id: &str, file: &str) -> PathBuf {
        self.root.join("images").join(session_id).join(file)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn turn_count(&self) -> usize {
        self.sessions.iter().map(|s| s.turns.len()).sum()
    }

    pub fn turn_count_of_first(&self, sessions: usize) -> usize {
        self.sessions
            .iter()
            .take(sessions)
            .map(|s| s.turns.len())
            .sum()
    }

    /// Decodes session `index` (in id order).
    pub fn load_session(&self, index: usize) -> Result<Session> {
        let entry = self.sessions.get(index).ok_or_else(|| DataError::Invalid {
            path: self.root.join(SESSIONS_FILE),
            message: format!("no session number {index}"),
        })?;
        let descriptions = self.local_descriptions.get(&entry.id);
        let mut turns = Vec::with_capacity(entry.turns.len());
        for (i, turn) in entry.turns.iter().enumerate() {
            let source = read_image_file(&self.image_path(&entry.id, &turn.input))?.to_rgb8();
            let target = read_image_file(&self.image_path(&entry.id, &turn.output))?.to_rgb8();
            let mask = mask_from_image(&read_image_file(&self.image_path(&entry.id, &turn.mask))?);
            turns.push(Turn {
                session_id: entry.id.clone(),
                turn_index: i + 1,
                instruction: turn.instruction.clone(),
                source,
                target,
                mask,
                local_description: descriptions.and_then(|d| d.get(&turn.output)).cloned(),
                edit_kind: turn.edit_kind.as_deref().and_then(EditKind::parse),
            });
        }
        Ok(Session {
            id: entry.id.clone(),
            turns,
        })
    }

    pub fn sessions(&self) -> impl Iterator<Item = Result<Session>> + '_ {
        (0..self.sessions.len()).map(move |i| self.load_session(i))
    }
}
