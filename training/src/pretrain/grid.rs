//! The README's picture of the toy model at work: test edits of all four kinds from a synthetic
//! world, as a markdown table of input | instruction | output | target with the images (scaled up,
//! nearest neighbour, so the pixels stay visible) written beside it.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use image::imageops::FilterType;
use image::RgbImage;
use rl4pix_model::pipeline::{EditParams, InstructPix2Pix};

use super::{io_error, PretrainError, Result};
use crate::data::EditKind;
use crate::synth::SynthWorld;

pub struct GridSpec<'a> {
    pub model: &'a InstructPix2Pix,
    pub world: SynthWorld,
    pub per_kind: usize,
    pub params: EditParams,
    pub scale: u32,
    pub out_dir: &'a Path,
    /// How the markdown refers to the images (a path relative to where it is included).
    pub link_prefix: &'a str,
}

/// Writes `<out_dir>/<row>-{input,output,target}.png` and returns the markdown table.
pub fn write_grid(spec: &GridSpec) -> Result<String> {
    std::fs::create_dir_all(spec.out_dir).map_err(io_error(spec.out_dir))?;
    let mut chosen = Vec::new();
    for kind in EditKind::ALL {
        let mut taken = 0;
        let mut index = 0u64;
        while taken < spec.per_kind && index < 10_000 {
            for turn in spec.world.session(index).turns {
                if taken < spec.per_kind && turn.edit_kind == Some(kind) {
                    chosen.push(turn);
                    taken += 1;
                }
            }
            index += 1;
        }
    }
    let save = |image: &RgbImage, name: &str| -> Result<()> {
        let big = image::imageops::resize(
            image,
            image.width() * spec.scale,
            image.height() * spec.scale,
            FilterType::Nearest,
        );
        let path: PathBuf = spec.out_dir.join(name);
        big.save(&path).map_err(|e| PretrainError::Plot {
            path: path.clone(),
            message: e.to_string(),
        })
    };
    let mut table =
        String::from("| input | instruction | output | target |\n| --- | --- | --- | --- |\n");
    for (row, turn) in chosen.iter().enumerate() {
        let params = EditParams {
            seed: spec.params.seed + row as u64,
            ..spec.params.clone()
        };
        let output = spec
            .model
            .edit(&turn.source, &turn.instruction, &params)?
            .image;
        let names = [
            format!("{row}-input.png"),
            format!("{row}-output.png"),
            format!("{row}-target.png"),
        ];
        save(&turn.source, &names[0])?;
        save(&output, &names[1])?;
        save(&turn.target, &names[2])?;
        let kind = turn.edit_kind.map(EditKind::as_str).unwrap_or("");
        let link = |name: &str| format!("![]({}{name})", spec.link_prefix);
        let _ = writeln!(
            table,
            "| {} | {} _({kind})_ | {} | {} |",
            link(&names[0]),
            turn.instruction,
            link(&names[1]),
            link(&names[2])
        );
    }
    Ok(table)
}
