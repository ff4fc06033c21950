//! Writes sessions in MagicBrush's folder layout.

use super::language::scene_caption;
use super::session::SynthWorld;

/// What [`write_folder`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WriteSummary {
    pub sessions: u64,
    pub turns: u64,
}

/// One session's entries in the index files.
pub(super) struct WrittenSession {
    id: String,
    turns: Vec<serde_json::Value>,
    local: serde_json::Map<String, serde_json::Value>,
    global: serde_json::Map<String, serde_json::Value>,
}

pub(super) fn write_png<P, C>(
    image: &image::ImageBuffer<P, C>,
    path: &std::path::Path,
) -> crate::data::Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    let io = |source| crate::data::DataError::Io {
        path: path.to_path_buf(),
        cause: source,
    };
    let file = std::fs::File::create(path).map_err(io)?;
    let encoder = image::codecs::png::PngEncoder::new_with_quality(
        std::io::BufWriter::new(file),
        image::codecs::png::CompressionType::Fast,
        image::codecs::png::FilterType::Adaptive,
    );
    image
        .write_with_encoder(encoder)
        .map_err(|e| crate::data::DataError::Image {
            what: path.display().to_string(),
            message: e.to_string(),
        })
}

pub(super) fn write_session(
    world: &SynthWorld,
    index: u64,
    images: &std::path::Path,
) -> crate::data::Result<WrittenSession> {
    let id = SynthWorld::session_id(index);
    let turns = world.session_turns(index);
    let dir = images.join(&id);
    std::fs::create_dir_all(&dir).map_err(|source| crate::data::DataError::Io {
        path: dir.clone(),
        cause: source,
    })?;
    let input = format!("{id}-input.png");
    let mut written = WrittenSession {
        id: id.clone(),
        turns: Vec::with_capacity(turns.len()),
        local: serde_json::Map::new(),
        global: serde_json::Map::new(),
    };
    if let Some(first) = turns.first() {
        write_png(&first.turn.source, &dir.join(&input))?;
        written
            .global
            .insert(input.clone(), scene_caption(&first.before).into());
    }
    let mut previous = input;
    for t in &turns {
        let k = t.turn.turn_index;
        let output = format!("{id}-output{k}.png");
        let mask = format!("{id}-mask{k}.png");
        write_png(&t.turn.target, &dir.join(&output))?;
        write_png(&crate::data::mask_to_luma8(&t.turn.mask), &dir.join(&mask))?;
        written.turns.push(serde_json::json!({
            "input": previous,
            "mask": mask,
            "instruction": t.turn.instruction,
            "output": output,
            "edit_kind": t.turn.edit_kind.map(|k| k.as_str()),
            "ambiguous": t.ambiguous,
        }));
        if let Some(text) = &t.turn.local_description {
            written.local.insert(output.clone(), text.clone().into());
        }
        written
            .global
            .insert(output.clone(), scene_caption(&t.after).into());
        previous = output;
    }
    Ok(written)
}

pub(super) fn write_json(
    path: &std::path::Path,
    value: &serde_json::Value,
) -> crate::data::Result<()> {
    let text = serde_json::to_string(value).map_err(|e| crate::data::DataError::Json {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|source| crate::data::DataError::Io {
        path: path.to_path_buf(),
        cause: source,
    })
}

/// Writes sessions `0..count` of `world` to `out` in MagicBrush's folder layout
/// (`images/<id>/…`, `edit_sessions.json` with an extra `edit_kind` and `ambiguous` per turn,
/// `local_descriptions.json`, `global_descriptions.json`), on `threads` threads; `progress` is called
/// once per session written.
pub fn write_folder(
    world: &SynthWorld,
    out: &std::path::Path,
    count: u64,
    threads: usize,
    progress: &(dyn Fn() + Sync),
) -> crate::data::Result<WriteSummary> {
    let images = out.join("images");
    std::fs::create_dir_all(&images).map_err(|source| crate::data::DataError::Io {
        path: images.clone(),
        cause: source,
    })?;
    let threads = threads.max(1) as u64;
    let mut parts: Vec<crate::data::Result<Vec<WrittenSession>>> = Vec::new();
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let images = &images;
                scope.spawn(move || {
                    let mut written = Vec::new();
                    let mut index = t;
                    while index < count {
                        written.push(write_session(world, index, images)?);
                        progress();
                        index += threads;
                    }
                    Ok(written)
                })
            })
            .collect();
        for handle in handles {
            parts.push(handle.join().unwrap_or_else(|_| {
                Err(crate::data::DataError::Invalid {
                    path: out.to_path_buf(),
                    message: "a generator thread panicked".into(),
                })
            }));
        }
    });
    let mut sessions = serde_json::Map::new();
    let mut local = serde_json::Map::new();
    let mut global = serde_json::Map::new();
    let mut turns = 0u64;
    for part in parts {
        for s in part? {
            turns += s.turns.len() as u64;
            sessions.insert(s.id.clone(), s.turns.into());
            local.insert(s.id.clone(), s.local.into());
            global.insert(s.id, s.global.into());
        }
    }
    write_json(&out.join(crate::data::SESSIONS_FILE), &sessions.into())?;
    write_json(
        &out.join(crate::data::LOCAL_DESCRIPTIONS_FILE),
        &local.into(),
    )?;
    write_json(&out.join("global_descriptions.json"), &global.into())?;
    Ok(WriteSummary {
        sessions: count,
        turns,
    })
}
