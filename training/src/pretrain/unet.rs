//! `pretrain`: the InstructPix2Pix objective on the synthetic world. The UNet predicts the noise
//! added to the target's latents given the noisy latents concatenated with the source image's
//! latents (posterior mode, unscaled, as the pipeline feeds them) and the instruction's hidden
//! states; the text encoder is trained jointly. InstructPix2Pix's conditioning dropout (5% text
//! only, 5% image only, 5% both) makes both guidance scales meaningful.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rl4pix_model::scheduler::ddim::DdimScheduler;
use rl4pix_model::scheduler::SchedulerConfig;
use rl4pix_model::text_encoder::ClipTextConfig;
use rl4pix_model::tokenizer::ClipTokenizer;
use rl4pix_model::unet::{UNet2DConditionModel, UNetConfig};
use rl4pix_model::vae::AutoencoderKl;
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::text::{encode_batch, text_config, world_vocabulary, write_tokenizer, TrainTextEncoder};
use super::{
    checkpoint, data, io_error, read_json, write_json, LoopSpec, PretrainError, Result, TrainState,
};
use super::{Cadence, StepGrads};
use crate::optim::{named_vars, AdamW, AdamWParams, Ema};
use crate::synth::SynthWorld;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct UnetTrainConfig {
    pub size: u32,
    pub seed: u64,
    pub steps: usize,
    pub batch: usize,
    pub lr: f64,
    pub warmup: usize,
    pub channels: Vec<usize>,
    /// Cross-attention at each level (the mid block always has it).
    pub attention: Vec<bool>,
    pub layers_per_block: usize,
    pub heads: usize,
    pub norm_groups: usize,
    pub text_hidden: usize,
    pub text_layers: usize,
    pub text_heads: usize,
    pub max_length: usize,
    /// InstructPix2Pix's conditioning dropout probability (each of the three cases).
    pub dropout: f64,
    /// EMA decay; 0 disables EMA.
    pub ema_decay: f64,
    /// What the UNet predicts: `epsilon` (the noise, as InstructPix2Pix) or `v_prediction`
    /// (`sqrt(a) noise - sqrt(1 - a) x0`). Both are the same denoising objective in another
    /// parametrisation; epsilon's loss hardly weighs the high-noise steps where sampling decides
    /// the layout (an epsilon toy model's x0 estimate at t = 999 was worse than predicting zero),
    /// v weighs them by 1 / alpha_cumprod.
    #[serde(default = "epsilon")]
    pub prediction_type: String,
    /// Weights (UNet and text encoder) this run started from: another run's checkpoint of the
    /// same architecture. The optimizer, EMA and schedule start afresh.
    #[serde(default)]
    pub init_from: Option<PathBuf>,
}

/// Runs written before the choice existed predicted the noise.
fn epsilon() -> String {
    "epsilon".into()
}

impl Default for UnetTrainConfig {
    fn default() -> Self {
        Self {
            size: 32,
            seed: 2,
            steps: 6000,
            batch: 32,
            lr: 5e-4,
            warmup: 200,
            channels: vec![32, 64, 64],
            attention: vec![true, true, false],
            layers_per_block: 1,
            heads: 4,
            norm_groups: 16,
            text_hidden: 64,
            text_layers: 2,
            text_heads: 4,
            max_length: 32,
            dropout: 0.05,
            ema_decay: 0.999,
            prediction_type: "v_prediction".into(),
            init_from: None,
        }
    }
}

/// The toy model's noise schedule (Stable Diffusion's) and default scheduler.
pub fn scheduler_config_json(prediction_type: &str) -> serde_json::Value {
    json!({
        "_class_name": "EulerAncestralDiscreteScheduler",
        "_diffusers_version": "0.42.1",
        "num_train_timesteps": 1000,
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "beta_schedule": "scaled_linear",
        "prediction_type": prediction_type,
        "timestep_spacing": "leading",
        "steps_offset": 1,
        "set_alpha_to_one": false,
        "clip_sample": false,
        "trained_betas": null
    })
}

