//! Scheduler parity with diffusers 0.42 (`DDIMScheduler`, `EulerAncestralDiscreteScheduler`).
//!
//! Two sources of expected values:
//! - the pipeline fixtures `tests/fixtures/pipelines/{sd1,sd2}.reference.safetensors` (keys `ddim.*`,
//!   `euler.*`, made by `tests/make_model_fixtures.py`) for the two shipped scheduler configs;
//! - `CASES` below (made by `tests/make_scheduler_fixtures.py`) for other config combinations:
//!   spacing, prediction types, beta schedules, zero-SNR rescaling, clipping, eta.

use std::collections::HashMap;
use std::path::PathBuf;

use candle_core::{DType, IndexOp, Tensor};
use rl4pix_model::scheduler::{
    DdimScheduler, EulerAncestralScheduler, Scheduler, SchedulerConfig, SchedulerKind,
};

type TestResult = anyhow::Result<()>;

const TOLERANCE: f32 = 1e-4;

fn workspace() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

fn pipeline_dir(name: &str) -> PathBuf {
    workspace().join("tests/fixtures/pipelines").join(name)
}

fn load_reference(name: &str) -> anyhow::Result<HashMap<String, Tensor>> {
    let path = workspace().join(format!(
        "tests/fixtures/pipelines/{name}.reference.safetensors"
    ));
    Ok(candle_core::safetensors::load(&path, &device())?)
}

fn get<'a>(refs: &'a HashMap<String, Tensor>, key: &str) -> anyhow::Result<&'a Tensor> {
    refs.get(key)
        .ok_or_else(|| anyhow::anyhow!("reference tensor `{key}` missing"))
}

fn pipeline_config(name: &str) -> anyhow::Result<SchedulerConfig> {
    Ok(SchedulerConfig::from_file(
        &pipeline_dir(name).join("scheduler/scheduler_config.json"),
    )?)
}

/// max |actual - expected| / max |expected|.
fn relative_error(actual: &Tensor, expected: &Tensor) -> anyhow::Result<f32> {
    anyhow::ensure!(
        actual.dims() == expected.dims(),
        "shape {:?} vs expected {:?}",
        actual.dims(),
        expected.dims()
    );
    let actual = actual.to_dtype(DType::F32)?;
    let expected = expected.to_dtype(DType::F32)?;
    let diff = (&actual - &expected)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?;
    let scale = expected.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(diff / scale.max(1e-12))
}

fn assert_close(what: &str, actual: &Tensor, expected: &Tensor) -> TestResult {
    let err = relative_error(actual, expected)?;
    anyhow::ensure!(
        err <= TOLERANCE,
        "{what}: relative error {err:e} > {TOLERANCE:e}"
    );
    Ok(())
}

fn assert_close_f64(what: &str, actual: &[f64], expected: &[f64]) -> TestResult {
    anyhow::ensure!(
        actual.len() == expected.len(),
        "{what}: {actual:?} vs {expected:?}"
    );
    for (a, e) in actual.iter().zip(expected) {
        let err = (a - e).abs() / e.abs().max(1e-12);
        anyhow::ensure!(
            err <= TOLERANCE as f64,
            "{what}: {actual:?} vs {expected:?}"
        );
    }
    Ok(())
}

/// Rows of two tensors: sample 0 from `a`, sample 1 from `b`.
fn mix(a: &Tensor, b: &Tensor) -> anyhow::Result<Tensor> {
    Ok(Tensor::cat(&[a.narrow(0, 0, 1)?, b.narrow(0, 1, 1)?], 0)?)
}

fn to_f64(t: &Tensor) -> anyhow::Result<Vec<f64>> {
    Ok(t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?)
}

// ---------------------------------------------------------------------------------------------
// Pipeline fixtures
// ---------------------------------------------------------------------------------------------

