"""Expected values for the scheduler unit cases in `model/tests/scheduler_parity.rs`.

The pipeline fixtures (tests/make_model_fixtures.py) cover the two shipped scheduler configs; this
script covers the other config combinations (spacing, prediction types, beta schedules, zero-SNR
rescaling, clipping, eta) with diffusers' DDIMScheduler / EulerAncestralDiscreteScheduler. The
values are small, so they are written straight into the test file, between the
`BEGIN GENERATED` / `END GENERATED` markers.

Rerun (from the repository root):

    /work/pyenv/bin/python tests/make_scheduler_fixtures.py

Inputs are not stored: every case feeds the same closed-form tensors (see `pattern`), which the
Rust test rebuilds with the same formula. Each step is evaluated on its own (not chained).

DDIM's per-step scalars are evaluated with diffusers' own `step`, but from f64 cumulative alphas:
in f32, `1 - alpha_prev - std^2` cancels to 0 when alpha_t is ~0 (first step of a cosine schedule
at eta 1), which changes the result by ~2e-4. Our implementation computes these scalars in f64,
so the f64 value is the one to match. Tensors stay f32.
"""

import json
import math
import re
from pathlib import Path

import diffusers
import numpy as np
import torch
from diffusers import DDIMScheduler, EulerAncestralDiscreteScheduler
from diffusers.schedulers import scheduling_euler_ancestral_discrete

ROOT = Path(__file__).resolve().parent.parent
TEST_FILE = ROOT / "model" / "tests" / "scheduler_parity.rs"

# (B, C, H, W) of every input tensor.
SHAPE = (2, 2, 1, 3)
# The input kinds of `pattern`, in the order the Rust test numbers them.
SAMPLE, MODEL_OUTPUT, NOISE = 0, 1, 2
AMPLITUDE = {SAMPLE: 2.5, MODEL_OUTPUT: 1.0, NOISE: 1.0}


def pattern(kind: int, step: int) -> torch.Tensor:
    """amplitude * sin(1.3 e + 0.7 step + 2.1 kind + 0.3) over the flat element index e, as f32."""
    e = np.arange(int(np.prod(SHAPE)), dtype=np.float64)
    values = AMPLITUDE[kind] * np.sin(1.3 * e + 0.7 * step + 2.1 * kind + 0.3)
    return torch.from_numpy(values.astype(np.float32).reshape(SHAPE))


SCALED_LINEAR = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

DDIM_CASES = [
    ("ipx2p_leading_eta1", {**SCALED_LINEAR, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}, 5, 1.0),
    ("ipx2p_leading_eta0", {**SCALED_LINEAR, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}, 4, 0.0),
    (
        "linear_trailing_v_clip",
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction", "set_alpha_to_one": True},
        4,
        0.5,
    ),
    (
        "cos_linspace_sample_clip",
        {
            "beta_schedule": "squaredcos_cap_v2",
            "timestep_spacing": "linspace",
            "prediction_type": "sample",
            "clip_sample": True,
            "clip_sample_range": 0.5,
            "set_alpha_to_one": False,
        },
        3,
        1.0,
    ),
    (
        "zero_snr_trailing_v",
        {
            **SCALED_LINEAR,
            "rescale_betas_zero_snr": True,
            "timestep_spacing": "trailing",
            "prediction_type": "v_prediction",
            "set_alpha_to_one": False,
            "clip_sample": False,
        },
        4,
        1.0,
    ),
    (
        "small_t_leading_offset",
        {
            "num_train_timesteps": 100,
            "beta_start": 0.001,
            "beta_end": 0.05,
            "steps_offset": 2,
            "clip_sample": True,
            "clip_sample_range": 2.0,
        },
        7,
        0.3,
    ),
]

