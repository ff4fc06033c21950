//! `pretrain-vae`: the toy model's AutoencoderKL, trained as a lightly regularised autoencoder on
//! random scenes of the synthetic world (posterior mean only: the pipeline uses the posterior
//! mode, and the decoder is made robust to imprecise latents by a little noise on the code).

use std::path::{Path, PathBuf};

use candle_core::Device;
use candle_nn::{VarBuilder, VarMap};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rl4pix_model::vae::{AutoencoderKl, VaeConfig};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::Cadence;
use super::{checkpoint, data, write_json, LoopSpec, PretrainError, Result, TrainState};
use crate::optim::{named_vars, AdamW, AdamWParams};
use crate::synth::SynthWorld;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VaeTrainConfig {
    pub size: u32,
    pub seed: u64,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub channels: Vec<usize>,
    pub latent_channels: usize,
    pub norm_groups: usize,
    /// Weight of mean(z^2), which keeps the latent scale bounded.
    pub latent_penalty: f64,
    /// Noise added to the code while training, relative to the batch's latent std.
    pub code_noise: f64,
    /// Fine-tune only the decoder of this trained VAE folder: the encoder, and so the latent
    /// space a UNet was trained in, stays exactly as it was (as does `scaling_factor`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decoder_from: Option<PathBuf>,
}

impl Default for VaeTrainConfig {
    fn default() -> Self {
        Self {
            size: 32,
            seed: 1,
            steps: 900,
            batch: 16,
            lr: 1e-3,
            warmup: 50,
            channels: vec![16, 32, 64],
            latent_channels: 4,
            norm_groups: 8,
            latent_penalty: 1e-4,
            code_noise: 0.1,
            decoder_from: None,
        }
    }
}

impl VaeTrainConfig {
    /// diffusers' `vae/config.json` for this configuration (`scaling_factor` filled in later).
    pub fn diffusers_config(&self, scaling_factor: f64) -> serde_json::Value {
        let levels = self.channels.len();
        json!({
            "_class_name": "AutoencoderKL",
            "_diffusers_version": "0.42.1",
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": vec!["DownEncoderBlock2D"; levels],
            "up_block_types": vec!["UpDecoderBlock2D"; levels],
            "block_out_channels": self.channels,
            "layers_per_block": 1,
            "act_fn": "silu",
            "latent_channels": self.latent_channels,
            "norm_num_groups": self.norm_groups,
            "sample_size": self.size,
            "scaling_factor": scaling_factor,
            "mid_block_add_attention": false,
            "use_quant_conv": true,
            "use_post_quant_conv": true
        })
    }
}

pub struct VaeRun {
    pub run_dir: PathBuf,
    pub config: VaeTrainConfig,
    pub resume: Option<PathBuf>,
    /// How often it checkpoints, logs and evaluates.
    pub cadence: Cadence,
    /// Stop this invocation after this step (see [`LoopSpec::stop_after`]); nothing is exported.
    pub stop_after: Option<usize>,
    pub device: Device,
}

/// The VAE run's default cadence (also the `pretrain-vae` flags' defaults).
pub const DEFAULT_CADENCE: Cadence = Cadence {
    checkpoint_every: 150,
    log_every: 10,
    eval_every: 150,
};

