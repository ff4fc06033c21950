//! `rl4pix-train reproduce --table 1|2`: one command per table of the paper, in miniature.
//!
//! Table 1: synthesize the training world and a test set from an unseen seed, train a DDPO adapter
//! and evaluate the base model, the adapter and the identity baseline (output = source) on the test
//! set with one sampler. Table 2: the paper's reward ablation (attention only, clip only, both,
//! plus our localization reward when configured), each run evaluated the same way.
//!
//! Every stage is resumable: a synthetic folder with the same parameters is kept, a DDPO run
//! continues from its latest checkpoint (a finished one is not rerun), and an evaluation whose
//! inputs (model, adapter bytes, test set, sampler) are unchanged is read back instead of redone.
//! Runs are named by their reward, so Table 1's run is one of Table 2's.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use rl4pix_model::pipeline::{InstructPix2Pix, SamplingDefaults};
use rl4pix_model::scheduler::SchedulerKind;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::commands::eval::{Baseline, EvalArgs};
use crate::ddpo::prompts::load_prompts;
use crate::ddpo::trainer::{list_checkpoints, CHECKPOINTS_DIR, LOG_FILE};
use crate::ddpo::{DdpoConfig, EpochLog, Trainer};
use crate::eval::{EvalReport, SettingSummary};
use crate::synth::{write_folder, SynthWorld, DEFAULT_SIZE};

/// Written next to a synthetic folder: what it holds, so a rerun can keep it.
const SYNTH_MANIFEST: &str = "rl4pix_synth.json";
/// Written into a DDPO run folder once its adapter is saved.
const RUN_DONE_FILE: &str = "done.json";
const RUN_ADAPTER_FILE: &str = "adapter.safetensors";
/// The pass condition: edit-region L1 at most this much above the base's.
const EDIT_L1_TOLERANCE: f64 = 0.05;

#[derive(clap::Args, Debug)]
pub struct ReproduceArgs {
    /// Which table: 1 (base vs + RL adapter vs identity) or 2 (reward ablation).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub table: u8,
    /// Model folder in the diffusers layout (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Run folder: world/, test/, runs/<reward>/, eval/, table<N>.md and table<N>.json.
    #[arg(long, default_value = "runs/reproduce")]
    pub out: PathBuf,
    /// Seed of the training world.
    #[arg(long, default_value_t = 11)]
    pub train_seed: u64,
    /// Seed of the test set (must differ from --train-seed: the test set is unseen).
    #[arg(long, default_value_t = 12345)]
    pub test_seed: u64,
    /// Sessions in the training world.
    #[arg(long, default_value_t = 2000)]
    pub train_count: u64,
    /// Sessions in the test set.
    #[arg(long, default_value_t = 300)]
    pub test_count: u64,
    /// Image side of both synthetic sets (default: the size the model was trained at, from its
    /// model_index.json, else the synthetic world's default).
    #[arg(long)]
    pub size: Option<u32>,
    /// DDPO starting values: `cpu` (the faster start for two CPU cores) or `paper` (Table 4).
    #[arg(long, default_value = "cpu")]
    pub preset: String,
    /// TOML file of DDPO config keys, applied over the preset.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// DDPO `key=value` override, repeatable, applied last. `logdir` and `resume_from` are set by
    /// this command (runs/<reward> under --out).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub sets: Vec<String>,
    /// CPU threads for tensor work and synthesis (sets RAYON_NUM_THREADS; default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Sampler of every evaluated row: `eval` (eval's defaults: the model's scheduler and
    /// guidance (`model_index.json` → `rl4pix.sampling`, else 7.5 / 1.5), eta 0, 20 steps) or
    /// `policy` (the DDPO policy's: DDIM with sample.eta, sample.guidance_scale /
    /// sample.image_guidance_scale, sample.num_steps).
    #[arg(long, value_enum, default_value = "eval")]
    pub eval_sampler: EvalSampler,
    /// Denoising steps of the evaluation (overrides the sampler's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Base seed of the evaluation's per-turn seeds.
    #[arg(long, default_value_t = 0)]
    pub eval_seed: u64,
    /// CLIP model folder for CLIP-T (default: the model folder's `clip/` when it has one, as the
    /// embedded model does; else no CLIP-T).
    #[arg(long)]
    pub clip: Option<PathBuf>,
    /// No CLIP-T column.
    #[arg(long, conflicts_with = "clip")]
    pub no_clip: bool,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum EvalSampler {
    /// `eval`'s defaults.
    Eval,
    /// The DDPO policy's sampler.
    Policy,
}

/// What one synthetic folder holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SynthSpec {
    pub seed: u64,
    pub count: u64,
    pub size: u32,
}

#[derive(Debug, Serialize, Deserialize)]
struct SynthManifest {
    #[serde(flatten)]
    spec: SynthSpec,
    /// False while the folder is being written: a rerun then writes it again.
    complete: bool,
}

