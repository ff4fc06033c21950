"""Times diffusers' UNet2DConditionModel the way `rl4pix-bench` times the Candle UNet.

Run with the project's Python environment, e.g.

    /work/pyenv/bin/python bench/diffusers_bench.py unet --config bench/configs/tiny.json \
        --batch 8 --height 16 --width 16 --tokens 77 --iters 10 --threads 2
    /work/pyenv/bin/python bench/diffusers_bench.py sgemm --size 2048 --threads 2

`--height`/`--width` are LATENT sizes (the UNet's input), as in `rl4pix-bench`. Weights are
random (diffusers' default init). `--backward` attaches rank-4 LoRA (PEFT, alpha 4) to
to_q/to_k/to_v/to_out.0 with the base frozen and times forward + backward of
mean(output^2). The last line printed is `ms_per_iter X` (median over the timed iterations).
`edit --model DIR --image PNG --steps 20` times one whole InstructPix2Pix pipeline edit (load
included) and prints per_step_ms, fixed_ms, peak_rss_mib and total_ms, as `rl4pix-bench edit`.
`--flops` also prints `gflop X`: the forward's FLOPs counted by torch.utils.flop_counter
(2 per multiply-add, matmuls, convolutions and attention only). `--device cuda:0 --dtype f16`
times the same on a GPU in half precision (each step waits for the GPU to finish).
"""

import argparse
import json
import statistics
import time

import torch


def build_unet(config_path):
    from diffusers import UNet2DConditionModel

    with open(config_path) as f:
        config = json.load(f)
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config)
    unet.eval()
    return unet, config


def cross_dim(config):
    value = config["cross_attention_dim"]
    return value[0] if isinstance(value, list) else value


DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


def inputs(config, args):
    generator = torch.Generator().manual_seed(1)
    dtype = DTYPES[args.dtype]
    sample = torch.randn(
        args.batch, config["in_channels"], args.height, args.width, generator=generator
    )
    timesteps = torch.randint(0, 1000, (args.batch,), generator=generator).float()
    context = torch.randn(args.batch, args.tokens, cross_dim(config), generator=generator)
    return (
        sample.to(args.device, dtype),
        timesteps.to(args.device),
        context.to(args.device, dtype),
    )


def synchronize(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize(device)


def time_iters(step, warmup, iters):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1000.0)
    return times


def bench_unet(args):
    unet, config = build_unet(args.config)
    unet.to(args.device, DTYPES[args.dtype])
    sample, timesteps, context = inputs(config, args)
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        counter = FlopCounterMode(display=False)
        with torch.no_grad(), counter:
            unet(sample, timesteps, context)
        print(f"gflop {counter.get_total_flops() / 1e9:.4f}")
    if args.backward:
        from peft import LoraConfig

        unet.requires_grad_(False)
        unet.add_adapter(
            LoraConfig(
                r=4,
                lora_alpha=4,
                init_lora_weights="gaussian",
                target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            )
        )
        lora_params = [p for p in unet.parameters() if p.requires_grad]
        unet.train()

        def step():
            for p in lora_params:
                p.grad = None
            out = unet(sample, timesteps, context).sample
            loss = out.square().mean()
            loss.backward()
            synchronize(args.device)

    else:

        def step():
            with torch.no_grad():
                unet(sample, timesteps, context)
            synchronize(args.device)

    cpu_start = None

    def timed_step():
        nonlocal cpu_start
        if cpu_start is None:
            cpu_start = time.process_time()
        step()

    for _ in range(args.warmup):
        step()
    times = time_iters(timed_step, 0, args.iters)
    cpu = (time.process_time() - cpu_start) * 1000.0 / len(times)
    print(f"cpu_ms_per_iter {cpu:.3f}")
    print(f"min_ms {min(times):.3f}")
    print(f"ms_per_iter {statistics.median(times):.3f}")


def bench_edit(args):
    """One whole StableDiffusionInstructPix2PixPipeline edit, load included, as `rl4pix-bench
    edit` times it: half-precision files are upcast to float32 at load (the CPU pipeline).
    `--autocast-bf16` runs the pipeline under torch's CPU autocast to bfloat16 (matmuls and
    convolutions in bf16 through oneDNN, on AMX where the CPU has it): the same numerics as
    rl4pix's `--matmul-precision bf16`."""
    import resource
    from pathlib import Path

    from diffusers import StableDiffusionInstructPix2PixPipeline
    from PIL import Image

    start = time.perf_counter()
    variant = "fp16" if any(Path(args.model).glob("unet/*.fp16.safetensors")) else None
    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(
        args.model, variant=variant, torch_dtype=torch.float32, safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    image = Image.open(args.image).convert("RGB")
    load = time.perf_counter() - start
    marks = []

    def on_step(_pipe, _step, _timestep, kwargs):
        marks.append(time.perf_counter())
        return kwargs

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.autocast_bf16):
        pipe(
            "turn the sky into a starry night",
            image=image,
            num_inference_steps=args.steps,
            guidance_scale=7.5,
            image_guidance_scale=1.5,
            generator=torch.Generator().manual_seed(0),
            callback_on_step_end=on_step,
        )
    total = time.perf_counter() - start
    per_step = (marks[-1] - marks[0]) / (len(marks) - 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    print(f"load_ms {load * 1000:.1f}")
    print(f"per_step_ms {per_step * 1000:.1f}")
    print(f"fixed_ms {(total - len(marks) * per_step) * 1000:.1f}")
    print(f"peak_rss_mib {peak:.1f}")
    print(f"total_ms {total * 1000:.1f}")


def bench_sgemm(args):
    a = torch.randn(args.size, args.size)
    b = torch.randn(args.size, args.size)
    times = time_iters(lambda: torch.matmul(a, b), 2, args.iters)
    best = min(times)
    print(f"gflops {2.0 * args.size**3 / (best / 1000.0) / 1e9:.1f}")
    print(f"ms_per_iter {best:.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    unet = sub.add_parser("unet")
    unet.add_argument("--config", required=True)
    unet.add_argument("--batch", type=int, default=1)
    unet.add_argument("--height", type=int, required=True, help="latent height")
    unet.add_argument("--width", type=int, required=True, help="latent width")
    unet.add_argument("--tokens", type=int, default=77)
    unet.add_argument("--iters", type=int, default=5)
    unet.add_argument("--warmup", type=int, default=1)
    unet.add_argument("--backward", action="store_true")
    unet.add_argument("--flops", action="store_true")
    unet.add_argument("--threads", type=int, default=0)
    unet.add_argument("--device", default="cpu", help="cpu or cuda:N")
    unet.add_argument("--dtype", default="f32", choices=sorted(DTYPES))
    sgemm = sub.add_parser("sgemm")
    sgemm.add_argument("--size", type=int, default=2048)
    sgemm.add_argument("--iters", type=int, default=5)
    sgemm.add_argument("--threads", type=int, default=0)
    edit = sub.add_parser("edit")
    edit.add_argument("--model", required=True, help="a diffusers InstructPix2Pix folder")
    edit.add_argument("--image", required=True)
    edit.add_argument("--steps", type=int, default=20)
    edit.add_argument("--threads", type=int, default=0)
    edit.add_argument("--autocast-bf16", action="store_true")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.command == "unet":
        bench_unet(args)
    elif args.command == "edit":
        bench_edit(args)
    else:
        bench_sgemm(args)


if __name__ == "__main__":
    main()