impl UnetTrainConfig {
    pub fn unet_config_json(&self, latent_channels: usize) -> serde_json::Value {
        let down: Vec<&str> = self
            .attention
            .iter()
            .map(|&a| {
                if a {
                    "CrossAttnDownBlock2D"
                } else {
                    "DownBlock2D"
                }
            })
            .collect();
        let up: Vec<&str> = self
            .attention
            .iter()
            .rev()
            .map(|&a| if a { "CrossAttnUpBlock2D" } else { "UpBlock2D" })
            .collect();
        json!({
            "_class_name": "UNet2DConditionModel",
            "_diffusers_version": "0.42.1",
            "sample_size": self.size as usize / 4,
            "in_channels": 2 * latent_channels,
            "out_channels": latent_channels,
            "down_block_types": down,
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "up_block_types": up,
            "block_out_channels": self.channels,
            "layers_per_block": self.layers_per_block,
            "attention_head_dim": self.heads,
            "cross_attention_dim": self.text_hidden,
            "norm_num_groups": self.norm_groups,
            "norm_eps": 1e-5,
            "act_fn": "silu",
            "flip_sin_to_cos": true,
            "freq_shift": 0,
            "downsample_padding": 1,
            "mid_block_scale_factor": 1,
            "use_linear_projection": true,
            "center_input_sample": false
        })
    }
}

pub struct UnetRun {
    pub run_dir: PathBuf,
    /// A trained VAE folder (diffusers layout: config.json + weights).
    pub vae_dir: PathBuf,
    pub config: UnetTrainConfig,
    pub resume: Option<PathBuf>,
    /// How often it checkpoints, logs and evaluates.
    pub cadence: Cadence,
    /// Stop this invocation after this step (see [`LoopSpec::stop_after`]).
    pub stop_after: Option<usize>,
    /// Split each batch across this many threads, one shard each (1: the whole batch on the
    /// calling thread). Changes speed only, not the batches drawn nor (up to float rounding) the
    /// gradients, so a run may be resumed with another value.
    pub data_parallel: usize,
    pub device: Device,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UnetSummary {
    pub final_loss: f64,
    /// The step the run stands at, and the schedule's length: equal when the run is finished.
    pub step: usize,
    pub total_steps: usize,
    pub steps_per_second: f64,
    pub unet_parameters: usize,
    pub text_parameters: usize,
}

/// The model being trained: UNet and text encoder in one VarMap (`unet.*`, `text_encoder.*`).
pub struct Trainee {
    pub varmap: VarMap,
    pub unet: UNet2DConditionModel,
    pub text: TrainTextEncoder,
}

/// Fresh variables are drawn from `seed` (see [`super::init`]).
pub fn build_trainee(run_dir: &Path, seed: u64, device: &Device) -> Result<Trainee> {
    let varmap = VarMap::new();
    let vb = super::init::seeded_var_builder(&varmap, seed, device);
    let unet_config_path = run_dir.join("unet_config.json");
    let unet_config: UNetConfig = read_json(&unet_config_path)?;
    let unet = UNet2DConditionModel::new(vb.pp("unet"), unet_config, &unet_config_path)?;
    let text_config_path = run_dir.join("text_encoder_config.json");
    let text_config = ClipTextConfig::from_file(&text_config_path)?;
    let text = TrainTextEncoder::new(vb.pp("text_encoder"), &text_config)?;
    Ok(Trainee { varmap, unet, text })
}

/// Writes the run's fixed files (configs, tokenizer, a copy of the VAE) unless already there.
fn prepare_run_dir(run: &UnetRun, vae_latent_channels: usize) -> Result<()> {
    let dir = &run.run_dir;
    std::fs::create_dir_all(dir).map_err(io_error(dir))?;
    let config = &run.config;
    let world = SynthWorld::new(config.size, config.seed);
    let (vocab, longest) = world_vocabulary(&world, 20_000);
    if longest + 2 > config.max_length {
        return Err(PretrainError::Config(format!(
            "the world's longest text has {longest} words; max_length {} is too short",
            config.max_length
        )));
    }
    write_tokenizer(&dir.join("tokenizer"), &vocab, config.max_length)?;
    let vocab_size = vocab.len() + 3;
    write_json(
        &dir.join("text_encoder_config.json"),
        &text_config(
            vocab_size,
            config.text_hidden,
            config.text_layers,
            config.text_heads,
            config.max_length,
        ),
    )?;
    write_json(
        &dir.join("unet_config.json"),
        &config.unet_config_json(vae_latent_channels),
    )?;
    write_json(
        &dir.join("scheduler_config.json"),
        &scheduler_config_json(&config.prediction_type),
    )?;
    let vae_copy = dir.join("vae");
    if vae_copy != run.vae_dir {
        std::fs::create_dir_all(&vae_copy).map_err(io_error(&vae_copy))?;
        for name in ["config.json", "diffusion_pytorch_model.safetensors"] {
            let from = run.vae_dir.join(name);
            let to = vae_copy.join(name);
            std::fs::copy(&from, &to).map_err(io_error(&from))?;
        }
    }
    Ok(())
}

/// One step's random draws: images, noise, timesteps, conditioning dropout and token ids.
struct DrawnBatch {
    sources: Tensor,
    targets: Tensor,
    noise: Tensor,
    timesteps: Vec<usize>,
    keep_image: Vec<f32>,
    ids: Tensor,
}

/// One single-threaded rayon pool per data-parallel shard (none for one shard): each shard's
/// forward and backward run whole on its own thread, so two cores work on two half-batches
/// instead of meeting at a barrier inside every small matmul and elementwise op.
fn shard_workers(count: usize) -> Result<Vec<rayon::ThreadPool>> {
    if count <= 1 {
        return Ok(Vec::new());
    }
    (0..count)
        .map(|i| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(move |_| format!("shard-{i}"))
                .build()
                .map_err(|e| PretrainError::Config(format!("data-parallel worker: {e}")))
        })
        .collect()
}