/// The sampler every row of a table is evaluated with.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SamplerSpec {
    pub kind: EvalSampler,
    /// `None`: the model's own scheduler.
    pub scheduler: Option<String>,
    pub eta: f64,
    pub steps: Option<usize>,
    pub guidance_scale: f64,
    pub image_guidance_scale: f64,
    pub seed: u64,
}

/// One DDPO run of a table: its reward and what training did.
#[derive(Debug, Clone, Serialize)]
pub struct RunSummary {
    /// `attn`, `clip`, `both` or `ours`.
    pub name: String,
    pub run_dir: PathBuf,
    pub adapter: PathBuf,
    pub attention_weight: f64,
    pub alpha: f64,
    pub localization_weight: f64,
    pub epochs: usize,
    pub reward_first_tenth: Option<f64>,
    pub reward_last_tenth: Option<f64>,
    pub seconds_per_epoch: Option<f64>,
}

/// One row of a table.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// `base`, `identity`, or the run's name.
    pub name: String,
    pub label: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run: Option<RunSummary>,
    pub all_turn: SettingSummary,
    pub final_turn: SettingSummary,
    /// Against the base (adapter rows only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verdict: Option<Verdict>,
}

/// An adapter row against the base row, all-turn setting: which of the paper's four metrics it
/// wins and whether its edit-region L1 stays within 5% of the base's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verdict {
    /// Of `l1`, `l2`, `ssim`, `psnr`.
    pub wins: Vec<String>,
    pub edit_l1: Option<f64>,
    pub base_edit_l1: Option<f64>,
    /// Adapter edit-region L1 / base edit-region L1.
    pub edit_l1_ratio: Option<f64>,
    pub edit_l1_within_5_percent: bool,
    /// At least 3 of the 4 won and edit-region L1 within 5%.
    pub pass: bool,
}

/// Compares an adapter's all-turn summary with the base's.
pub fn verdict(adapter: &SettingSummary, base: &SettingSummary) -> Verdict {
    let lower = |a: Option<f64>, b: Option<f64>| matches!((a, b), (Some(a), Some(b)) if a < b);
    let mut wins = Vec::new();
    for (name, won) in [
        ("l1", lower(adapter.l1, base.l1)),
        ("l2", lower(adapter.l2, base.l2)),
        ("ssim", lower(base.ssim, adapter.ssim)),
        ("psnr", lower(base.psnr, adapter.psnr)),
    ] {
        if won {
            wins.push(name.to_string());
        }
    }
    let edit_l1_ratio = match (adapter.edit_l1, base.edit_l1) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let within = match (adapter.edit_l1, base.edit_l1) {
        (Some(a), Some(b)) => a <= b * (1.0 + EDIT_L1_TOLERANCE),
        _ => false,
    };
    Verdict {
        pass: wins.len() >= 3 && within,
        wins,
        edit_l1: adapter.edit_l1,
        base_edit_l1: base.edit_l1,
        edit_l1_ratio,
        edit_l1_within_5_percent: within,
    }
}

