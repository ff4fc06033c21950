//! The training prompts from a MagicBrush-format data set (folder or parquet): every turn's source
//! image at the working size, its mask and its instruction. The reward needs the masks: turns with
//! a blank mask are skipped and a data set with no usable mask is refused.

use std::path::Path;

use rl4pix_model::image_io;

use super::config::DataConfig;
use super::sampler::PromptItem;
use super::{DdpoError, Result};
use crate::data::Dataset;

/// Reads the prompts; `vae_factor` is the model's pixels-per-latent, to which the working size is
/// rounded down.
pub fn load_prompts(path: &Path, config: &DataConfig, vae_factor: u32) -> Result<Vec<PromptItem>> {
    let split = (!config.split.is_empty()).then_some(config.split.as_str());
    let dataset = Dataset::open(path, split)?;
    let mut size: Option<(u32, u32)> = match config.resolution {
        0 => None,
        r => Some(image_io::size_for_vae(r, r, vae_factor)),
    };
    let mut prompts = Vec::new();
    let mut blank = 0usize;
    'sessions: for session in dataset.sessions() {
        for turn in session?.turns {
            if config.max_prompts > 0 && prompts.len() >= config.max_prompts {
                break 'sessions;
            }
            if !turn.mask.pixels().any(|p| p.0[0] > 0.0) {
                blank += 1;
                continue;
            }
            let (w, h) = *size.get_or_insert_with(|| {
                image_io::size_for_vae(turn.source.width(), turn.source.height(), vae_factor)
            });
            prompts.push(PromptItem {
                key: format!(
                    "{}#{}|{}",
                    turn.session_id, turn.turn_index, turn.instruction
                ),
                source: image_io::resize_if_needed(&turn.source, w, h),
                target: image_io::resize_if_needed(&turn.target, w, h),
                mask: turn.mask,
                instruction: turn.instruction,
            });
        }
    }
    if prompts.is_empty() {
        return Err(DdpoError::Dataset(if blank > 0 {
            format!(
                "{}: all {blank} turns have blank (all black) masks; the reward needs a mask of the edited region",
                path.display()
            )
        } else {
            format!("{}: no turns", path.display())
        }));
    }
    if blank > 0 {
        tracing::warn!("skipped {blank} turns with blank masks");
    }
    Ok(prompts)
}