/// What the UNet is trained to output for noisy latents `signal * x0 + sigma * noise`: the noise,
/// or v = `signal * noise - sigma * x0`.
fn denoising_target(
    v_prediction: bool,
    noise: &Tensor,
    x0: &Tensor,
    signal: &Tensor,
    sigma: &Tensor,
) -> candle_core::Result<Tensor> {
    if v_prediction {
        noise.broadcast_mul(signal)? - x0.broadcast_mul(sigma)?
    } else {
        Ok(noise.clone())
    }
}

/// Per sample `(sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t))` at `timesteps`, as `(n, 1, 1, 1)`
/// tensors: the weights of the clean latent and of the noise in the noised one.
fn noise_levels(
    alphas_cumprod: &[f64],
    timesteps: &[usize],
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let n = timesteps.len();
    let signal: Vec<f32> = timesteps
        .iter()
        .map(|&t| alphas_cumprod[t].sqrt() as f32)
        .collect();
    let sigma: Vec<f32> = timesteps
        .iter()
        .map(|&t| (1.0 - alphas_cumprod[t]).sqrt() as f32)
        .collect();
    Ok((
        Tensor::from_vec(signal, (n, 1, 1, 1), device)?,
        Tensor::from_vec(sigma, (n, 1, 1, 1), device)?,
    ))
}