impl VaeRun {
    /// The default VAE recipe for `size`x`size` images in `run_dir` on the CPU, continuing the
    /// run there if it has a checkpoint (what `pretrain` trains when it is given no VAE).
    pub fn default_in(run_dir: &Path, size: u32) -> Result<Self> {
        let resume = super::checkpoint::latest(run_dir)?.map(|_| run_dir.to_path_buf());
        Ok(Self {
            run_dir: run_dir.to_path_buf(),
            config: VaeTrainConfig {
                size,
                ..VaeTrainConfig::default()
            },
            resume,
            cadence: DEFAULT_CADENCE,
            stop_after: None,
            device: Device::Cpu,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeSummary {
    pub final_loss: f64,
    /// The step the run stands at, and the schedule's length: equal when the run is finished
    /// (only then is `model_dir` written).
    pub step: usize,
    pub total_steps: usize,
    pub psnr_db: f64,
    pub scaling_factor: f64,
    pub steps_per_second: f64,
    pub model_dir: PathBuf,
}

fn build(config: &VaeTrainConfig, vb: VarBuilder) -> Result<AutoencoderKl> {
    let cfg: VaeConfig = serde_json::from_value(config.diffusers_config(0.18215))
        .map_err(|e| PretrainError::Config(format!("vae config: {e}")))?;
    Ok(AutoencoderKl::new(vb, cfg)?)
}

/// Reconstruction PSNR (dB, on [0,1] after rounding to u8) and the latent std on `count` scenes
/// drawn from a seed the training never uses.
pub fn evaluate(
    vae: &AutoencoderKl,
    world: &SynthWorld,
    count: usize,
    device: &Device,
) -> Result<(f64, f64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(world.seed ^ 0x5eed_e7a1);
    let mut mse_sum = 0.0;
    let mut z_sq = 0.0;
    let mut z_sum = 0.0;
    let mut z_count = 0usize;
    let mut done = 0;
    while done < count {
        let n = (count - done).min(64);
        let images = data::scene_batch(world, &mut rng, n, device)?;
        let z = vae.encode_mode(&images)?;
        let recon = vae.decode(&z)?;
        let originals = data::tensor_to_images(&images)?;
        let decoded = data::tensor_to_images(&recon)?;
        for (a, b) in originals.iter().zip(&decoded) {
            let mse = a
                .as_raw()
                .iter()
                .zip(b.as_raw())
                .map(|(&x, &y)| {
                    let d = (x as f64 - y as f64) / 255.0;
                    d * d
                })
                .sum::<f64>()
                / a.as_raw().len() as f64;
            mse_sum += 10.0 * (1.0 / mse.max(1e-10)).log10();
        }
        let zf: Vec<f32> = z.flatten_all()?.to_vec1()?;
        z_sum += zf.iter().map(|&v| v as f64).sum::<f64>();
        z_sq += zf.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>();
        z_count += zf.len();
        done += n;
    }
    let mean = z_sum / z_count as f64;
    let std = (z_sq / z_count as f64 - mean * mean).max(1e-12).sqrt();
    Ok((mse_sum / count as f64, std))
}

pub fn train(run: &VaeRun) -> Result<VaeSummary> {
    let config = &run.config;
    let device = &run.device;
    let world = SynthWorld::new(config.size, config.seed);
    let varmap = VarMap::new();
    let vb = super::init::seeded_var_builder(&varmap, config.seed, device);
    let vae = build(config, vb)?;
    let mut vars = named_vars(&varmap);
    let mut fixed_scaling_factor = None;
    if let Some(from) = &config.decoder_from {
        let weights_path = from.join("diffusion_pytorch_model.safetensors");
        let weights = candle_core::safetensors::load(&weights_path, device).map_err(|e| {
            PretrainError::Checkpoint {
                path: weights_path.clone(),
                message: e.to_string(),
            }
        })?;
        checkpoint::load_varmap(&varmap, &weights, &weights_path)?;
        fixed_scaling_factor =
            Some(VaeConfig::from_file(&from.join("config.json"))?.scaling_factor);
        vars.retain(|(name, _)| {
            name.starts_with("decoder.") || name.starts_with("post_quant_conv.")
        });
    }
    let params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    tracing::info!("vae: {params} trained parameters");
    let mut optimizer = AdamW::new(vars, AdamWParams::with_lr(config.lr))?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let config_json = super::config_json("vae", config)?;
    let mut state = TrainState::new(&varmap, &mut optimizer, None, &mut rng);
    state.resume_from("vae", run.resume.as_deref(), &config_json, device)?;
    let spec = LoopSpec::cosine(
        &run.run_dir,
        "vae",
        (config.steps, config.lr, config.warmup),
        run.cadence,
        run.stop_after,
        config_json,
    );
    let summary = super::train_loop(
        &spec,
        state,
        |rng| {
            let images = data::scene_batch(&world, rng, config.batch, device)?;
            let mut z = vae.encode_mode(&images)?;
            if config.decoder_from.is_some() {
                z = z.detach();
            }
            let z_std = z
                .detach()
                .flatten_all()?
                .var(0)?
                .sqrt()?
                .to_scalar::<f32>()? as f64;
            let noise = data::randn(rng, z.dims(), device)?;
            let code = (&z + (noise * (config.code_noise * z_std))?)?;
            let recon = vae.decode(&code)?;
            let diff = (recon - &images)?;
            let loss = ((diff.abs()?.mean_all()? + diff.sqr()?.mean_all()?)?
                + (z.sqr()?.mean_all()? * config.latent_penalty)?)?;
            super::backprop(&loss)
        },
        |_| {
            let (psnr, std) = evaluate(&vae, &world, 128, device)?;
            Ok(json!({"psnr_db": psnr, "latent_std": std}))
        },
    )?;
    let (psnr, std) = evaluate(&vae, &world, 512, device)?;
    let scaling_factor = fixed_scaling_factor.unwrap_or(1.0 / std);
    let model_dir = run.run_dir.join("vae");
    if summary.reached >= config.steps {
        export(&varmap, config, scaling_factor, &model_dir)?;
    }
    let out = VaeSummary {
        final_loss: summary.final_loss,
        step: summary.reached,
        total_steps: config.steps,
        psnr_db: psnr,
        scaling_factor,
        steps_per_second: summary.steps_per_second(),
        model_dir,
    };
    write_json(&run.run_dir.join("vae.summary.json"), &out)?;
    Ok(out)
}

/// Writes `dir/config.json` and `dir/diffusion_pytorch_model.safetensors` (f32).
pub fn export(
    varmap: &VarMap,
    config: &VaeTrainConfig,
    scaling_factor: f64,
    dir: &Path,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(super::io_error(dir))?;
    write_json(
        &dir.join("config.json"),
        &config.diffusers_config(scaling_factor),
    )?;
    let tensors = checkpoint::varmap_tensors(varmap);
    let path = dir.join("diffusion_pytorch_model.safetensors");
    candle_core::safetensors::save(&tensors, &path).map_err(|e| PretrainError::Checkpoint {
        path,
        message: e.to_string(),
    })
}