pub fn run(args: ReproduceArgs) -> anyhow::Result<()> {
    if let Some(threads) = args.threads {
        anyhow::ensure!(threads > 0, "--threads must be at least 1");
        // Read once, when candle's and gemm's thread pools start: before any tensor exists.
        std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
    }
    anyhow::ensure!(
        args.train_seed != args.test_seed,
        "--train-seed and --test-seed are both {}: the test set must come from an unseen seed",
        args.train_seed
    );
    anyhow::ensure!(args.train_count > 0, "--train-count must be at least 1");
    anyhow::ensure!(args.test_count > 0, "--test-count must be at least 1");
    if let Some(steps) = args.steps {
        anyhow::ensure!(steps > 0, "--steps must be at least 1");
    }
    let model_dir = crate::commands::edit::resolve_model_dir(args.model.clone())?;
    let size = match args.size {
        Some(size) => size,
        None => model_training_size(&model_dir).unwrap_or(DEFAULT_SIZE),
    };
    anyhow::ensure!(size >= 12, "--size must be at least 12 pixels (got {size})");
    let base_config = DdpoConfig::build(&args.preset, args.config.as_deref(), &args.sets)?;
    if !base_config.resume_from.is_empty() {
        tracing::warn!(
            resume_from = %base_config.resume_from,
            "resume_from is ignored: reproduce resumes its own runs under --out"
        );
    }
    let variants = match args.table {
        1 => vec![table1_variant(&base_config)?],
        _ => table2_variants(&base_config),
    };
    let clip = resolve_clip(&args, &model_dir);
    let threads = args
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));

    let world_spec = SynthSpec {
        seed: args.train_seed,
        count: args.train_count,
        size,
    };
    let test_spec = SynthSpec {
        seed: args.test_seed,
        count: args.test_count,
        size,
    };
    let world_dir = args.out.join("world");
    let test_dir = args.out.join("test");
    ensure_synth(&world_dir, &world_spec, threads)?;
    ensure_synth(&test_dir, &test_spec, threads)?;

    let pipeline = InstructPix2Pix::load(&model_dir, &Device::Cpu)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    let fingerprint = pipeline.unet.fingerprint().to_string();
    let model_sampling = pipeline.sampling_defaults;
    let progress = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let mut runs = Vec::new();
    for variant in &variants {
        let mut config = variant.config.clone();
        config.logdir = args
            .out
            .join("runs")
            .join(&variant.name)
            .display()
            .to_string();
        config.resume_from = String::new();
        runs.push(train_variant(
            &pipeline,
            &variant.name,
            &config,
            &world_dir,
            progress,
        )?);
    }
    drop(pipeline);

    let sampler = sampler_spec(&args, &base_config, model_sampling);
    let evaluator = EvalContext {
        out: args.out.join("eval"),
        test_dir: test_dir.clone(),
        test_spec: test_spec.clone(),
        model_dir: model_dir.clone(),
        fingerprint: fingerprint.clone(),
        sampler: sampler.clone(),
        clip: clip.clone(),
    };
    let base = evaluator.evaluate("base", None)?;
    let identity = evaluator.evaluate("identity", None)?;
    let mut rows = vec![Row {
        name: "base".into(),
        label: "base".into(),
        run: None,
        all_turn: base.all_turn.clone(),
        final_turn: base.final_turn.clone(),
        verdict: None,
    }];
    for run in &runs {
        let report = evaluator.evaluate(&run.name, Some(&run.adapter))?;
        let label = match args.table {
            1 => format!("+ RL adapter ({})", reward_label(run)),
            _ => format!("+ RL, {}", variant_title(&run.name)),
        };
        rows.push(Row {
            name: run.name.clone(),
            label,
            run: Some(run.clone()),
            verdict: Some(verdict(&report.all_turn, &base.all_turn)),
            all_turn: report.all_turn,
            final_turn: report.final_turn,
        });
    }
    rows.push(Row {
        name: "identity".into(),
        label: "identity (no edit)".into(),
        run: None,
        all_turn: identity.all_turn,
        final_turn: identity.final_turn,
        verdict: None,
    });

    let table = Table {
        table: args.table,
        model: model_dir.display().to_string(),
        base_fingerprint: fingerprint,
        train_world: SetInfo {
            path: world_dir.display().to_string(),
            spec: world_spec,
        },
        test_set: SetInfo {
            path: test_dir.display().to_string(),
            spec: test_spec,
        },
        sampler,
        clip: clip.as_ref().map(|p| p.display().to_string()),
        ddpo_config: base_config.to_json(),
        rows,
    };
    let markdown = table.to_markdown();
    let name = format!("table{}", args.table);
    write_text(
        &args.out.join(format!("{name}.json")),
        &(serde_json::to_string_pretty(&table)? + "\n"),
    )?;
    write_text(&args.out.join(format!("{name}.md")), &markdown)?;
    print!("{markdown}");
    tracing::info!(out = %args.out.display(), "{name}.md and {name}.json written");
    Ok(())
}

/// The `size` of `model_index.json`'s `rl4pix.training_config`, for models this project trained.
fn model_training_size(model_dir: &Path) -> Option<u32> {
    let text = std::fs::read_to_string(model_dir.join("model_index.json")).ok()?;
    let index: Value = serde_json::from_str(&text).ok()?;
    let size = index
        .get("rl4pix")?
        .get("training_config")?
        .get("size")?
        .as_u64()?;
    u32::try_from(size).ok()
}

/// `--clip`, else the model folder's own `clip/` (the embedded model ships one for its world).
fn resolve_clip(args: &ReproduceArgs, model_dir: &Path) -> Option<PathBuf> {
    if args.no_clip {
        return None;
    }
    if let Some(dir) = &args.clip {
        return Some(dir.clone());
    }
    let own = model_dir.join("clip");
    own.join("config.json").is_file().then_some(own)
}

// ------------------------------------------------------------------ synthetic sets

