//! `rl4pix-train reproduce --table 1|2`: one command per table of the paper, in miniature.
//!
//! Table 1: synthesize the training world, a validation world (model selection) and test sets from
//! unseen seeds, train DDPO adapters — the paper's reward, ours (the configuration's, when it is not
//! the paper's) and the oracle ablation — and evaluate the base model, each adapter and the
//! identity baseline (output = source) on every test set with one sampler. Table 2: the paper's
//! reward ablation (attention only, clip only, both, plus ours when configured).
//!
//! This file is the command line and the order of the stages; `cache` keeps every stage
//! resumable (sets, runs, evaluations), `table` builds and prints the tables.

mod cache;
mod spec;
mod table;

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Device;
use rl4pix_model::pipeline::{GuidanceDefaults, InstructPix2Pix};
use serde::Serialize;
use serde_json::Value;

pub use cache::first_last_tenth;
use cache::{ensure_synth, train_variant, write_text, EvalContext};
pub use spec::{SamplerSpec, SynthSpec};
use table::{variant_title, SetInfo, Table, TestTable};
pub use table::{verdict, Row, RunSummary, Verdict};

use super::DdpoOverrides;
use crate::ddpo::audit::reward_formula;
use crate::ddpo::DdpoConfig;
use crate::synth::DEFAULT_SIZE;

#[derive(clap::Args, Debug)]
pub struct ReproduceArgs {
    /// Which table: 1 (base vs the RL adapters vs identity) or 2 (reward ablation).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub table: u8,
    /// Model folder in the diffusers layout (default: the embedded default model).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Run folder: world/, validation/, test-<seed>/, runs/<reward>/, eval/, table<N>.md/.json.
    #[arg(long, default_value = "runs/reproduce")]
    pub out: PathBuf,
    /// Seed of the training world.
    #[arg(long, default_value_t = 11)]
    pub train_seed: u64,
    /// Seeds of the test sets, repeatable (each must differ from the training and validation
    /// seeds: the test sets are unseen).
    #[arg(long = "test-seed", default_values_t = [12345u64, 9001])]
    pub test_seeds: Vec<u64>,
    /// Sessions in the training world.
    #[arg(long, default_value_t = 2000)]
    pub train_count: u64,
    /// Sessions in each test set.
    #[arg(long, default_value_t = 300)]
    pub test_count: u64,
    /// Seed of the validation world the runs select their best adapter on.
    #[arg(long, default_value_t = 777)]
    pub validation_seed: u64,
    /// Sessions in the validation world.
    #[arg(long, default_value_t = 48)]
    pub validation_count: u64,
    /// No validation world: each run's last adapter is evaluated.
    #[arg(long)]
    pub no_validation: bool,
    /// Table 1's runs, comma-separated: `both` (the paper's reward), `ours` (the configured
    /// reward, when it is not the paper's), `oracle` (the ablation). Default: all that apply.
    #[arg(long, value_delimiter = ',')]
    pub runs: Vec<String>,
    /// Image side of every synthetic set (default: the size the model was trained at, from its
    /// model_index.json, else the synthetic world's default).
    #[arg(long)]
    pub size: Option<u32>,
    /// DDPO starting values: `group` (our recipe), `cpu` or `paper` (Table 4). `logdir`,
    /// `resume_from` and (unless --no-validation) `validation.dataset` are set by this command.
    #[arg(long, default_value = "group")]
    pub preset: String,
    #[command(flatten)]
    pub overrides: DdpoOverrides,
    /// CPU threads for tensor work and synthesis (sets RAYON_NUM_THREADS; default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Sampler of every evaluated row: `eval` (the model's own: its scheduler and guidance, eta
    /// 0, the pipeline's steps) or `policy` (the DDPO policy's: DDIM with sample.eta, its guidance,
    /// sample.num_steps).
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
    /// The model's own sampler (eval's defaults).
    Eval,
    /// The DDPO policy's sampler.
    Policy,
}

/// A reward setting of a table, named for its run folder.
struct Variant {
    name: String,
    config: DdpoConfig,
}

/// The run folder's name for a reward: `oracle` for the ablation, `ours` whenever one of our
/// terms is on, else the paper's ablation names.
pub fn reward_name(config: &DdpoConfig) -> anyhow::Result<&'static str> {
    let r = &config.reward;
    if r.oracle_weight != 0.0 {
        return Ok("oracle");
    }
    Ok(
        match (
            r.attention_weight != 0.0,
            r.alpha != 0.0,
            r.localization_weight != 0.0 || r.outside_weight != 0.0,
        ) {
            (_, _, true) => "ours",
            (true, true, false) => "both",
            (true, false, false) => "attn",
            (false, true, false) => "clip",
            (false, false, false) => {
                bail!("the reward has no term: every reward.*_weight and reward.alpha are 0")
            }
        },
    )
}

