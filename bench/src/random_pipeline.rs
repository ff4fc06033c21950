//! A diffusers-layout InstructPix2Pix folder with random weights of given architectures, for
//! timing a real-size model where no trained one can be fetched (the GPU check's SD-1.5 rows).
//! The tokenizer and scheduler are copied from an existing model folder; the tokenizer's length
//! is set to the text encoder's positions (77 for SD-1.5).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use rl4pix_model::text_encoder::{ClipTextConfig, ClipTextTransformer};
use rl4pix_model::unet::{UNet2DConditionModel, UNetConfig};
use rl4pix_model::vae::{AutoencoderKl, VaeConfig};

#[derive(Debug, Clone, clap::Args)]
pub struct RandomPipelineArgs {
    /// A diffusers `unet/config.json`.
    #[arg(
        long,
        default_value = "model/configs/instruct-pix2pix/unet_config.json"
    )]
    pub unet_config: PathBuf,
    /// A diffusers `vae/config.json`.
    #[arg(long, default_value = "bench/configs/sd15/vae_config.json")]
    pub vae_config: PathBuf,
    /// A transformers `text_encoder/config.json`.
    #[arg(long, default_value = "bench/configs/sd15/text_encoder_config.json")]
    pub text_encoder_config: PathBuf,
    /// Model folder whose `tokenizer/` and `scheduler/` are copied.
    #[arg(long, default_value = "model/assets/toy")]
    pub like: PathBuf,
    /// Weight files' dtype: f32, f16 or bf16.
    #[arg(long, default_value = "f16")]
    pub dtype: String,
    #[arg(long)]
    pub out: PathBuf,
}

/// Writes `vars` (after building the module that names them) as `file` in `dtype`.
fn save(varmap: &VarMap, dtype: DType, file: &Path) -> Result<()> {
    let tensors: HashMap<String, Tensor> = varmap
        .data()
        .lock()
        .map_err(|_| anyhow::anyhow!("VarMap lock poisoned"))?
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_dtype(dtype)?)))
        .collect::<candle_core::Result<_>>()?;
    candle_core::safetensors::save(&tensors, file)
        .with_context(|| format!("writing {}", file.display()))
}

/// Builds a model with random f32 weights (`build`), writes them as `weights` in `dtype` and
/// copies `config` beside them as `config.json`.
fn write_random(
    config: &Path,
    weights: &Path,
    dtype: DType,
    build: impl FnOnce(VarBuilder) -> Result<()>,
) -> Result<()> {
    let varmap = VarMap::new();
    build(VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu))?;
    let dir = weights.parent().context("weights file without a folder")?;
    std::fs::copy(config, dir.join("config.json"))?;
    save(&varmap, dtype, weights)
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        if entry.file_type()?.is_file() {
            std::fs::copy(entry.path(), to.join(entry.file_name()))?;
        }
    }
    Ok(())
}

pub fn run(args: &RandomPipelineArgs) -> Result<()> {
    let dtype = crate::unet_bench::parse_dtype(&args.dtype)?;
    let out = &args.out;
    for part in ["unet", "vae", "text_encoder"] {
        std::fs::create_dir_all(out.join(part))?;
    }

    let unet_config = UNetConfig::from_file(&args.unet_config)?;
    let unet_weights = out.join("unet/diffusion_pytorch_model.safetensors");
    write_random(&args.unet_config, &unet_weights, dtype, |vb| {
        UNet2DConditionModel::new(vb, unet_config, &args.unet_config)?;
        Ok(())
    })?;

    let vae_config = VaeConfig::from_file(&args.vae_config)?;
    let vae_weights = out.join("vae/diffusion_pytorch_model.safetensors");
    write_random(&args.vae_config, &vae_weights, dtype, |vb| {
        AutoencoderKl::new(vb, vae_config)?;
        Ok(())
    })?;

    let text_config = ClipTextConfig::from_file(&args.text_encoder_config)?;
    let text_weights = out.join("text_encoder/model.safetensors");
    write_random(&args.text_encoder_config, &text_weights, dtype, |vb| {
        ClipTextTransformer::new(vb.pp("text_model"), &text_config)?;
        Ok(())
    })?;

    copy_dir(&args.like.join("scheduler"), &out.join("scheduler"))?;
    copy_dir(&args.like.join("tokenizer"), &out.join("tokenizer"))?;
    let tokenizer_config = out.join("tokenizer/tokenizer_config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&tokenizer_config)?)?;
    config["model_max_length"] = text_config.max_position_embeddings.into();
    std::fs::write(&tokenizer_config, serde_json::to_string_pretty(&config)?)?;
    let index = serde_json::json!({
        "_class_name": "StableDiffusionInstructPix2PixPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    });
    std::fs::write(
        out.join("model_index.json"),
        serde_json::to_string_pretty(&index)?,
    )?;
    println!("wrote {}", out.display());
    Ok(())
}