/// Writes the synthetic set `spec` into `dir` unless a complete one with the same parameters is
/// already there. A folder holding anything else is refused rather than overwritten.
fn ensure_synth(dir: &Path, spec: &SynthSpec, threads: usize) -> anyhow::Result<()> {
    let manifest_path = dir.join(SYNTH_MANIFEST);
    if manifest_path.is_file() {
        let text = std::fs::read_to_string(&manifest_path)
            .with_context(|| format!("reading {}", manifest_path.display()))?;
        let manifest: SynthManifest = serde_json::from_str(&text).with_context(|| {
            format!("{}: not a synthetic set manifest", manifest_path.display())
        })?;
        if manifest.spec != *spec {
            bail!(
                "{} holds a synthetic set with seed {}, {} sessions, size {} (asked: seed {}, {} sessions, size {}): choose another --out or remove it",
                dir.display(),
                manifest.spec.seed,
                manifest.spec.count,
                manifest.spec.size,
                spec.seed,
                spec.count,
                spec.size
            );
        }
        if manifest.complete && dir.join(crate::data::SESSIONS_FILE).is_file() {
            tracing::info!(dir = %dir.display(), "synthetic set already there: kept");
            return Ok(());
        }
    } else if dir.is_dir()
        && std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} is not empty and was not written by `reproduce` (no {SYNTH_MANIFEST}): choose another --out",
            dir.display()
        );
    }
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let write_manifest = |complete: bool| -> anyhow::Result<()> {
        let manifest = SynthManifest {
            spec: spec.clone(),
            complete,
        };
        write_text(
            &manifest_path,
            &(serde_json::to_string_pretty(&manifest)? + "\n"),
        )
    };
    write_manifest(false)?;
    let started = std::time::Instant::now();
    let world = SynthWorld::new(spec.size, spec.seed);
    let summary = write_folder(&world, dir, spec.count, threads, &|| {})
        .with_context(|| format!("writing the synthetic set {}", dir.display()))?;
    write_manifest(true)?;
    tracing::info!(
        dir = %dir.display(),
        sessions = summary.sessions,
        turns = summary.turns,
        seed = spec.seed,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "synthetic set written"
    );
    Ok(())
}

// ------------------------------------------------------------------ DDPO runs

/// A reward setting of a table, named for its run folder.
struct Variant {
    name: String,
    config: DdpoConfig,
}

/// The run folder's name for a reward: `ours` whenever the localization term is on, else the
/// paper's ablation names.
fn reward_name(config: &DdpoConfig) -> anyhow::Result<&'static str> {
    let r = &config.reward;
    Ok(
        match (r.attention_weight != 0.0, r.alpha != 0.0, r.localization_weight != 0.0) {
            (_, _, true) => "ours",
            (true, true, false) => "both",
            (true, false, false) => "attn",
            (false, true, false) => "clip",
            (false, false, false) => bail!(
                "the reward has no term: reward.attention_weight, reward.alpha and reward.localization_weight are all 0"
            ),
        },
    )
}

fn table1_variant(config: &DdpoConfig) -> anyhow::Result<Variant> {
    Ok(Variant {
        name: reward_name(config)?.to_string(),
        config: config.clone(),
    })
}

/// The paper's three rewards with the configured weights (the paper's 1 and -1 where the
/// configuration zeroes one), plus the configuration itself when it uses our localization term.
fn table2_variants(config: &DdpoConfig) -> Vec<Variant> {
    let paper = DdpoConfig::paper().reward;
    let attention = match config.reward.attention_weight {
        w if w != 0.0 => w,
        _ => paper.attention_weight,
    };
    let alpha = match config.reward.alpha {
        a if a != 0.0 => a,
        _ => paper.alpha,
    };
    let with = |name: &str, attention_weight: f64, alpha: f64| {
        let mut c = config.clone();
        c.reward.attention_weight = attention_weight;
        c.reward.alpha = alpha;
        c.reward.localization_weight = 0.0;
        Variant {
            name: name.into(),
            config: c,
        }
    };
    let mut variants = vec![
        with("attn", attention, 0.0),
        with("clip", 0.0, alpha),
        with("both", attention, alpha),
    ];
    if config.reward.localization_weight != 0.0 {
        variants.push(Variant {
            name: "ours".into(),
            config: config.clone(),
        });
    }
    variants
}

fn variant_title(name: &str) -> &'static str {
    match name {
        "attn" => "attention only",
        "clip" => "clip only",
        "both" => "attention + clip",
        _ => "ours (+ localization)",
    }
}

/// The reward as a formula, e.g. `L_att - L_clip` or `L_att - 0.5·L_clip + L_loc`.
fn reward_label(run: &RunSummary) -> String {
    let mut label = String::new();
    for (weight, term) in [
        (run.attention_weight, "L_att"),
        (run.alpha, "L_clip"),
        (run.localization_weight, "L_loc"),
    ] {
        if weight == 0.0 {
            continue;
        }
        let sign = match (label.is_empty(), weight < 0.0) {
            (true, false) => "",
            (true, true) => "-",
            (false, false) => " + ",
            (false, true) => " - ",
        };
        let magnitude = weight.abs();
        if magnitude == 1.0 {
            label.push_str(&format!("{sign}{term}"));
        } else {
            label.push_str(&format!("{sign}{magnitude}·{term}"));
        }
    }
    label
}

