//! Export of a pretraining run to the diffusers layout the pipeline loads (`model_index.json`,
//! `unet/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`), in f16 to keep the shipped
//! model small (the loader upcasts).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use super::{checkpoint, io_error, read_json, write_json, PretrainError, Result};

fn save_tensors(tensors: &HashMap<String, Tensor>, dtype: DType, path: &Path) -> Result<()> {
    let converted = tensors
        .iter()
        .map(|(k, v)| Ok((k.clone(), v.to_dtype(dtype)?)))
        .collect::<Result<HashMap<_, _>>>()?;
    candle_core::safetensors::save(&converted, path).map_err(|e| PretrainError::Checkpoint {
        path: path.to_path_buf(),
        message: format!("cannot write: {e}"),
    })
}

fn strip_prefix(tensors: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    tensors
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(prefix)
                .map(|rest| (rest.to_string(), v.clone()))
        })
        .collect()
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).map_err(io_error(to))?;
    for entry in std::fs::read_dir(from).map_err(io_error(from))? {
        let entry = entry.map_err(io_error(from))?;
        if entry.path().is_file() {
            let target = to.join(entry.file_name());
            std::fs::copy(entry.path(), &target).map_err(io_error(&target))?;
        }
    }
    Ok(())
}

/// Writes the model of a `pretrain` run (its newest checkpoint, or `checkpoint_dir`) to `out`.
/// `use_ema`: the EMA weights when the checkpoint has them.
pub fn export_model(
    run_dir: &Path,
    checkpoint_dir: Option<&Path>,
    out: &Path,
    use_ema: bool,
    dtype: DType,
) -> Result<()> {
    export_model_with_vae(
        run_dir,
        checkpoint_dir,
        &run_dir.join("vae"),
        out,
        use_ema,
        dtype,
    )
}

/// [`export_model`] with the VAE taken from `vae_source` (e.g. one whose decoder was fine-tuned
/// after the UNet was trained; its encoder must be the run's).
pub fn export_model_with_vae(
    run_dir: &Path,
    checkpoint_dir: Option<&Path>,
    vae_source: &Path,
    out: &Path,
    use_ema: bool,
    dtype: DType,
) -> Result<()> {
    let ckpt = match checkpoint_dir {
        Some(dir) => checkpoint::open(dir)?,
        None => checkpoint::resolve(run_dir)?,
    };
    let device = Device::Cpu;
    let tensors = if use_ema && ckpt.state.files.contains_key("ema.safetensors") {
        ckpt.tensors("ema.safetensors", &device)?
    } else {
        ckpt.tensors("weights.safetensors", &device)?
    };
    std::fs::create_dir_all(out).map_err(io_error(out))?;
    write_json(
        &out.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionInstructPix2PixPipeline",
            "_diffusers_version": "0.42.1",
            "feature_extractor": [null, null],
            "image_encoder": [null, null],
            "requires_safety_checker": false,
            "safety_checker": [null, null],
            "scheduler": ["diffusers", "EulerAncestralDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "rl4pix": {"trained_steps": ckpt.state.step, "ema": use_ema, "training_config": ckpt.state.config}
        }),
    )?;
    let unet_dir = out.join("unet");
    std::fs::create_dir_all(&unet_dir).map_err(io_error(&unet_dir))?;
    let unet_config: serde_json::Value = read_json(&run_dir.join("unet_config.json"))?;
    write_json(&unet_dir.join("config.json"), &unet_config)?;
    save_tensors(
        &strip_prefix(&tensors, "unet."),
        dtype,
        &unet_dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    let text_dir = out.join("text_encoder");
    std::fs::create_dir_all(&text_dir).map_err(io_error(&text_dir))?;
    let text_config: serde_json::Value = read_json(&run_dir.join("text_encoder_config.json"))?;
    write_json(&text_dir.join("config.json"), &text_config)?;
    save_tensors(
        &strip_prefix(&tensors, "text_encoder."),
        dtype,
        &text_dir.join("model.safetensors"),
    )?;
    let vae_dir = out.join("vae");
    std::fs::create_dir_all(&vae_dir).map_err(io_error(&vae_dir))?;
    let vae_config: serde_json::Value = read_json(&vae_source.join("config.json"))?;
    write_json(&vae_dir.join("config.json"), &vae_config)?;
    let vae_weights = vae_source.join("diffusion_pytorch_model.safetensors");
    let vae_tensors = candle_core::safetensors::load(&vae_weights, &device).map_err(|e| {
        PretrainError::Checkpoint {
            path: vae_weights.clone(),
            message: e.to_string(),
        }
    })?;
    save_tensors(
        &vae_tensors,
        dtype,
        &vae_dir.join("diffusion_pytorch_model.safetensors"),
    )?;
    copy_dir(&run_dir.join("tokenizer"), &out.join("tokenizer"))?;
    let scheduler_dir = out.join("scheduler");
    std::fs::create_dir_all(&scheduler_dir).map_err(io_error(&scheduler_dir))?;
    let scheduler: serde_json::Value = read_json(&run_dir.join("scheduler_config.json"))?;
    write_json(&scheduler_dir.join("scheduler_config.json"), &scheduler)?;
    Ok(())
}
