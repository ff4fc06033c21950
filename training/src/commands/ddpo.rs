//! `rl4pix-train ddpo`: RL fine-tuning (DDPO with PPO) of a LoRA adapter on the UNet with the
//! InstructRL4Pix reward; writes the adapter in diffusers' format.

use std::path::PathBuf;

use anyhow::Context;
use candle_core::Device;
use rl4pix_model::pipeline::InstructPix2Pix;

use super::DdpoOverrides;
use crate::ddpo::prompts::load_prompts;
use crate::ddpo::Trainer;

#[derive(clap::Args, Debug)]
pub struct DdpoArgs {
    /// Model folder in the diffusers layout (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// MagicBrush-format data set with masks: a folder with edit_sessions.json, a parquet file, or
    /// a folder of parquet shards.
    #[arg(long, required_unless_present = "print_config")]
    pub dataset: Option<PathBuf>,
    /// Where to write the trained adapter (.safetensors, diffusers' LoRA format): a path, or
    /// an object that serving replicas poll (s3://bucket/prefix/name.safetensors).
    #[arg(long, required_unless_present = "print_config")]
    pub out: Option<PathBuf>,
    /// Starting values: `paper` (Table 4), `cpu` (a faster start for two CPU cores) or `group`
    /// (our recipe: group sampling, the model's own guidance, L_att from the frozen base).
    #[arg(long, default_value = "paper")]
    pub preset: String,
    #[command(flatten)]
    pub overrides: DdpoOverrides,
    /// Continue from a checkpoint folder (or a run folder: its latest checkpoint); overrides
    /// `resume_from`.
    #[arg(long)]
    pub resume: Option<PathBuf>,
    /// CPU threads for tensor work (sets RAYON_NUM_THREADS; default: all cores). On a busy
    /// machine 1 is often several times faster: candle's workers spin-wait for each other.
    #[arg(long)]
    pub threads: Option<usize>,
    /// Print the resolved configuration as TOML (a starting `--config` file) and exit.
    #[arg(long)]
    pub print_config: bool,
}

pub fn run(args: DdpoArgs) -> anyhow::Result<()> {
    super::set_tensor_threads(args.threads)?;
    let config = args.overrides.build(&args.preset)?;
    if args.print_config {
        print!("{}", toml::to_string_pretty(&config)?);
        return Ok(());
    }
    let (Some(dataset), Some(out)) = (args.dataset, args.out) else {
        anyhow::bail!("--dataset and --out are required");
    };
    let out = crate::publish::AdapterDestination::parse(&out)?;
    let model_dir = crate::commands::edit::resolve_model_dir(args.model)?;
    let device = Device::Cpu;
    let pipeline = InstructPix2Pix::load(&model_dir, &device)?;
    let prompts = load_prompts(&dataset, &config.data, pipeline.vae_scale_factor() as u32)?;
    tracing::info!(
        model = %model_dir.display(),
        prompts = prompts.len(),
        size = ?prompts[0].source.dimensions(),
        logdir = %config.logdir,
        "ddpo start"
    );
    let resume = args
        .resume
        .or_else(|| (!config.resume_from.is_empty()).then(|| PathBuf::from(&config.resume_from)));
    let mut trainer = Trainer::new(&pipeline, config.clone(), prompts)?;
    if !config.validation.dataset.is_empty() {
        let validation = load_prompts(
            std::path::Path::new(&config.validation.dataset),
            &crate::ddpo::config::DataConfig {
                max_prompts: config.validation.max_turns,
                ..config.data.clone()
            },
            pipeline.vae_scale_factor() as u32,
        )
        .with_context(|| format!("validation data set {}", config.validation.dataset))?;
        trainer.set_validation(validation)?;
    }
    if let Some(from) = resume {
        trainer.resume(&from)?;
        tracing::info!(epoch = trainer.epochs_completed(), from = %from.display(), "resumed");
    }
    let config_path = trainer.run_dir().join("config.json");
    std::fs::create_dir_all(trainer.run_dir())
        .with_context(|| format!("{}: cannot create", trainer.run_dir().display()))?;
    std::fs::write(
        &config_path,
        serde_json::to_string_pretty(&config.to_json())? + "\n",
    )
    .with_context(|| format!("{}: cannot write", config_path.display()))?;

    trainer.run(std::io::IsTerminal::is_terminal(&std::io::stderr()))?;

    let adapter = trainer.adapter(&out.adapter_name())?;
    adapter.save(&out.local_path()?)?;
    let out = out.publish()?;
    tracing::info!(
        %out,
        summary = %trainer.reward_summary(),
        "adapter written"
    );
    Ok(())
}