/// The configuration keys a run's identity depends on: all but its length, checkpointing and
/// folder, which may change between reruns.
fn comparable_config(config: &Value) -> Vec<(String, Value)> {
    let mut flat = Vec::new();
    flatten_json(config, "", &mut flat);
    flat.retain(|(key, _)| {
        !matches!(
            key.as_str(),
            "num_epochs" | "save_freq" | "num_checkpoint_limit" | "logdir" | "resume_from"
        )
    });
    flat
}

fn flatten_json(value: &Value, prefix: &str, out: &mut Vec<(String, Value)>) {
    match value {
        Value::Object(map) => {
            for (key, v) in map {
                let key = if prefix.is_empty() {
                    key.clone()
                } else {
                    format!("{prefix}.{key}")
                };
                flatten_json(v, &key, out);
            }
        }
        other => out.push((prefix.to_string(), other.clone())),
    }
}

/// Refuses to continue a run that was started with another configuration.
fn check_same_config(run_dir: &Path, config: &DdpoConfig) -> anyhow::Result<()> {
    let path = run_dir.join("config.json");
    let Ok(text) = std::fs::read_to_string(&path) else {
        return Ok(());
    };
    let saved: Value =
        serde_json::from_str(&text).with_context(|| format!("{}: not JSON", path.display()))?;
    let saved = comparable_config(&saved);
    let now = comparable_config(&config.to_json());
    let differences: Vec<String> = now
        .iter()
        .filter_map(|(key, value)| {
            let before = saved.iter().find(|(k, _)| k == key).map(|(_, v)| v);
            (before != Some(value)).then(|| {
                format!(
                    "{key}: {} before, {value} now",
                    before.map_or("absent".to_string(), |v| v.to_string())
                )
            })
        })
        .collect();
    if !differences.is_empty() {
        bail!(
            "{} was trained with another configuration ({}): choose another --out, or remove the run to start it again",
            run_dir.display(),
            differences.join("; ")
        );
    }
    Ok(())
}

#[derive(Debug, Serialize, Deserialize)]
struct RunDone {
    epochs: usize,
}

/// Trains (or continues, or keeps) the run in `config.logdir` and summarizes it.
fn train_variant(
    pipeline: &InstructPix2Pix,
    name: &str,
    config: &DdpoConfig,
    world_dir: &Path,
    progress: bool,
) -> anyhow::Result<RunSummary> {
    let run_dir = PathBuf::from(&config.logdir);
    let adapter_path = run_dir.join(RUN_ADAPTER_FILE);
    let done_path = run_dir.join(RUN_DONE_FILE);
    check_same_config(&run_dir, config)?;
    let done: Option<RunDone> = std::fs::read_to_string(&done_path)
        .ok()
        .and_then(|text| serde_json::from_str(&text).ok());
    let finished = done.is_some_and(|d| d.epochs == config.num_epochs) && adapter_path.is_file();
    if finished {
        tracing::info!(run = %run_dir.display(), epochs = config.num_epochs, "DDPO run already finished: kept");
    } else {
        let prompts = load_prompts(world_dir, &config.data, pipeline.vae_scale_factor() as u32)?;
        let mut trainer = Trainer::new(pipeline, config.clone(), prompts)?;
        let checkpoints = run_dir.join(CHECKPOINTS_DIR);
        if checkpoints.is_dir() && !list_checkpoints(&checkpoints)?.is_empty() {
            trainer.resume(&run_dir)?;
            let epochs = trainer.epochs_completed();
            if epochs > config.num_epochs {
                bail!(
                    "{} already holds {epochs} epochs, more than num_epochs = {}: raise num_epochs or choose another --out",
                    run_dir.display(),
                    config.num_epochs
                );
            }
            tracing::info!(run = %run_dir.display(), epoch = epochs, "DDPO run resumed");
        } else {
            tracing::info!(run = %run_dir.display(), reward = name, "DDPO run started");
        }
        std::fs::create_dir_all(&run_dir)
            .with_context(|| format!("creating {}", run_dir.display()))?;
        write_text(
            &run_dir.join("config.json"),
            &(serde_json::to_string_pretty(&config.to_json())? + "\n"),
        )?;
        // A stale marker must not survive a run that is being extended.
        if done_path.exists() {
            std::fs::remove_file(&done_path)
                .with_context(|| format!("removing {}", done_path.display()))?;
        }
        trainer.run(progress)?;
        let partial = run_dir.join(format!("{RUN_ADAPTER_FILE}.partial"));
        trainer.adapter(name)?.save(&partial)?;
        std::fs::rename(&partial, &adapter_path)
            .with_context(|| format!("writing {}", adapter_path.display()))?;
        write_text(
            &done_path,
            &(serde_json::to_string(&RunDone {
                epochs: config.num_epochs,
            })? + "\n"),
        )?;
    }
    let history = read_history(&run_dir.join(LOG_FILE))?;
    let (first, last) = first_last_tenth(&history);
    Ok(RunSummary {
        name: name.to_string(),
        run_dir,
        adapter: adapter_path,
        attention_weight: config.reward.attention_weight,
        alpha: config.reward.alpha,
        localization_weight: config.reward.localization_weight,
        epochs: history.len(),
        reward_first_tenth: first,
        reward_last_tenth: last,
        seconds_per_epoch: mean(history.iter().map(|l| l.seconds)),
    })
}