/// `config` with only the named weights on.
fn with_reward(config: &DdpoConfig, name: &str, set: impl Fn(&mut DdpoConfig)) -> Variant {
    let mut c = config.clone();
    c.reward.attention_weight = 0.0;
    c.reward.alpha = 0.0;
    c.reward.localization_weight = 0.0;
    c.reward.outside_weight = 0.0;
    c.reward.oracle_weight = 0.0;
    set(&mut c);
    Variant {
        name: name.into(),
        config: c,
    }
}

/// Table 1: the paper's reward, the configured one when it differs (ours), and the oracle
/// ablation (-100 x L1 to the target), each filtered by `--runs`.
fn table1_variants(config: &DdpoConfig, wanted: &[String]) -> anyhow::Result<Vec<Variant>> {
    for name in wanted {
        if !["both", "ours", "oracle"].contains(&name.as_str()) {
            bail!("--runs: unknown run `{name}` (expected both, ours, oracle)");
        }
    }
    let paper = DdpoConfig::paper().reward;
    let mut variants = vec![with_reward(config, "both", |c| {
        c.reward.attention_weight = paper.attention_weight;
        c.reward.alpha = paper.alpha;
    })];
    if reward_name(config)? == "ours" {
        variants.push(Variant {
            name: "ours".into(),
            config: config.clone(),
        });
    }
    variants.push(with_reward(config, "oracle", |c| {
        c.reward.oracle_weight = 100.0;
    }));
    if !wanted.is_empty() {
        variants.retain(|v| wanted.contains(&v.name));
    }
    Ok(variants)
}

/// The paper's three rewards with the configured weights (the paper's 1 and -1 where the
/// configuration zeroes one), plus the configuration itself when it uses our terms.
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
    let mut variants = vec![
        with_reward(config, "attn", |c| c.reward.attention_weight = attention),
        with_reward(config, "clip", |c| c.reward.alpha = alpha),
        with_reward(config, "both", |c| {
            c.reward.attention_weight = attention;
            c.reward.alpha = alpha;
        }),
    ];
    if reward_name(config).ok() == Some("ours") {
        variants.push(Variant {
            name: "ours".into(),
            config: config.clone(),
        });
    }
    variants
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

fn sampler_spec(
    args: &ReproduceArgs,
    config: &DdpoConfig,
    model_guidance: GuidanceDefaults,
) -> SamplerSpec {
    match args.eval_sampler {
        EvalSampler::Eval => SamplerSpec {
            kind: EvalSampler::Eval,
            scheduler: None,
            eta: 0.0,
            steps: args.steps,
            guidance_scale: model_guidance.guidance_scale,
            image_guidance_scale: model_guidance.image_guidance_scale,
            seed: args.eval_seed,
        },
        EvalSampler::Policy => {
            let (text, image) = if config.sample.use_model_guidance {
                (
                    model_guidance.guidance_scale,
                    model_guidance.image_guidance_scale,
                )
            } else {
                (
                    config.sample.guidance_scale,
                    config.sample.image_guidance_scale,
                )
            };
            SamplerSpec {
                kind: EvalSampler::Policy,
                scheduler: Some("ddim".into()),
                eta: config.sample.eta,
                steps: Some(args.steps.unwrap_or(config.sample.num_steps)),
                guidance_scale: text,
                image_guidance_scale: image,
                seed: args.eval_seed,
            }
        }
    }
}

fn validate_args(args: &ReproduceArgs) -> anyhow::Result<()> {
    super::set_tensor_threads(args.threads)?;
    anyhow::ensure!(
        !args.test_seeds.is_empty(),
        "--test-seed: give at least one"
    );
    for &seed in &args.test_seeds {
        anyhow::ensure!(
            seed != args.train_seed,
            "--train-seed and --test-seed are both {seed}: the test set must come from an unseen seed"
        );
        anyhow::ensure!(
            args.no_validation || seed != args.validation_seed,
            "--validation-seed and --test-seed are both {seed}: the test set must come from an unseen seed"
        );
    }
    anyhow::ensure!(args.train_count > 0, "--train-count must be at least 1");
    anyhow::ensure!(args.test_count > 0, "--test-count must be at least 1");
    anyhow::ensure!(
        args.no_validation || args.validation_count > 0,
        "--validation-count must be at least 1"
    );
    if let Some(steps) = args.steps {
        anyhow::ensure!(steps > 0, "--steps must be at least 1");
    }
    Ok(())
}

