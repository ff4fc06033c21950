//! The kept attention maps of recent edits, and their overlays.

use std::io::Cursor;
use std::sync::Arc;

use crate::attention_cache::CachedEdit;

use super::state::Service;
use crate::error::{clipped, ServiceError};

impl Service {
    /// The maps of a recent edit, or why there are none.
    pub fn attention_of(&self, edit_id: &str) -> Result<Arc<CachedEdit>, ServiceError> {
        if self.attention.capacity() == 0 {
            return Err(ServiceError::not_found(
                "edit_not_found",
                "attention capture is off on this server (--attention-cache 0)",
            ));
        }
        self.attention.get(edit_id).ok_or_else(|| {
            ServiceError::not_found(
                "edit_not_found",
                format!(
                    "no attention maps for edit `{}`: unknown id, or evicted (the server keeps the last {} edits, --attention-cache)",
                    clipped(edit_id),
                    self.attention.capacity()
                ),
            )
        })
    }

    /// A PNG of the edit's input with the map of `word` (default: the whole instruction) as a
    /// heat map of the given opacity.
    pub async fn attention_overlay(
        &self,
        edit: Arc<CachedEdit>,
        word: Option<&str>,
        opacity: f32,
    ) -> Result<Vec<u8>, ServiceError> {
        let attention = &edit.attention;
        let map = match word {
            None => attention.instruction_map.clone(),
            Some(word) => attention
                .words
                .iter()
                .find(|w| w.word.eq_ignore_ascii_case(word))
                .map(|w| w.map.clone())
                .ok_or_else(|| {
                    let words: Vec<&str> =
                        attention.words.iter().map(|w| w.word.as_str()).collect();
                    ServiceError::not_found(
                        "word_not_found",
                        format!(
                            "{:?} is not a word of the instruction; its words: {words:?}",
                            clipped(word)
                        ),
                    )
                })?,
        };
        let (h, w) = (attention.height, attention.width);
        super::blocking("overlay", move || {
            let overlay = rl4pix_model::image_io::heatmap_overlay(&edit.image, &map, h, w, opacity)
                .map_err(|e| ServiceError::internal(e.to_string()))?;
            let mut out = Cursor::new(Vec::new());
            overlay
                .write_to(&mut out, image::ImageFormat::Png)
                .map_err(|e| ServiceError::internal(format!("cannot encode the overlay: {e}")))?;
            Ok(out.into_inner())
        })
        .await
    }
}