fn ddim_pipeline_parity(name: &str) -> TestResult {
    let refs = load_reference(name)?;
    let config = pipeline_config(name)?;
    let expected_timesteps: Vec<usize> = get(&refs, "ddim.timesteps")?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|t| t as usize)
        .collect();
    let steps = expected_timesteps.len();

    for eta in [0.0, 1.0] {
        let scheduler = DdimScheduler::new(&config, steps, eta)?;
        anyhow::ensure!(scheduler.timesteps() == expected_timesteps.as_slice());
        let alphas = Tensor::new(scheduler.alphas_cumprod(), &device())?;
        assert_close(
            "alphas_cumprod",
            &alphas,
            get(&refs, "ddim.alphas_cumprod")?,
        )?;
        let wrapped = Scheduler::new(SchedulerKind::Ddim, &config, steps, eta)?;
        anyhow::ensure!(wrapped.needs_noise() == (eta > 0.0));
        anyhow::ensure!(wrapped.init_noise_sigma() == 1.0);

        let prefix = format!("ddim.eta{eta}.");
        let stacked = |key: &str| get(&refs, &format!("{prefix}{key}")).cloned();
        let (samples, outputs, noises, prevs) = (
            stacked("sample")?,
            stacked("model_output")?,
            stacked("noise")?,
            stacked("prev_sample")?,
        );
        let log_probs = stacked("log_prob").ok();
        for (i, &timestep) in expected_timesteps.iter().enumerate() {
            let what = format!("{name} ddim eta {eta} step {i}");
            let (sample, output, noise) = (samples.i(i)?, outputs.i(i)?, noises.i(i)?);
            anyhow::ensure!(wrapped.timestep(i) == timestep as f64);
            let scaled = wrapped.scale_model_input(&sample, i)?;
            assert_close(&format!("{what} scale_model_input"), &scaled, &sample)?;

            let out = wrapped.step(&output, i, &sample, Some(&noise))?;
            assert_close(
                &format!("{what} prev_sample"),
                &out.prev_sample,
                &prevs.i(i)?,
            )?;
            match &log_probs {
                None => anyhow::ensure!(out.log_prob.is_none(), "{what}: log_prob at eta 0"),
                Some(log_probs) => {
                    let expected = log_probs.i(i)?;
                    let step_log_prob = out
                        .log_prob
                        .ok_or_else(|| anyhow::anyhow!("{what}: no log_prob"))?;
                    assert_close(&format!("{what} log_prob"), &step_log_prob, &expected)?;
                    // DDPO's ratio-1 property: re-evaluating the sampled step gives its log-prob.
                    let recomputed =
                        scheduler.log_prob(&output, &[i, i], &sample, &out.prev_sample)?;
                    let gap = (&recomputed - &step_log_prob)?
                        .abs()?
                        .max(0)?
                        .to_scalar::<f32>()?;
                    anyhow::ensure!(gap <= 1e-6, "{what}: recomputed log_prob differs by {gap}");
                    // And of diffusers' own prev_sample.
                    let of_reference =
                        scheduler.log_prob(&output, &[i, i], &sample, &prevs.i(i)?)?;
                    assert_close(
                        &format!("{what} log_prob(reference)"),
                        &of_reference,
                        &expected,
                    )?;
                }
            }
        }

        // One batch holding samples at the first and the last step.
        let last = steps - 1;
        let sample = mix(&samples.i(0)?, &samples.i(last)?)?;
        let output = mix(&outputs.i(0)?, &outputs.i(last)?)?;
        let noise = mix(&noises.i(0)?, &noises.i(last)?)?;
        let out = scheduler.step_batched(&output, &[0, last], &sample, Some(&noise))?;
        let expected = mix(&prevs.i(0)?, &prevs.i(last)?)?;
        assert_close(
            &format!("{name} ddim eta {eta} mixed batch"),
            &out.prev_sample,
            &expected,
        )?;
        if let Some(log_probs) = &log_probs {
            let expected = Tensor::cat(&[log_probs.i((0, 0..1))?, log_probs.i((last, 1..2))?], 0)?;
            let got = out
                .log_prob
                .ok_or_else(|| anyhow::anyhow!("mixed batch: no log_prob"))?;
            assert_close(
                &format!("{name} ddim mixed batch log_prob"),
                &got,
                &expected,
            )?;
            // Shuffled step order, as DDPO trains: same values per sample.
            let swapped_sample = mix(&samples.i(last)?, &samples.i(0)?)?;
            let swapped_output = mix(&outputs.i(last)?, &outputs.i(0)?)?;
            let swapped_prev = mix(&prevs.i(last)?, &prevs.i(0)?)?;
            let swapped =
                scheduler.log_prob(&swapped_output, &[last, 0], &swapped_sample, &swapped_prev)?;
            let expected = Tensor::cat(&[log_probs.i((last, 0..1))?, log_probs.i((0, 1..2))?], 0)?;
            assert_close("shuffled log_prob", &swapped, &expected)?;
        }
    }
    Ok(())
}

fn euler_pipeline_parity(name: &str) -> TestResult {
    let refs = load_reference(name)?;
    let config = pipeline_config(name)?;
    let expected_timesteps = to_f64(get(&refs, "euler.timesteps")?)?;
    let steps = expected_timesteps.len();
    let scheduler = EulerAncestralScheduler::new(&config, steps)?;
    assert_close_f64(
        "euler timesteps",
        scheduler.timesteps(),
        &expected_timesteps,
    )?;
    assert_close_f64(
        "euler sigmas",
        scheduler.sigmas(),
        &to_f64(get(&refs, "euler.sigmas")?)?,
    )?;
    assert_close_f64(
        "euler init_noise_sigma",
        &[scheduler.init_noise_sigma()],
        &to_f64(get(&refs, "euler.init_noise_sigma")?)?,
    )?;
    let wrapped = Scheduler::new(SchedulerKind::EulerAncestral, &config, steps, 0.0)?;
    anyhow::ensure!(wrapped.needs_noise());
    anyhow::ensure!(wrapped.init_noise_sigma() == scheduler.init_noise_sigma());

    let stacked = |key: &str| get(&refs, &format!("euler.{key}")).cloned();
    let (samples, scaled, outputs, noises, prevs) = (
        stacked("sample")?,
        stacked("scaled_input")?,
        stacked("model_output")?,
        stacked("noise")?,
        stacked("prev_sample")?,
    );
    for (i, &timestep) in expected_timesteps.iter().enumerate() {
        let what = format!("{name} euler step {i}");
        let (sample, output, noise) = (samples.i(i)?, outputs.i(i)?, noises.i(i)?);
        anyhow::ensure!(wrapped.timestep(i) == timestep);
        assert_close(
            &format!("{what} scale_model_input"),
            &wrapped.scale_model_input(&sample, i)?,
            &scaled.i(i)?,
        )?;
        let out = wrapped.step(&output, i, &sample, Some(&noise))?;
        anyhow::ensure!(out.log_prob.is_none());
        assert_close(
            &format!("{what} prev_sample"),
            &out.prev_sample,
            &prevs.i(i)?,
        )?;
        anyhow::ensure!(wrapped.step(&output, i, &sample, None).is_err());
    }

    let last = steps - 1;
    let sample = mix(&samples.i(0)?, &samples.i(last)?)?;
    let input = scheduler.scale_model_input_batched(&sample, &[0, last])?;
    assert_close(
        "euler mixed scale_model_input",
        &input,
        &mix(&scaled.i(0)?, &scaled.i(last)?)?,
    )?;
    let output = mix(&outputs.i(0)?, &outputs.i(last)?)?;
    let noise = mix(&noises.i(0)?, &noises.i(last)?)?;
    let prev = scheduler.step_batched(&output, &[0, last], &sample, Some(&noise))?;
    assert_close(
        "euler mixed batch",
        &prev,
        &mix(&prevs.i(0)?, &prevs.i(last)?)?,
    )?;
    Ok(())
}

#[test]
fn ddim_matches_diffusers_sd1() -> TestResult {
    ddim_pipeline_parity("sd1")
}