EULER_CASES = [
    ("ipx2p_linspace", {**SCALED_LINEAR, "steps_offset": 1}, 5),
    ("linear_leading_v", {"timestep_spacing": "leading", "steps_offset": 1, "prediction_type": "v_prediction"}, 4),
    (
        "zero_snr_trailing_v",
        {**SCALED_LINEAR, "rescale_betas_zero_snr": True, "timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        3,
    ),
    ("cos_linspace_eps", {"beta_schedule": "squaredcos_cap_v2", "timestep_spacing": "linspace"}, 6),
]


def ddpo_log_prob(prev_sample, mean, std):
    per_element = -((prev_sample - mean) ** 2) / (2 * std**2) - torch.log(std) - torch.log(torch.sqrt(torch.tensor(2 * math.pi)))
    return per_element.mean(dim=tuple(range(1, per_element.ndim)))


def ddim_case(name, config, steps, eta):
    scheduler = DDIMScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.double()
    scheduler.final_alpha_cumprod = scheduler.final_alpha_cumprod.double()
    train = scheduler.config.num_train_timesteps
    probes = sorted({0, 1, train // 2, train - 1})
    case = {
        "name": name,
        "kind": "ddim",
        "config": config,
        "steps": steps,
        "eta": eta,
        "timesteps": [float(t) for t in scheduler.timesteps],
        "alphas_cumprod": [(i, float(scheduler.alphas_cumprod[i])) for i in probes],
        "final_alpha_cumprod": float(scheduler.final_alpha_cumprod),
        "prev_sample": [],
        "log_prob": [],
    }
    for i, t in enumerate(scheduler.timesteps):
        sample, model_output, noise = (pattern(k, i) for k in (SAMPLE, MODEL_OUTPUT, NOISE))
        prev = scheduler.step(model_output, t, sample, eta=eta, variance_noise=noise).prev_sample
        assert torch.isfinite(prev).all(), (name, i)
        case["prev_sample"].append(prev.flatten().tolist())
        prev_t = t - train // steps
        std = eta * scheduler._get_variance(t, prev_t).sqrt()
        if std > 0:
            mean = scheduler.step(model_output, t, sample, eta=eta, variance_noise=torch.zeros(SHAPE)).prev_sample
            case["log_prob"].append(ddpo_log_prob(prev, mean, std).tolist())
        else:
            case["log_prob"].append(None)
    return case


def euler_case(name, config, steps):
    scheduler = EulerAncestralDiscreteScheduler.from_config(config)
    scheduler.set_timesteps(steps)
    case = {
        "name": name,
        "kind": "euler",
        "config": config,
        "steps": steps,
        "eta": 0.0,
        "timesteps": [float(t) for t in scheduler.timesteps],
        "sigmas": [float(s) for s in scheduler.sigmas],
        "init_noise_sigma": float(scheduler.init_noise_sigma),
        "prev_sample": [],
        "scaled_input": [],
    }
    original_randn = scheduling_euler_ancestral_discrete.randn_tensor
    try:
        for i, t in enumerate(scheduler.timesteps):
            sample, model_output, noise = (pattern(k, i) for k in (SAMPLE, MODEL_OUTPUT, NOISE))
            scheduling_euler_ancestral_discrete.randn_tensor = lambda *args, _noise=noise, **kwargs: _noise
            scheduler._step_index = i
            scaled = scheduler.scale_model_input(sample, t)
            prev = scheduler.step(model_output, t, sample).prev_sample
            assert torch.isfinite(prev).all(), (name, i)
            case["scaled_input"].append(scaled.flatten().tolist())
            case["prev_sample"].append(prev.flatten().tolist())
    finally:
        scheduling_euler_ancestral_discrete.randn_tensor = original_randn
    return case


def f(x: float) -> str:
    """A Rust float literal that parses back to the same f32/f64."""
    text = repr(float(x))
    return text if ("." in text or "e" in text or "inf" in text or "nan" in text) else text + ".0"


def floats(values) -> str:
    return "&[" + ", ".join(f(v) for v in values) + "]"


def rows(values) -> str:
    return "&[" + ", ".join(floats(v) for v in values) + "]"


def rust_case(case) -> str:
    log_prob = case.get("log_prob", [])
    lines = [
        "    Case {",
        f'        name: "{case["name"]}",',
        f'        kind: "{case["kind"]}",',
        f"        config: r#\"{json.dumps(case['config'], sort_keys=True)}\"#,",
        f"        steps: {case['steps']},",
        f"        eta: {f(case['eta'])},",
        f"        timesteps: {floats(case['timesteps'])},",
        "        alphas_cumprod: &["
        + ", ".join(f"({i}, {f(v)})" for i, v in case.get("alphas_cumprod", []))
        + "],",
        f"        final_alpha_cumprod: {f(case.get('final_alpha_cumprod', 0.0))},",
        f"        sigmas: {floats(case.get('sigmas', []))},",
        f"        init_noise_sigma: {f(case.get('init_noise_sigma', 1.0))},",
        f"        prev_sample: {rows(case['prev_sample'])},",
        "        log_prob: &["
        + ", ".join("None" if lp is None else f"Some({floats(lp)})" for lp in log_prob)
        + "],",
        f"        scaled_input: {rows(case.get('scaled_input', []))},",
        "    },",
    ]
    return "\n".join(lines)


def main() -> None:
    torch.set_grad_enabled(False)
    cases = [ddim_case(*c) for c in DDIM_CASES] + [euler_case(*c) for c in EULER_CASES]
    generated = (
        f"// diffusers {diffusers.__version__}, torch {torch.__version__}.\n"
        "pub(super) const CASES: &[Case] = &[\n" + "\n".join(rust_case(c) for c in cases) + "\n];\n"
    )
    text = TEST_FILE.read_text()
    begin = "// BEGIN GENERATED by tests/make_scheduler_fixtures.py; do not edit by hand.\n"
    end = "// END GENERATED\n"
    pattern_re = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if not pattern_re.search(text):
        raise SystemExit(f"{TEST_FILE}: generated-section markers not found")
    TEST_FILE.write_text(pattern_re.sub(lambda _: begin + generated + end, text))
    print(f"wrote {len(cases)} cases into {TEST_FILE}")


if __name__ == "__main__":
    main()