fn read_history(path: &Path) -> anyhow::Result<Vec<EpochLog>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .enumerate()
        .map(|(i, line)| {
            serde_json::from_str(line)
                .with_context(|| format!("{} line {}: not an epoch log", path.display(), i + 1))
        })
        .collect()
}

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, count) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (count > 0).then(|| sum / count as f64)
}

/// Mean reward of the first and the last tenth of the epochs (at least one each), as the
/// adapter's `rl4pix.reward_summary` counts them.
pub fn first_last_tenth(history: &[EpochLog]) -> (Option<f64>, Option<f64>) {
    let n = history.len();
    let tenth = (n / 10).max(1).min(n);
    (
        mean(history[..tenth].iter().map(|l| l.reward_mean)),
        mean(history[n - tenth..].iter().map(|l| l.reward_mean)),
    )
}

// ------------------------------------------------------------------ evaluation

fn sampler_spec(
    args: &ReproduceArgs,
    config: &DdpoConfig,
    model_sampling: SamplingDefaults,
) -> SamplerSpec {
    match args.eval_sampler {
        EvalSampler::Eval => SamplerSpec {
            kind: EvalSampler::Eval,
            scheduler: None,
            eta: 0.0,
            steps: args.steps,
            guidance_scale: model_sampling.guidance_scale,
            image_guidance_scale: model_sampling.image_guidance_scale,
            seed: args.eval_seed,
        },
        EvalSampler::Policy => SamplerSpec {
            kind: EvalSampler::Policy,
            scheduler: Some("ddim".into()),
            eta: config.sample.eta,
            steps: Some(args.steps.unwrap_or(config.sample.num_steps)),
            guidance_scale: config.sample.guidance_scale,
            image_guidance_scale: config.sample.image_guidance_scale,
            seed: args.eval_seed,
        },
    }
}

struct EvalContext {
    out: PathBuf,
    test_dir: PathBuf,
    test_spec: SynthSpec,
    model_dir: PathBuf,
    fingerprint: String,
    sampler: SamplerSpec,
    clip: Option<PathBuf>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CachedEval {
    key: Value,
    report: EvalReport,
}

impl EvalContext {
    /// `eval` of the base (`adapter` None, name `base`), an adapter, or the identity baseline
    /// (name `identity`); read back from `eval/<name>.json` when its inputs are unchanged.
    fn evaluate(&self, name: &str, adapter: Option<&Path>) -> anyhow::Result<EvalReport> {
        let identity = name == "identity";
        let adapter_hash = match adapter {
            Some(path) => Some(format!("{:016x}", file_fnv1a(path)?)),
            None => None,
        };
        let key = json!({
            "test_set": self.test_spec,
            "clip": self.clip.as_ref().map(|p| p.display().to_string()),
            "model": (!identity).then(|| json!({
                "dir": self.model_dir.display().to_string(),
                "fingerprint": self.fingerprint,
                "adapter_fnv1a": adapter_hash,
                "sampler": self.sampler,
            })),
        });
        let cache = self.out.join(format!("{name}.json"));
        if let Ok(text) = std::fs::read_to_string(&cache) {
            if let Ok(cached) = serde_json::from_str::<CachedEval>(&text) {
                if cached.key == key {
                    tracing::info!(row = name, "evaluation unchanged: read back");
                    return Ok(cached.report);
                }
            }
        }
        tracing::info!(row = name, test_set = %self.test_dir.display(), "evaluating");
        let report_path = self.out.join(format!("{name}.report.json"));
        let scheduler = match self.sampler.scheduler.as_deref() {
            Some(name) => Some(SchedulerKind::parse(name).with_context(|| {
                format!("unknown scheduler `{name}` (expected ddim or euler-ancestral)")
            })?),
            None => None,
        };
        let args = EvalArgs {
            dataset: self.test_dir.clone(),
            split: None,
            generated: None,
            baseline: identity.then_some(Baseline::Identity),
            model: (!identity).then(|| self.model_dir.clone()),
            adapter: adapter.map(Path::to_path_buf),
            clip: self.clip.clone(),
            json: Some(report_path.clone()),
            markdown: None,
            limit: None,
            steps: self.sampler.steps,
            scheduler,
            eta: self.sampler.eta,
            guidance_scale: Some(self.sampler.guidance_scale),
            image_guidance_scale: Some(self.sampler.image_guidance_scale),
            seed: self.sampler.seed,
            out: self.out.join(name).join("generated"),
        };
        crate::commands::eval::run(args).with_context(|| format!("evaluating `{name}`"))?;
        let text = std::fs::read_to_string(&report_path)
            .with_context(|| format!("reading {}", report_path.display()))?;
        let report: EvalReport = serde_json::from_str(&text)
            .with_context(|| format!("{}: not an eval report", report_path.display()))?;
        let cached = CachedEval {
            key,
            report: report.clone(),
        };
        write_text(&cache, &(serde_json::to_string_pretty(&cached)? + "\n"))?;
        std::fs::remove_file(&report_path)
            .with_context(|| format!("removing {}", report_path.display()))?;
        Ok(report)
    }
}

/// FNV-1a of a file's bytes: enough to notice that an adapter changed.
fn file_fnv1a(path: &Path) -> anyhow::Result<u64> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    Ok(hash)
}