#[test]
fn ddim_matches_diffusers_sd2() -> TestResult {
    ddim_pipeline_parity("sd2")
}

#[test]
fn euler_ancestral_matches_diffusers_sd1() -> TestResult {
    euler_pipeline_parity("sd1")
}

#[test]
fn euler_ancestral_matches_diffusers_sd2() -> TestResult {
    euler_pipeline_parity("sd2")
}

#[test]
fn pipeline_configs_name_their_scheduler() -> TestResult {
    anyhow::ensure!(pipeline_config("sd1")?.default_kind()? == SchedulerKind::Ddim);
    anyhow::ensure!(pipeline_config("sd2")?.default_kind()? == SchedulerKind::EulerAncestral);
    Ok(())
}

#[test]
fn config_errors_name_key_and_file() -> TestResult {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("scheduler_config.json");
    let cases = [
        (
            r#"{"_class_name": "DDIMScheduler", "trained_betas": [0.1, 0.2]}"#,
            "trained_betas",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "beta_schedule": "sigmoid"}"#,
            "beta_schedule",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "timestep_spacing": "karras"}"#,
            "timestep_spacing",
        ),
        (
            r#"{"_class_name": "DDIMScheduler", "prediction_type": "flow"}"#,
            "prediction_type",
        ),
    ];
    for (json, key) in cases {
        std::fs::write(&path, json)?;
        let config = SchedulerConfig::from_file(&path)?;
        for kind in [SchedulerKind::Ddim, SchedulerKind::EulerAncestral] {
            let message = match Scheduler::new(kind, &config, 10, 0.0) {
                Ok(_) => anyhow::bail!("{json} accepted by {kind}"),
                Err(e) => e.to_string(),
            };
            anyhow::ensure!(message.contains(key), "{message}");
            anyhow::ensure!(message.contains(&*path.to_string_lossy()), "{message}");
        }
    }
    std::fs::write(&path, r#"{"_class_name": "LMSDiscreteScheduler"}"#)?;
    let message = match SchedulerConfig::from_file(&path)?.default_kind() {
        Ok(kind) => anyhow::bail!("LMSDiscreteScheduler parsed as {kind}"),
        Err(e) => e.to_string(),
    };
    anyhow::ensure!(message.contains("_class_name"), "{message}");
    anyhow::ensure!(message.contains(&*path.to_string_lossy()), "{message}");

    std::fs::write(&path, r#"{"num_train_timesteps": "many"}"#)?;
    let message = SchedulerConfig::from_file(&path).unwrap_err().to_string();
    anyhow::ensure!(message.contains(&*path.to_string_lossy()), "{message}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Other configs, against values computed with diffusers by tests/make_scheduler_fixtures.py
// ---------------------------------------------------------------------------------------------

/// (B, C, H, W) of the case inputs.
const SHAPE: (usize, usize, usize, usize) = (2, 2, 1, 3);

/// The case inputs: amplitude * sin(1.3 e + 0.7 step + 2.1 kind + 0.3) over the flat element
/// index e (kind 0 = sample, 1 = model output, 2 = noise), the formula of the python script.
fn pattern(kind: usize, step: usize) -> anyhow::Result<Tensor> {
    let amplitude = if kind == 0 { 2.5 } else { 1.0 };
    let count = SHAPE.0 * SHAPE.1 * SHAPE.2 * SHAPE.3;
    let values: Vec<f32> = (0..count)
        .map(|e| {
            (amplitude * (1.3 * e as f64 + 0.7 * step as f64 + 2.1 * kind as f64 + 0.3).sin())
                as f32
        })
        .collect();
    Ok(Tensor::from_vec(values, SHAPE, &device())?)
}

fn expected(values: &[f32], shape: impl Into<candle_core::Shape>) -> anyhow::Result<Tensor> {
    Ok(Tensor::from_slice(values, shape, &device())?)
}

struct Case {
    name: &'static str,
    /// "ddim" or "euler".
    kind: &'static str,
    /// scheduler_config.json contents (diffusers' defaults for the rest).
    config: &'static str,
    steps: usize,
    eta: f64,
    timesteps: &'static [f64],
    /// (training timestep, cumulative alpha), DDIM only.
    alphas_cumprod: &'static [(usize, f64)],
    final_alpha_cumprod: f64,
    /// Euler only.
    sigmas: &'static [f64],
    init_noise_sigma: f64,
    /// Per step, flattened (B, C, H, W).
    prev_sample: &'static [&'static [f32]],
    /// Per step, (B,); None where the step is deterministic. DDIM only.
    log_prob: &'static [Option<&'static [f32]>],
    /// Per step, flattened. Euler only.
    scaled_input: &'static [&'static [f32]],
}

fn run_ddim_case(case: &Case, config: &SchedulerConfig) -> TestResult {
    let name = case.name;
    let scheduler = DdimScheduler::new(config, case.steps, case.eta)?;
    let timesteps: Vec<f64> = scheduler.timesteps().iter().map(|&t| t as f64).collect();
    anyhow::ensure!(
        timesteps == case.timesteps,
        "{name}: timesteps {timesteps:?}"
    );
    for &(t, alpha) in case.alphas_cumprod {
        assert_close_f64(
            &format!("{name} alphas_cumprod[{t}]"),
            &[scheduler.alphas_cumprod()[t]],
            &[alpha],
        )?;
    }
    assert_close_f64(
        &format!("{name} final_alpha_cumprod"),
        &[scheduler.final_alpha_cumprod()],
        &[case.final_alpha_cumprod],
    )?;
    for i in 0..case.steps {
        let (sample, output, noise) = (pattern(0, i)?, pattern(1, i)?, pattern(2, i)?);
        let out = scheduler.step_batched(&output, &[i, i], &sample, Some(&noise))?;
        assert_close(
            &format!("{name} step {i} prev_sample"),
            &out.prev_sample,
            &expected(case.prev_sample[i], SHAPE)?,
        )?;
        match (case.log_prob[i], out.log_prob) {
            (None, None) => {
                anyhow::ensure!(scheduler
                    .log_prob(&output, &[i, i], &sample, &out.prev_sample)
                    .is_err());
            }
            (Some(values), Some(log_prob)) => {
                assert_close(
                    &format!("{name} step {i} log_prob"),
                    &log_prob,
                    &expected(values, 2)?,
                )?;
                let recomputed = scheduler.log_prob(&output, &[i, i], &sample, &out.prev_sample)?;
                assert_close(
                    &format!("{name} step {i} recomputed log_prob"),
                    &recomputed,
                    &log_prob,
                )?;
            }
            (want, got) => anyhow::bail!("{name} step {i}: log_prob {want:?} vs {got:?}"),
        }
    }
    Ok(())
}