pub fn run(args: ReproduceArgs) -> anyhow::Result<()> {
    validate_args(&args)?;
    let model_dir = crate::commands::edit::resolve_model_dir(args.model.clone())?;
    let size = match args.size {
        Some(size) => size,
        None => model_training_size(&model_dir).unwrap_or(DEFAULT_SIZE),
    };
    anyhow::ensure!(size >= 12, "--size must be at least 12 pixels (got {size})");
    let mut base_config = args.overrides.build(&args.preset)?;
    if !base_config.resume_from.is_empty() {
        tracing::warn!(
            resume_from = %base_config.resume_from,
            "resume_from is ignored: reproduce resumes its own runs under --out"
        );
    }
    let validation_dir = args.out.join("validation");
    let validation_spec = SynthSpec {
        seed: args.validation_seed,
        count: args.validation_count,
        size,
    };
    if args.no_validation {
        base_config.validation.dataset = String::new();
    } else {
        base_config.validation.dataset = validation_dir.display().to_string();
    }
    let variants = match args.table {
        1 => table1_variants(&base_config, &args.runs)?,
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
    let world_dir = args.out.join("world");
    ensure_synth(&world_dir, &world_spec, threads)?;
    if !args.no_validation {
        ensure_synth(&validation_dir, &validation_spec, threads)?;
    }
    let mut tests = Vec::new();
    for &seed in &args.test_seeds {
        let spec = SynthSpec {
            seed,
            count: args.test_count,
            size,
        };
        let dir = args.out.join(format!("test-{seed}"));
        ensure_synth(&dir, &spec, threads)?;
        tests.push((dir, spec));
    }

    let pipeline = InstructPix2Pix::load(&model_dir, &Device::Cpu)
        .with_context(|| format!("loading model {}", model_dir.display()))?;
    let fingerprint = pipeline.unet.fingerprint().to_string();
    let model_guidance = pipeline.guidance_defaults;
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

    let sampler = sampler_spec(&args, &base_config, model_guidance);
    let mut test_tables = Vec::new();
    let mut passing: Vec<String> = runs.iter().map(|r| r.name.clone()).collect();
    for (dir, spec) in &tests {
        let context = EvalContext {
            out: args.out.join("eval").join(format!("test-{}", spec.seed)),
            test_dir: dir.clone(),
            test_spec: spec.clone(),
            model_dir: model_dir.clone(),
            fingerprint: fingerprint.clone(),
            sampler: sampler.clone(),
            clip: clip.clone(),
        };
        let base = context.evaluate("base", None)?;
        let mut rows = vec![Row {
            name: "base".into(),
            label: "base".into(),
            all_turn: base.all_turn.clone(),
            final_turn: base.final_turn.clone(),
            verdict: None,
        }];
        for run in &runs {
            let report = context.evaluate(&run.name, Some(&run.adapter))?;
            let v = verdict(&report.all_turn, &base.all_turn);
            if !v.pass {
                passing.retain(|n| n != &run.name);
            }
            rows.push(Row {
                name: run.name.clone(),
                label: format!("+ RL, {} ({})", variant_title(&run.name), run.reward),
                verdict: Some(v),
                all_turn: report.all_turn,
                final_turn: report.final_turn,
            });
        }
        let identity = context.evaluate("identity", None)?;
        rows.push(Row {
            name: "identity".into(),
            label: "identity (no edit)".into(),
            all_turn: identity.all_turn,
            final_turn: identity.final_turn,
            verdict: None,
        });
        test_tables.push(TestTable {
            path: dir.display().to_string(),
            spec: spec.clone(),
            rows,
        });
    }

    let table = Table {
        table: args.table,
        model: model_dir.display().to_string(),
        base_fingerprint: fingerprint,
        train_world: SetInfo {
            path: world_dir.display().to_string(),
            spec: world_spec,
        },
        validation_set: (!args.no_validation).then(|| SetInfo {
            path: validation_dir.display().to_string(),
            spec: validation_spec,
        }),
        sampler,
        clip: clip.as_ref().map(|p| p.display().to_string()),
        ddpo_config: base_config.to_json(),
        runs,
        test_sets: test_tables,
        passing,
    };
    let markdown = table.to_markdown();
    let name = format!("table{}", args.table);
    write_text(
        &args.out.join(format!("{name}.json")),
        &(serde_json::to_string_pretty(&table)? + "\n"),
    )?;
    write_text(&args.out.join(format!("{name}.md")), &markdown)?;
    print!("{markdown}");
    tracing::info!(out = %args.out.display(), reward = %reward_formula(&base_config.reward), "{name}.md and {name}.json written");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let oracle = c.with_sets(&["reward.oracle_weight=1"]).unwrap();
        assert_eq!(reward_name(&oracle).unwrap(), "oracle");
    }

    #[test]
    fn table1_has_the_papers_reward_ours_and_the_oracle() {
        let ours = DdpoConfig::group()
            .with_sets(&["reward.outside_weight=-4"])
            .unwrap();
        let variants = table1_variants(&ours, &[]).unwrap();
        let names: Vec<&str> = variants.iter().map(|v| v.name.as_str()).collect();
        assert_eq!(names, ["both", "ours", "oracle"]);
        assert_eq!(variants[0].config.reward.outside_weight, 0.0);
        assert_eq!(variants[0].config.reward.alpha, -1.0);
        assert_eq!(variants[1].config, ours);
        let oracle = &variants[2].config.reward;
        assert!(
            oracle.oracle_weight > 0.0 && oracle.attention_weight == 0.0 && oracle.alpha == 0.0
        );
        // The paper's reward configured: no `ours` row.
        let names: Vec<String> = table1_variants(&DdpoConfig::group(), &[])
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(names, ["both", "oracle"]);
        let only: Vec<String> = table1_variants(&ours, &["oracle".into()])
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert_eq!(only, ["oracle"]);
        assert!(table1_variants(&ours, &["best".into()]).is_err());
    }
}