// ------------------------------------------------------------------ tables

#[derive(Debug, Serialize)]
struct SetInfo {
    path: String,
    #[serde(flatten)]
    spec: SynthSpec,
}

#[derive(Debug, Serialize)]
struct Table {
    table: u8,
    model: String,
    base_fingerprint: String,
    train_world: SetInfo,
    test_set: SetInfo,
    sampler: SamplerSpec,
    clip: Option<String>,
    /// Before each run's reward setting and folder.
    ddpo_config: Value,
    rows: Vec<Row>,
}

fn cell(value: Option<f64>, decimals: usize) -> String {
    value.map_or("-".to_string(), |v| format!("{v:.decimals$}"))
}

impl Table {
    fn to_markdown(&self) -> String {
        let mut md = match self.table {
            1 => String::from("# Table 1 in miniature: base vs + RL adapter vs identity\n\n"),
            _ => String::from("# Table 2 in miniature: the reward ablation\n\n"),
        };
        md.push_str(&format!(
            "Model `{}` (UNet fingerprint `{}`). Training world `{}`: {} sessions, seed {}, {}x{}. \
             Test set `{}`: {} sessions, seed {}.\n\n",
            self.model,
            self.base_fingerprint.get(..12).unwrap_or(&self.base_fingerprint),
            self.train_world.path,
            self.train_world.spec.count,
            self.train_world.spec.seed,
            self.train_world.spec.size,
            self.train_world.spec.size,
            self.test_set.path,
            self.test_set.spec.count,
            self.test_set.spec.seed,
        ));
        let s = &self.sampler;
        md.push_str(&format!(
            "Every row sampled alike ({} sampler): scheduler {}, eta {}, {} steps, guidance {} / {}, \
             per-turn seeds from base seed {}. CLIP-T: {}.\n\n",
            match s.kind {
                EvalSampler::Eval => "eval's default",
                EvalSampler::Policy => "the DDPO policy's",
            },
            s.scheduler.as_deref().unwrap_or("the model's own"),
            s.eta,
            s.steps
                .map_or("the pipeline's default".to_string(), |n| n.to_string()),
            s.guidance_scale,
            s.image_guidance_scale,
            s.seed,
            self.clip
                .as_deref()
                .map_or("not measured".to_string(), |c| format!("`{c}`")),
        ));
        for (title, final_turn) in [
            (
                "All turns (each turn edited from its ground-truth source)",
                false,
            ),
            ("Final turn (each session edited iteratively)", true),
        ] {
            md.push_str(&format!("{title}:\n\n"));
            md.push_str(
                "| model | turns | L1 ↓ | L2 ↓ | SSIM ↑ | PSNR ↑ | CLIP-T ↑ | edit-region L1 ↓ | preservation L1 ↓ |\n\
                 | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n",
            );
            for row in &self.rows {
                let m = if final_turn {
                    &row.final_turn
                } else {
                    &row.all_turn
                };
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
                    row.label,
                    m.count,
                    cell(m.l1, 4),
                    cell(m.l2, 4),
                    cell(m.ssim, 4),
                    cell(m.psnr, 2),
                    cell(m.clip_t, 4),
                    cell(m.edit_l1, 4),
                    cell(m.preserve_l1, 4),
                ));
            }
            md.push('\n');
        }
        md.push_str(
            "DDPO training (reward: mean of the first and of the last tenth of the epochs):\n\n\
             | run | reward | epochs | reward, first tenth | reward, last tenth | s / epoch | folder |\n\
             | --- | --- | ---: | ---: | ---: | ---: | --- |\n",
        );
        for row in &self.rows {
            if let Some(run) = &row.run {
                md.push_str(&format!(
                    "| {} | {} | {} | {} | {} | {} | `{}` |\n",
                    variant_title(&run.name),
                    reward_label(run),
                    run.epochs,
                    cell(run.reward_first_tenth, 4),
                    cell(run.reward_last_tenth, 4),
                    cell(run.seconds_per_epoch, 1),
                    run.run_dir.display(),
                ));
            }
        }
        md.push('\n');
        for row in &self.rows {
            if let Some(v) = &row.verdict {
                md.push_str(&format!("- {}\n", verdict_line(&row.label, v)));
            }
        }
        md
    }
}