fn run_euler_case(case: &Case, config: &SchedulerConfig) -> TestResult {
    let name = case.name;
    let scheduler = EulerAncestralScheduler::new(config, case.steps)?;
    assert_close_f64(
        &format!("{name} timesteps"),
        scheduler.timesteps(),
        case.timesteps,
    )?;
    assert_close_f64(&format!("{name} sigmas"), scheduler.sigmas(), case.sigmas)?;
    assert_close_f64(
        &format!("{name} init_noise_sigma"),
        &[scheduler.init_noise_sigma()],
        &[case.init_noise_sigma],
    )?;
    for i in 0..case.steps {
        let (sample, output, noise) = (pattern(0, i)?, pattern(1, i)?, pattern(2, i)?);
        assert_close(
            &format!("{name} step {i} scale_model_input"),
            &scheduler.scale_model_input(&sample, i)?,
            &expected(case.scaled_input[i], SHAPE)?,
        )?;
        assert_close(
            &format!("{name} step {i} prev_sample"),
            &scheduler.step(&output, i, &sample, &noise)?,
            &expected(case.prev_sample[i], SHAPE)?,
        )?;
    }
    Ok(())
}

#[test]
fn other_configs_match_diffusers() -> TestResult {
    let mut failures = Vec::new();
    for case in CASES {
        let config: SchedulerConfig = serde_json::from_str(case.config)?;
        let result = match case.kind {
            "ddim" => run_ddim_case(case, &config),
            "euler" => run_euler_case(case, &config),
            other => anyhow::bail!("unknown case kind {other}"),
        };
        if let Err(e) = result {
            failures.push(format!("{} ({}): {e}", case.name, case.kind));
        }
    }
    anyhow::ensure!(failures.is_empty(), "{}", failures.join("\n"));
    Ok(())
}