pub fn train(run: &UnetRun) -> Result<UnetSummary> {
    // A resumed run keeps the warm start it was begun with; it need not be repeated.
    let mut config = run.config.clone();
    if let (Some(resume), None) = (&run.resume, &config.init_from) {
        let ckpt = checkpoint::resolve(resume)?;
        if let Some(init) = ckpt.state.config.get("init_from").and_then(|v| v.as_str()) {
            config.init_from = Some(PathBuf::from(init));
        }
    }
    let config = &config;
    let device = &run.device;
    let vae = AutoencoderKl::load(&run.vae_dir, DType::F32, device)?;
    let scaling = vae.scaling_factor();
    if run.resume.is_none() {
        prepare_run_dir(run, vae.config.latent_channels)?;
    }
    let tokenizer = ClipTokenizer::from_dir(&run.run_dir.join("tokenizer"))?;
    let trainee = build_trainee(&run.run_dir, run.config.seed, device)?;
    if let (Some(init), None) = (&config.init_from, &run.resume) {
        let ckpt = checkpoint::resolve(init)?;
        ckpt.load_weights(&trainee.varmap, device)?;
        tracing::info!(
            "unet: starting from the weights of {} (step {})",
            ckpt.dir.display(),
            ckpt.state.step
        );
    }
    let v_prediction = match config.prediction_type.as_str() {
        "epsilon" => false,
        "v_prediction" => true,
        other => {
            return Err(PretrainError::Config(format!(
                "prediction_type `{other}`: expected epsilon or v_prediction"
            )))
        }
    };
    let scheduler_config: SchedulerConfig =
        serde_json::from_value(scheduler_config_json(&config.prediction_type))
            .map_err(|e| PretrainError::Config(format!("scheduler config: {e}")))?;
    let alphas_cumprod = DdimScheduler::new(&scheduler_config, 1, 0.0)?
        .alphas_cumprod()
        .to_vec();
    let train_steps = alphas_cumprod.len();

    let vars = named_vars(&trainee.varmap);
    let count = |prefix: &str| -> usize {
        vars.iter()
            .filter(|(n, _)| n.starts_with(prefix))
            .map(|(_, v)| v.elem_count())
            .sum()
    };
    let (unet_parameters, text_parameters) = (count("unet."), count("text_encoder."));
    tracing::info!("unet: {unet_parameters} parameters, text encoder: {text_parameters}");
    let mut ema = if config.ema_decay > 0.0 {
        Some(Ema::new(&vars, config.ema_decay)?)
    } else {
        None
    };
    let mut optimizer = AdamW::new(vars, AdamWParams::with_lr(config.lr))?;
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    let config_json = super::config_json("unet", config)?;
    let mut state = TrainState::new(&trainee.varmap, &mut optimizer, ema.as_mut(), &mut rng);
    state.resume_from("unet", run.resume.as_deref(), &config_json, device)?;

    let world = SynthWorld::new(config.size, config.seed);
    let latent_channels = vae.config.latent_channels;
    let latent_size = config.size as usize / vae.config.scale_factor();
    let empty_ids = encode_batch(&tokenizer, &[""], device)?;
    // Everything random is drawn here, in one order, whatever the shard count: a run resumed
    // with another --data-parallel draws the same batches and noise.
    let draw = |rng: &mut ChaCha8Rng| -> Result<DrawnBatch> {
        let batch = data::edit_batch(&world, rng, config.batch);
        let b = config.batch;
        let sources = data::images_to_tensor(&batch.sources.iter().collect::<Vec<_>>(), device)?;
        let targets = data::images_to_tensor(&batch.targets.iter().collect::<Vec<_>>(), device)?;
        let noise = data::randn(rng, &[b, latent_channels, latent_size, latent_size], device)?;
        let timesteps = data::random_timesteps(rng, b, train_steps);
        let mut prompts = Vec::with_capacity(b);
        let mut keep_image = Vec::with_capacity(b);
        for instruction in batch.instructions {
            let p: f64 = rng.random();
            let drop_text = p < 2.0 * config.dropout;
            let drop_image = p >= config.dropout && p < 3.0 * config.dropout;
            prompts.push(if drop_text {
                String::new()
            } else {
                instruction
            });
            keep_image.push(if drop_image { 0f32 } else { 1f32 });
        }
        let prompt_refs: Vec<&str> = prompts.iter().map(String::as_str).collect();
        Ok(DrawnBatch {
            sources,
            targets,
            noise,
            timesteps,
            keep_image,
            ids: encode_batch(&tokenizer, &prompt_refs, device)?,
        })
    };
    // The loss of rows `rows` of a drawn batch, weighted by their share of the batch, and its
    // gradients: the shards' gradients add up to the whole batch's.
    let shard_grads = |drawn: &DrawnBatch, rows: std::ops::Range<usize>| -> Result<StepGrads> {
        let (first, n) = (rows.start, rows.len());
        let both = vae.encode_mode(&Tensor::cat(
            &[
                &drawn.sources.narrow(0, first, n)?,
                &drawn.targets.narrow(0, first, n)?,
            ],
            0,
        )?)?;
        let source_latents = both.narrow(0, 0, n)?;
        let target_latents = (both.narrow(0, n, n)? * scaling)?;
        let timesteps = &drawn.timesteps[rows.clone()];
        let (signal, sigma) = noise_levels(&alphas_cumprod, timesteps, device)?;
        let noise = drawn.noise.narrow(0, first, n)?;
        let noisy = (target_latents.broadcast_mul(&signal)? + noise.broadcast_mul(&sigma)?)?;
        let keep_image = Tensor::from_vec(
            drawn.keep_image[rows.clone()].to_vec(),
            (n, 1, 1, 1),
            device,
        )?;
        let image_latents = source_latents.broadcast_mul(&keep_image)?;
        let context = trainee.text.forward(&drawn.ids.narrow(0, first, n)?)?;
        let t = Tensor::from_vec(
            timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            n,
            device,
        )?;
        let input = Tensor::cat(&[&noisy, &image_latents], 1)?;
        let pred = trainee.unet.forward(&input, &t, &context)?;
        let target = denoising_target(v_prediction, &noise, &target_latents, &signal, &sigma)?;
        let share = n as f64 / drawn.timesteps.len() as f64;
        super::backprop(&((pred - target)?.sqr()?.mean_all()? * share)?)
    };
    let workers = shard_workers(run.data_parallel.clamp(1, config.batch))?;
    let step = |rng: &mut ChaCha8Rng| -> Result<StepGrads> {
        let drawn = draw(rng)?;
        let b = config.batch;
        if workers.is_empty() {
            return shard_grads(&drawn, 0..b);
        }
        let shards: Vec<std::ops::Range<usize>> = (0..workers.len())
            .map(|i| i * b / workers.len()..(i + 1) * b / workers.len())
            .collect();
        // The first shard goes to its pool from this thread (which waits), the others from
        // spawned threads; their gradients are added to the first's.
        std::thread::scope(|scope| {
            let others: Vec<_> = workers[1..]
                .iter()
                .zip(&shards[1..])
                .map(|(pool, rows)| {
                    let (drawn, shard_grads) = (&drawn, &shard_grads);
                    scope.spawn(move || pool.install(|| shard_grads(drawn, rows.clone())))
                })
                .collect();
            let mut total = workers[0].install(|| shard_grads(&drawn, shards[0].clone()))?;
            for handle in others {
                // A shard that panicked panics here as the whole batch would have.
                let shard = handle
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))?;
                total.loss += shard.loss;
                total.grads.extend(shard.grads)?;
            }
            Ok(total)
        })
    };
    // A fixed held-out batch (own seed) scored at fixed timesteps and noise: a smooth
    // validation loss of the live weights.
    let validation = {
        let mut vrng = ChaCha8Rng::seed_from_u64(config.seed ^ 0x7a11_da7e);
        let held_out = SynthWorld::new(config.size, config.seed ^ 0x7a11_da7e);
        let batch = data::edit_batch(&held_out, &mut vrng, 64);
        let sources = data::images_to_tensor(&batch.sources.iter().collect::<Vec<_>>(), device)?;
        let targets = data::images_to_tensor(&batch.targets.iter().collect::<Vec<_>>(), device)?;
        let source_latents = vae.encode_mode(&sources)?;
        let target_latents = (vae.encode_mode(&targets)? * scaling)?;
        let noise = data::randn(&mut vrng, target_latents.dims(), device)?;
        let timesteps: Vec<usize> = (0..64).map(|i| (i * train_steps) / 64 + 7).collect();
        let prompts: Vec<&str> = batch.instructions.iter().map(String::as_str).collect();
        let ids = encode_batch(&tokenizer, &prompts, device)?;
        (source_latents, target_latents, noise, timesteps, ids)
    };
    let eval = |_step: usize| -> Result<serde_json::Value> {
        let (source_latents, target_latents, noise, timesteps, ids) = &validation;
        let b = timesteps.len();
        let timesteps: Vec<usize> = timesteps.iter().map(|&t| t.min(train_steps - 1)).collect();
        let (signal, sigma) = noise_levels(&alphas_cumprod, &timesteps, device)?;
        let noisy = (target_latents.broadcast_mul(&signal)? + noise.broadcast_mul(&sigma)?)?;
        let context = trainee.text.forward(ids)?.detach();
        let t = Tensor::from_vec(
            timesteps.iter().map(|&t| t as f32).collect::<Vec<_>>(),
            b,
            device,
        )?;
        let input = Tensor::cat(&[&noisy, source_latents], 1)?;
        let target = denoising_target(v_prediction, noise, target_latents, &signal, &sigma)?;
        let pred = trainee.unet.forward(&input, &t, &context)?.detach();
        let loss = (pred - &target)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        // Also the loss with the text dropped: the gap shows the instruction is being used.
        let empty = empty_ids.repeat((b, 1))?;
        let context = trainee.text.forward(&empty)?.detach();
        let pred = trainee.unet.forward(&input, &t, &context)?.detach();
        let no_text = (pred - target)?.sqr()?.mean_all()?.to_scalar::<f32>()? as f64;
        Ok(json!({"val_loss": loss, "val_loss_no_text": no_text}))
    };
    let spec = LoopSpec::cosine(
        &run.run_dir,
        "unet",
        (config.steps, config.lr, config.warmup),
        run.cadence,
        run.stop_after,
        config_json,
    );
    let summary = super::train_loop(&spec, state, step, eval)?;
    let out = UnetSummary {
        final_loss: summary.final_loss,
        step: summary.reached,
        total_steps: config.steps,
        steps_per_second: summary.steps_per_second(),
        unet_parameters,
        text_parameters,
    };
    write_json(&run.run_dir.join("unet.summary.json"), &out)?;
    Ok(out)
}
