//! `rl4pix-train`: one binary for every offline job.

use clap::{Parser, Subcommand};
use rl4pix_training::commands;

#[derive(Parser)]
#[command(
    name = "rl4pix-train",
    version,
    about = "rl4pix offline tools: edit, synth, eval"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Edit one image with an instruction.
    Edit(commands::edit::EditArgs),
    /// Generate the synthetic world in MagicBrush's folder layout.
    Synth(commands::synth::SynthArgs),
    /// Score generated edits (or run the model) with MagicBrush's metrics.
    Eval(commands::eval::EvalArgs),
    /// Train the toy model's VAE on the synthetic world.
    PretrainVae(commands::pretrain_vae::PretrainVaeArgs),
    /// Train the toy InstructPix2Pix (UNet + text encoder) on the synthetic world.
    Pretrain(commands::pretrain::PretrainArgs),
    /// Train the small CLIP that scores CLIP-T on the synthetic world.
    PretrainClip(commands::pretrain_clip::PretrainClipArgs),
    /// Picture of the toy model's edits (input | instruction | output | target) for the README.
    ToyGrid(commands::pretrain::ToyGridArgs),
    /// Export a pretraining run's checkpoint to the diffusers layout (e.g. model/assets/toy).
    PretrainExport(commands::pretrain::PretrainExportArgs),
    /// RL fine-tuning (DDPO with PPO): train a LoRA adapter with the InstructRL4Pix reward.
    Ddpo(commands::ddpo::DdpoArgs),
    /// One command per table of the paper: synthetic data, DDPO run(s), evaluation, table files.
    Reproduce(commands::reproduce::ReproduceArgs),
    /// Which reward terms rank a turn's samples like the target does (run before RL).
    RewardAudit(commands::reward_audit::RewardAuditArgs),
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Edit(args) => commands::edit::run(args),
        Command::Synth(args) => commands::synth::run(args),
        Command::Eval(args) => commands::eval::run(args),
        Command::PretrainVae(args) => commands::pretrain_vae::run(args),
        Command::Pretrain(args) => commands::pretrain::run(args),
        Command::PretrainClip(args) => commands::pretrain_clip::run(args),
        Command::ToyGrid(args) => commands::pretrain::run_grid(args),
        Command::PretrainExport(args) => commands::pretrain::run_export(args),
        Command::Ddpo(args) => commands::ddpo::run(args),
        Command::RewardAudit(args) => commands::reward_audit::run(args),
        Command::Reproduce(args) => commands::reproduce::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