#[rustfmt::skip]
#[allow(clippy::excessive_precision, clippy::approx_constant)]
mod generated {
    use super::Case;
// BEGIN GENERATED by tests/make_scheduler_fixtures.py; do not edit by hand.
// diffusers 0.42.1, torch 2.15.0+cu132.
pub(super) const CASES: &[Case] = &[
    Case {
        name: "ipx2p_leading_eta1",
        kind: "ddim",
        config: r#"{"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1}"#,
        steps: 5,
        eta: 1.0,
        timesteps: &[801.0, 601.0, 401.0, 201.0, 1.0],
        alphas_cumprod: &[(0, 0.9991499781608582), (1, 0.9982960224151611), (500, 0.27633246779441833), (999, 0.00466009508818388)],
        final_alpha_cumprod: 0.9991499781608582,
        sigmas: &[],
        init_noise_sigma: 1.0,
        prev_sample: &[&[-0.366728812456131, 5.715298175811768, 3.4244000911712646, -3.8832521438598633, -5.501930236816406, 0.9397321343421936, 6.004684925079346, 2.2727603912353516, -4.788763999938965, -4.834737777709961, 2.202190637588501, 6.012903690338135], &[2.798579216003418, 4.223692417144775, -0.5389133095741272, -4.512009620666504, -1.8750017881393433, 3.5088884830474854, 3.752248764038086, -1.5014444589614868, -4.55551815032959, -0.9357470870018005, 4.054895401000977, 3.105106830596924], &[3.614433765411377, 1.526141881942749, -2.7979516983032227, -3.0230395793914795, 1.1806325912475586, 3.654675245285034, 0.774610161781311, -3.240260601043701, -2.5081419944763184, 1.8984103202819824, 3.523787021636963, -0.013192564249038696], &[2.5160510540008545, -1.2197966575622559, -3.1686394214630127, -0.4754180908203125, 2.9142916202545166, 2.034557342529297, -1.8258082866668701, -3.0113604068756104, 0.21473751962184906, 3.126244306564331, 1.4577960968017578, -2.346327304840088], &[0.13985589146614075, -2.369314193725586, -1.4074333906173706, 1.6163407564163208, 2.27217173576355, -0.400734007358551, -2.4865636825561523, -0.929571807384491, 1.9892452955245972, 1.9938130378723145, -0.9225596189498901, -2.4873805046081543]],
        log_prob: &[Some(&[-1.012911081314087, -0.9296193718910217]), Some(&[-0.7597734332084656, -0.7236105799674988]), Some(&[-0.2964819669723511, -0.3674807548522949]), Some(&[2.0495359897613525, 1.9892383813858032]), Some(&[2.684041738510132, 2.734543561935425])],
        scaled_input: &[],
    },
    Case {
        name: "ipx2p_leading_eta0",
        kind: "ddim",
        config: r#"{"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false, "set_alpha_to_one": false, "steps_offset": 1}"#,
        steps: 4,
        eta: 0.0,
        timesteps: &[751.0, 501.0, 251.0, 1.0],
        alphas_cumprod: &[(0, 0.9991499781608582), (1, 0.9982960224151611), (500, 0.27633246779441833), (999, 0.00466009508818388)],
        final_alpha_cumprod: 0.9991499781608582,
        sigmas: &[],
        init_noise_sigma: 1.0,
        prev_sample: &[&[0.758251428604126, 6.2442827224731445, 2.582425117492676, -4.8626909255981445, -5.183953285217285, 2.0892882347106934, 6.301717758178711, 1.282116174697876, -5.61578893661499, -4.2865495681762695, 3.3224947452545166, 6.0640764236450195], &[3.2573306560516357, 3.636461019515991, -1.311832308769226, -4.338288307189941, -1.0091416835784912, 3.7983996868133545, 3.0412771701812744, -2.171323776245117, -4.202929973602295, -0.07723379135131836, 4.161610126495361, 2.303685426712036], &[3.4230499267578125, 1.0377764701843262, -2.867842197418213, -2.5720653533935547, 1.491793155670166, 3.370171308517456, 0.31124043464660645, -3.20365834236145, -2.0251901149749756, 2.1201860904693604, 3.15948486328125, -0.42986929416656494], &[1.701249122619629, -1.3195157051086426, -2.40718674659729, 0.03167637437582016, 2.424133539199829, 1.265229344367981, -1.7472387552261353, -2.199997901916504, 0.5702450275421143, 2.505077838897705, 0.7699657082557678, -2.0931479930877686]],
        log_prob: &[None, None, None, None],
        scaled_input: &[],
    },
    Case {
        name: "linear_trailing_v_clip",
        kind: "ddim",
        config: r#"{"prediction_type": "v_prediction", "set_alpha_to_one": true, "timestep_spacing": "trailing"}"#,
        steps: 4,
        eta: 0.5,
        timesteps: &[999.0, 749.0, 499.0, 249.0],
        alphas_cumprod: &[(0, 0.9998999834060669), (1, 0.9997800588607788), (500, 0.07779665291309357), (999, 4.035830352222547e-05)],
        final_alpha_cumprod: 1.0,
        sigmas: &[],
        init_noise_sigma: 1.0,
        prev_sample: &[&[0.11989477276802063, 1.9629428386688232, 0.930275022983551, -1.465247631072998, -1.7141790390014648, 0.548166036605835, 2.007446765899658, 0.5258132815361023, -1.726137638092041, -1.448840856552124, 0.9507694244384766, 1.9579522609710693], &[1.366225004196167, 1.8927301168441772, -0.3449324667453766, -2.0935044288635254, -0.7750874757766724, 1.6788344383239746, 1.6512788534164429, -0.7836443185806274, -2.0925076007843018, -0.335842490196228, 1.9128330945968628, 1.3456333875656128], &[1.936278223991394, 1.0257763862609863, -1.5918705463409424, -1.5943937301635742, 0.5874533653259277, 1.904885172843933, 0.5851061344146729, -1.8773627281188965, -1.3924609422683716, 1.0279285907745361, 1.8181945085525513, 0.11703836917877197], &[1.0, -0.6384073495864868, -1.0, -0.559127926826477, 1.0, 1.0, -1.0, -1.0, -0.07969453930854797, 1.0, 1.0, -1.0]],
        log_prob: &[Some(&[-0.5103233456611633, -0.42703166604042053]), Some(&[-0.4307270348072052, -0.3945642411708832]), Some(&[-0.027404189109802246, -0.09840283542871475]), None],
        scaled_input: &[],
    },
    Case {
        name: "cos_linspace_sample_clip",
        kind: "ddim",
        config: r#"{"beta_schedule": "squaredcos_cap_v2", "clip_sample": true, "clip_sample_range": 0.5, "prediction_type": "sample", "set_alpha_to_one": false, "timestep_spacing": "linspace"}"#,
        steps: 3,
        eta: 1.0,
        timesteps: &[999.0, 500.0, 0.0],
        alphas_cumprod: &[(0, 0.9999586939811707), (1, 0.9999125599861145), (500, 0.4922850430011749), (999, 2.4287349909002387e-09)],
        final_alpha_cumprod: 0.9999586939811707,
        sigmas: &[],
        init_noise_sigma: 1.0,
        prev_sample: &[&[-0.6007726192474365, -0.6512336730957031, 0.3850393295288086, 0.750251293182373, 0.011881798505783081, -0.620238184928894, -0.4763829708099365, 0.49804961681365967, 0.7423467040061951, -0.1623271256685257, -0.696699321269989, -0.29083797335624695], &[0.02834060788154602, -0.15933001041412354, -0.29738083481788635, 0.25775283575057983, 0.177757129073143, -0.1066487729549408, -0.14502838253974915, -0.22611141204833984, 0.20856232941150665, 0.21665343642234802, -0.23664440214633942, -0.1464749127626419], &[2.591017484664917, 0.7786059379577637, -2.290414810180664, -2.0663247108459473, 1.4460994005203247, 2.619506597518921, 0.13494405150413513, -2.452340602874756, -1.622135043144226, 1.8509397506713867, 2.5019259452819824, -0.5384482145309448]],
        log_prob: &[Some(&[-1.0700058937072754, -0.9867141842842102]), Some(&[0.16214601695537567, 0.19830887019634247]), None],
        scaled_input: &[],
    },
    Case {
        name: "zero_snr_trailing_v",
        kind: "ddim",
        config: r#"{"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": false, "prediction_type": "v_prediction", "rescale_betas_zero_snr": true, "set_alpha_to_one": false, "timestep_spacing": "trailing"}"#,
        steps: 4,
        eta: 1.0,
        timesteps: &[999.0, 749.0, 499.0, 249.0],
        alphas_cumprod: &[(0, 0.9991499781608582), (1, 0.9982334971427917), (500, 0.2410186380147934), (999, 0.0)],
        final_alpha_cumprod: 0.9991499781608582,
        sigmas: &[],
        init_noise_sigma: 1.0,
        prev_sample: &[&[-1.0842026472091675, -0.360332190990448, 0.8914257884025574, 0.8372429013252258, -0.4435027837753296, -1.07451593875885, -0.13136067986488342, 1.0042381286621094, 0.6686257719993591, -0.646524965763092, -1.0145151615142822, 0.10376176238059998], &[0.03373020887374878, 1.2778511047363281, 0.6499171257019043, -0.9301469326019287, -1.1475434303283691, 0.31621384620666504, 1.316717267036438, 0.38822677731513977, -1.1090167760849, -0.9815481305122375, 0.5838907957077026, 1.2939283847808838], &[1.6664851903915405, 1.1817474365234375, -1.0342532396316528, -1.7350705862045288, 0.1059945821762085, 1.79177725315094, 0.8526021242141724, -1.3356372117996216, -1.5671650171279907, 0.4972077012062073, 1.8331698179244995, 0.48353391885757446], &[1.9491504430770874, -0.7700522541999817, -2.361126184463501, -0.4931448698043823, 2.097294807434082, 1.6151927709579468, -1.2331706285476685, -2.2749361991882324, 0.01608513668179512, 2.2835419178009033, 1.2056043148040771, -1.6385464668273926]],
        log_prob: &[Some(&[-1.194320559501648, -1.111029028892517]), Some(&[-0.9894046783447266, -0.9532418847084045]), Some(&[-0.5085655450820923, -0.5795642733573914]), Some(&[2.3954741954803467, 2.335177183151245])],
        scaled_input: &[],
    },
    Case {
        name: "small_t_leading_offset",
        kind: "ddim",
        config: r#"{"beta_end": 0.05, "beta_start": 0.001, "clip_sample": true, "clip_sample_range": 2.0, "num_train_timesteps": 100, "steps_offset": 2}"#,
        steps: 7,
        eta: 0.3,
        timesteps: &[86.0, 72.0, 58.0, 44.0, 30.0, 16.0, 2.0],
        alphas_cumprod: &[(0, 0.9990000128746033), (1, 0.9975065588951111), (50, 0.5025535821914673), (99, 0.07473360747098923)],
        final_alpha_cumprod: 1.0,
        sigmas: &[],
        init_noise_sigma: 1.0,
        prev_sample: &[&[0.5402991771697998, 0.46290361881256104, 0.32114100456237793, -0.8248499631881714, -0.22867783904075623, 1.2362638711929321, 0.3563200831413269, 0.41596880555152893, -0.6675337553024292, -0.23934176564216614, 1.073242425918579, 0.2797679901123047], &[1.1514520645141602, 0.5812833309173584, -1.049922227859497, -0.7160568833351135, -0.7095165252685547, 1.0081502199172974, 0.5819394588470459, -1.3739595413208008, -0.6398590207099915, -0.0010597705841064453, 0.8769077658653259, 0.6146125197410583], &[1.0894593000411987, 0.8184700012207031, -1.342154622077942, -0.9559653401374817, 1.480502963066101, 1.0204163789749146, 0.15039502084255219, -1.2299782037734985, -0.9765749573707581, 1.5246692895889282, 0.975113034248352, -0.5247220993041992], &[1.3308088779449463, -1.284332513809204, -1.3884299993515015, -0.282010555267334, 1.5506678819656372, 1.3419394493103027, -1.7710864543914795, -1.3511135578155518, 0.3613888919353485, 1.4755852222442627, 1.2118606567382812, -1.6797277927398682], &[0.3952745199203491, -1.805187463760376, -1.6748602390289307, 1.645371675491333, 1.684299349784851, -0.21837031841278076, -1.7603970766067505, -1.271133303642273, 1.8813722133636475, 1.671904444694519, -0.8217900991439819, -1.7229483127593994], &[-1.4858965873718262, -1.9422885179519653, 0.09965435415506363, 1.9599727392196655, 1.3151110410690308, -1.9408514499664307, -1.9393337965011597, 0.6817548274993896, 1.9513025283813477, 0.7724754214286804, -1.9759262800216675, -1.9390097856521606], &[-2.0, -1.2311152219772339, 1.811567783355713, 2.0, -0.6344124674797058, -2.0, -0.7243258357048035, 2.0, 1.8757457733154297, -1.1486766338348389, -2.0, -0.18362003564834595]],
        log_prob: &[Some(&[0.47309279441833496, 0.5563845634460449]), Some(&[0.6173703074455261, 0.6535331606864929]), Some(&[0.8339127898216248, 0.7629140019416809]), Some(&[1.068889856338501, 1.0085922479629517]), Some(&[1.4379693269729614, 1.4884706735610962]), Some(&[2.7277300357818604, 2.805194854736328]), None],
        scaled_input: &[],
    },
    Case {
        name: "ipx2p_linspace",
        kind: "euler",
        config: r#"{"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "steps_offset": 1}"#,
        steps: 5,
        eta: 0.0,
        timesteps: &[999.0, 749.25, 499.5, 249.75, 0.0],
        alphas_cumprod: &[],
        final_alpha_cumprod: 0.0,
        sigmas: &[14.614646911621094, 4.086089611053467, 1.6155834197998047, 0.6951509714126587, 0.02916753478348255, 0.0],
        init_noise_sigma: 14.614646911621094,
        prev_sample: &[&[-12.196174621582031, 7.81430721282959, 16.376811981201172, 0.9472477436065674, -15.870033264160156, -9.437679290771484, 10.82089900970459, 15.22683334350586, -2.674576997756958, -16.65772819519043, -6.237266540527344, 13.32080364227295], &[0.6493445634841919, 5.463955402374268, 2.2738585472106934, -4.247445583343506, -4.546232223510742, 1.8152226209640503, 5.517372131347656, 1.1365586519241333, -4.909315586090088, -3.763031005859375, 2.8961026668548584, 5.312439441680908], &[3.050045967102051, 2.0696465969085693, -1.9427900314331055, -3.109034776687622, 0.27946388721466064, 3.258547067642212, 1.4638512134552002, -2.4753901958465576, -2.788179397583008, 0.9837208986282349, 3.314467430114746, 0.789511501789093], &[2.3760716915130615, -0.9730793237686157, -2.8966665267944336, -0.5766306519508362, 2.5881705284118652, 1.9612958431243896, -1.5388820171356201, -2.7845940589904785, 0.0491306409239769, 2.8108787536621094, 1.4546829462051392, -2.0326268672943115], &[0.12971985340118408, -2.385279655456543, -1.405838966369629, 1.6331592798233032, 2.2795751094818115, -0.41359177231788635, -2.5008459091186523, -0.9243549108505249, 2.0063183307647705, 1.9977303743362427, -0.9375370740890503, -2.4993104934692383]],
        log_prob: &[],
        scaled_input: &[&[0.050434134900569916, 0.17058944702148438, 0.0408308207988739, -0.14874504506587982, -0.12040907889604568, 0.08432648330926895, 0.16552355885505676, 0.0042282291688025, -0.16326145827770233, -0.09157273173332214, 0.11427026987075806, 0.152707040309906], &[0.5000806450843811, 0.44316768646240234, -0.262986958026886, -0.5838650465011597, -0.04937948286533356, 0.5574471950531006, 0.3476124405860901, -0.37147536873817444, -0.5463508367538452, 0.07917892187833786, 0.5887113809585571, 0.23578029870986938], &[1.3048021793365479, 0.18568138778209686, -1.205463171005249, -0.8306013345718384, 0.7610933780670166, 1.237784504890442, -0.0988815501332283, -1.2906858921051025, -0.5916324257850647, 0.9741639494895935, 1.1128077507019043, -0.37881436944007874], &[1.3865537643432617, -1.0876185894012451, -1.9684271812438965, 0.0345146544277668, 1.9868923425674438, 1.028468132019043, -1.436664342880249, -1.797080159187317, 0.47523069381713867, 2.0513274669647217, 0.622224748134613, -1.718438744544983], &[0.10390745848417282, -2.3779938220977783, -1.3761285543441772, 1.641768217086792, 2.2544705867767334, -0.435631662607193, -2.487532615661621, -0.8951924443244934, 2.0086069107055664, 1.969792366027832, -0.9547724723815918, -2.48059344291687]],
    },
    Case {
        name: "linear_leading_v",
        kind: "euler",
        config: r#"{"prediction_type": "v_prediction", "steps_offset": 1, "timestep_spacing": "leading"}"#,
        steps: 4,
        eta: 0.0,
        timesteps: &[751.0, 501.0, 251.0, 1.0],
        alphas_cumprod: &[],
        final_alpha_cumprod: 0.0,
        sigmas: &[17.51139259338379, 3.4619228839874268, 0.9631509184837341, 0.014832044020295143, 0.0],
        init_noise_sigma: 17.5399227142334,
        prev_sample: &[&[-3.9341681003570557, -0.9628996849060059, 3.4190187454223633, 2.792066812515259, -1.9252697229385376, -3.8220815658569336, -0.11953496932983398, 3.7581305503845215, 2.1301259994506836, -2.618518352508545, -3.53102707862854, 0.7294268608093262], &[-0.5418626666069031, 1.3192322254180908, 1.2476487159729004, -0.6517429351806641, -1.5963298082351685, -0.20228952169418335, 1.488105297088623, 0.9984224438667297, -0.9539515376091003, -1.508784294128418, 0.14675557613372803, 1.5872981548309326], &[1.7051899433135986, 0.8369268774986267, -1.2574360370635986, -1.5096522569656372, 0.44977566599845886, 1.7502813339233398, 0.48662060499191284, -1.4899404048919678, -1.2837352752685547, 0.8031449913978577, 1.7134158611297607, 0.1135285347700119], &[1.7027838230133057, -1.317408800125122, -2.4075944423675537, 0.029351456090807915, 2.423297166824341, 1.2671070098876953, -1.7453981637954712, -2.2008907794952393, 0.5679267048835754, 2.504730224609375, 0.7720981240272522, -2.0916597843170166]],
        log_prob: &[],
        scaled_input: &[&[0.04212108254432678, 0.14247120916843414, 0.03410068154335022, -0.12422741949558258, -0.10056206583976746, 0.07042695581912994, 0.13824032247066498, 0.0035312906838953495, -0.136351078748703, -0.07647880166769028, 0.09543511271476746, 0.1275363564491272], &[0.5837940573692322, 0.517353892326355, -0.3070109486579895, -0.6816039681434631, -0.05764560028910637, 0.650763750076294, 0.4058026969432831, -0.43366026878356934, -0.6378098726272583, 0.09243346005678177, 0.6872615814208984, 0.2752498984336853], &[1.7856227159500122, 0.2541051208972931, -1.6496771574020386, -1.1366785764694214, 1.0415568351745605, 1.6939090490341187, -0.13531947135925293, -1.766304612159729, -0.8096493482589722, 1.3331440687179565, 1.5228782892227173, -0.5184077620506287], &[1.6884722709655762, -1.3244446516036987, -2.3970470428466797, 0.042030129581689835, 2.4195327758789062, 1.252414345741272, -1.749494194984436, -2.188389539718628, 0.5787109136581421, 2.4979984760284424, 0.7577124834060669, -2.0926241874694824]],
    },
    Case {
        name: "zero_snr_trailing_v",
        kind: "euler",
        config: r#"{"beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "prediction_type": "v_prediction", "rescale_betas_zero_snr": true, "timestep_spacing": "trailing"}"#,
        steps: 3,
        eta: 0.0,
        timesteps: &[999.0, 666.0, 332.0],
        alphas_cumprod: &[],
        final_alpha_cumprod: 0.0,
        sigmas: &[4096.0, 3.5009355545043945, 0.9834383130073547, 0.0],
        init_noise_sigma: 4096.0,
        prev_sample: &[&[-4.097731113433838, -1.096704125404358, 3.5109968185424805, 2.97507905960083, -1.9193364381790161, -4.001919746398926, -0.2216811180114746, 3.8833205699920654, 2.2992489337921143, -2.6532278060913086, -3.718719244003296, 0.6637217998504639], &[-0.5584999918937683, 1.3224830627441406, 1.2660253047943115, -0.6451623439788818, -1.6111856698989868, -0.21681815385818481, 1.4951884746551514, 1.0167405605316162, -0.9512346982955933, -1.525648832321167, 0.13501614332199097, 1.5978820323944092], &[1.6893017292022705, 0.828506588935852, -1.2460527420043945, -1.495141863822937, 0.4461553692817688, 1.7338340282440186, 0.4814417064189911, -1.4762637615203857, -1.2712393999099731, 0.7961536645889282, 1.6971796751022339, 0.11183357238769531]],
        log_prob: &[],
        scaled_input: &[&[0.00018037122208625078, 0.0006100913160480559, 0.00014602619921788573, -0.000531967612914741, -0.00043062763870693743, 0.0003015828551724553, 0.0005919737741351128, 1.5121720025490504e-05, -0.0005838836659677327, -0.0003274981281720102, 0.00040867296047508717, 0.0005461371620185673], &[0.5777818560600281, 0.5120258927345276, -0.3038491904735565, -0.6745845079421997, -0.05705193802714348, 0.6440618634223938, 0.40162354707717896, -0.42919424176216125, -0.6312413811683655, 0.0914815366268158, 0.6801838278770447, 0.2724152207374573], &[1.7676085233688354, 0.2515415549278259, -1.633034348487854, -1.1252111196517944, 1.0310490131378174, 1.676819920539856, -0.13395430147647858, -1.7484852075576782, -0.8014811873435974, 1.3196946382522583, 1.5075147151947021, -0.513177752494812]],
    },
    Case {
        name: "cos_linspace_eps",
        kind: "euler",
        config: r#"{"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"}"#,
        steps: 6,
        eta: 0.0,
        timesteps: &[999.0, 799.2000122070312, 599.4000244140625, 399.6000061035156, 199.8000030517578, 0.0],
        alphas_cumprod: &[],
        final_alpha_cumprod: 0.0,
        sigmas: &[20291.302734375, 3.107060194015503, 1.3925848007202148, 0.7393172383308411, 0.3371134400367737, 0.006427108775824308, 0.0],
        init_noise_sigma: 20291.302734375,
        prev_sample: &[&[-13708.326171875, 10752.12109375, 19460.685546875, -340.6995544433594, -19642.958984375, -10168.2373046875, 14202.9755859375, 17766.796875, -4697.78125, -20280.099609375, -6152.0234375, 16988.779296875], &[0.9006437063217163, 4.494797229766846, 1.504062294960022, -3.69012713432312, -3.478271961212158, 1.8292601108551025, 4.456921577453613, 0.5551825165748596, -4.159900188446045, -2.780719757080078, 2.6722216606140137, 4.210352420806885], &[2.856828451156616, 1.7759456634521484, -1.9067018032073975, -2.7960267066955566, 0.41083401441574097, 3.015821933746338, 1.2026236057281494, -2.3724210262298584, -2.4718635082244873, 1.0499801635742188, 3.033600330352783, 0.5729889273643494], &[2.3545711040496826, -0.7528090476989746, -2.757322311401367, -0.7223517894744873, 2.3708653450012207, 1.9907594919204712, -1.3058139085769653, -2.689366579055786, -0.13299092650413513, 2.6182167530059814, 1.5337307453155518, -1.797674536705017], &[0.40713274478912354, -2.446779251098633, -1.7161539793014526, 1.5286412239074707, 2.533973217010498, -0.17297126352787018, -2.6265127658843994, -1.2322068214416504, 1.9672850370407104, 2.2846999168395996, -0.7449758648872375, -2.683259963989258], &[-1.527241826057434, -2.3196377754211426, 0.2862410545349121, 2.472775936126709, 1.0366883277893066, -1.9181501865386963, -2.062894105911255, 0.8145065903663635, 2.4986534118652344, 0.5222670435905457, -2.2192416191101074, -1.7095561027526855]],
        log_prob: &[],
        scaled_input: &[&[3.6409714084584266e-05, 0.00012315296044107527, 2.9476832423824817e-05, -0.00010738291894085705, -8.692644769325852e-05, 6.087747897254303e-05, 0.00011949575855396688, 3.0524686280841706e-06, -0.00011786269169533625, -6.61087324260734e-05, 8.249467646237463e-05, 0.00011024318519048393], &[0.6445052027702332, 0.5711556077003479, -0.33893826603889465, -0.7524867653846741, -0.06364040076732635, 0.7184393405914307, 0.44800376892089844, -0.4787583649158478, -0.7041383385658264, 0.10204599052667618, 0.7587327361106873, 0.30387425422668457], &[1.4460506439208984, 0.20578190684318542, -1.3359577655792236, -0.9205161929130554, 0.8434838056564331, 1.3717780113220215, -0.10958574712276459, -1.4304062128067017, -0.6556782126426697, 1.0796198844909668, 1.2332723140716553, -0.4198220670223236], &[1.3578572273254395, -1.0651088953018188, -1.9276880025863647, 0.03380032628774643, 1.9457709789276123, 1.0071825981140137, -1.406930685043335, -1.7598872184753418, 0.46539515256881714, 2.0088725090026855, 0.6093469858169556, -1.6828733682632446], &[0.0985049232840538, -2.2543528079986572, -1.304578423500061, 1.5564064979553223, 2.13725209236145, -0.4129815399646759, -2.358196496963501, -0.8486480116844177, 1.9041718244552612, 1.8673754930496216, -0.9051302671432495, -2.3516180515289307], &[-1.5296131372451782, -2.3144891262054443, 0.2913669943809509, 2.470369577407837, 1.0302749872207642, -1.9191749095916748, -2.0570290088653564, 0.8186691999435425, 2.4950151443481445, 0.5161580443382263, -2.218871831893921, -1.703249216079712]],
    },
];
// END GENERATED
}
use generated::CASES;

mod common;
use common::device;