fn verdict_line(label: &str, v: &Verdict) -> String {
    let wins = if v.wins.is_empty() {
        "none".to_string()
    } else {
        v.wins
            .iter()
            .map(|w| w.to_uppercase())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let edit = match (v.edit_l1, v.base_edit_l1, v.edit_l1_ratio) {
        (Some(ours), Some(base), Some(ratio)) => format!(
            "edit-region L1 {ours:.4} against the base's {base:.4} ({:+.1}%, {} 5%)",
            (ratio - 1.0) * 100.0,
            if v.edit_l1_within_5_percent {
                "within"
            } else {
                "beyond"
            }
        ),
        _ => "edit-region L1 not measured".to_string(),
    };
    format!(
        "**{label}** beats the base on {} of L1, L2, SSIM, PSNR ({wins}); {edit}. \
         Issue's pass condition (>= 3 of 4 and edit-region L1 within 5%): **{}**.",
        v.wins.len(),
        if v.pass { "pass" } else { "fail" }
    )
}

fn write_text(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn summary(l1: f64, l2: f64, ssim: f64, psnr: f64, edit: f64) -> SettingSummary {
        SettingSummary {
            count: 1,
            l1: Some(l1),
            l2: Some(l2),
            psnr: Some(psnr),
            ssim: Some(ssim),
            edit_l1: Some(edit),
            preserve_l1: Some(0.0),
            clip_t: None,
        }
    }

    #[test]
    fn verdict_counts_wins_and_the_edit_region_tolerance() {
        let base = summary(0.05, 0.02, 0.7, 19.0, 0.100);
        let better = summary(0.04, 0.01, 0.8, 20.0, 0.104);
        let v = verdict(&better, &base);
        assert_eq!(v.wins, ["l1", "l2", "ssim", "psnr"]);
        assert!(v.edit_l1_within_5_percent && v.pass);
        // Wins the four by editing less, losing the edit region: fails.
        let lazy = summary(0.04, 0.01, 0.8, 20.0, 0.106);
        let v = verdict(&lazy, &base);
        assert!(!v.edit_l1_within_5_percent && !v.pass);
        let worse = summary(0.06, 0.01, 0.6, 20.0, 0.09);
        let v = verdict(&worse, &base);
        assert_eq!(v.wins, ["l2", "psnr"]);
        assert!(!v.pass);
    }

    #[test]
    fn tenths_follow_the_reward_summary() {
        let log = |epoch: usize, reward: f64| EpochLog {
            epoch,
            reward_mean: reward,
            reward_std: 0.0,
            attention_mean: 0.0,
            clip_mean: 0.0,
            mae_mean: 0.0,
            localization_mean: 0.0,
            approx_kl: 0.0,
            clip_fraction: 0.0,
            loss: 0.0,
            grad_norm: 0.0,
            lr: 0.0,
            seconds: 1.0,
            sample_seconds: 0.0,
            train_seconds: 0.0,
            samples: 1,
            optimizer_steps: 1,
        };
        let history: Vec<EpochLog> = (1..=20).map(|e| log(e, e as f64)).collect();
        assert_eq!(first_last_tenth(&history), (Some(1.5), Some(19.5)));
        assert_eq!(first_last_tenth(&history[..3]), (Some(1.0), Some(3.0)));
        assert_eq!(first_last_tenth(&[]), (None, None));
    }

    #[test]
    fn rewards_name_their_runs() {
        let c = DdpoConfig::paper();
        assert_eq!(reward_name(&c).unwrap(), "both");
        let names: Vec<String> = table2_variants(&c).into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["attn", "clip", "both"]);
        let ours = c.with_sets(&["reward.localization_weight=1"]).unwrap();
        assert_eq!(reward_name(&ours).unwrap(), "ours");
        let variants = table2_variants(&ours);
        assert_eq!(variants.len(), 4);
        assert_eq!(variants[2].config.reward.localization_weight, 0.0);
        // A zeroed paper weight falls back to the paper's own for the ablation.
        let attn_only = c.with_sets(&["reward.alpha=0"]).unwrap();
        assert_eq!(reward_name(&attn_only).unwrap(), "attn");
        assert_eq!(table2_variants(&attn_only)[1].config.reward.alpha, -1.0);
        let none = c
            .with_sets(&["reward.alpha=0", "reward.attention_weight=0"])
            .unwrap();
        assert!(reward_name(&none).is_err());
    }
}
