"""Checks that an adapter written by `rl4pix-train ddpo` loads into diffusers with
`load_lora_weights` with no missing or unexpected keys, and that the weights diffusers holds are the
file's.

How to run
----------
    cd /work/main
    cargo run -p rl4pix-training --bin rl4pix-train -- ddpo \
        --model tests/fixtures/pipelines/sd1 --dataset tests/fixtures/magicbrush \
        --out /tmp/ddpo-sd1.safetensors --set logdir=/tmp/ddpo-sd1-run \
        --set num_epochs=2 --set sample.num_steps=4 --set sample.batch_size=2 --set train.batch_size=2
    /work/pyenv/bin/python tests/check_adapter_in_diffusers.py /tmp/ddpo-sd1.safetensors \
        [--model tests/fixtures/pipelines/sd1]

Needs torch, diffusers, peft and safetensors; no network. Exits non-zero (with the offending keys) on
any missing or unexpected key, on a weight that differs from the file, or when the adapter has no
effect on the UNet's output while its B matrices are non-zero. CI never runs this script.
"""

import argparse
import json
import logging
import sys

import torch
from diffusers import StableDiffusionInstructPix2PixPipeline
from safetensors import safe_open
from safetensors.torch import load_file


class Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("adapter")
    parser.add_argument("--model", default="tests/fixtures/pipelines/sd1")
    args = parser.parse_args()

    with safe_open(args.adapter, "pt") as f:
        metadata = f.metadata() or {}
    file_tensors = load_file(args.adapter)
    config = json.loads(metadata["lora_adapter_metadata"])
    # diffusers writes the PEFT config with keys prefixed by the component (`unet.r`).
    print(f"file: {len(file_tensors)} tensors, r={config['unet.r']}, lora_alpha={config['unet.lora_alpha']}, "
          f"target_modules={config['unet.target_modules']}, "
          f"fingerprint={metadata.get('rl4pix.base_fingerprint')}")

    pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained(args.model, safety_checker=None)
    unet = pipe.unet
    torch.manual_seed(0)
    sample = torch.randn(1, unet.config.in_channels, 8, 8)
    context = torch.randn(1, 7, unet.config.cross_attention_dim)
    with torch.no_grad():
        base_out = unet(sample, 500, context).sample

    handler = Collect()
    for name in ("diffusers", "peft"):
        logging.getLogger(name).addHandler(handler)
    pipe.load_lora_weights(args.adapter, adapter_name="ddpo")

    problems = [m for m in handler.messages if "unexpected keys" in m or "missing keys" in m]

    # Every tensor of the file must be in the model, under PEFT's names, with the file's values.
    model_state = {k: v for k, v in unet.state_dict().items() if ".lora_" in k}
    expected = {}
    for key, tensor in file_tensors.items():
        assert key.startswith("unet."), key
        module, part = key[len("unet."):].rsplit(".lora_", 1)
        expected[f"{module}.lora_{part.replace('.weight', '')}.ddpo.weight"] = tensor
    missing = sorted(set(expected) - set(model_state))
    unexpected = sorted(set(model_state) - set(expected))
    if missing:
        problems.append(f"missing in the model: {missing}")
    if unexpected:
        problems.append(f"in the model but not in the file: {unexpected}")
    for key in sorted(set(expected) & set(model_state)):
        if not torch.equal(model_state[key].float(), expected[key].float()):
            problems.append(f"{key}: the model's values differ from the file's")

    nonzero_b = any(t.abs().max() > 0 for k, t in file_tensors.items() if "lora_B" in k)
    with torch.no_grad():
        lora_out = unet(sample, 500, context).sample
    changed = (lora_out - base_out).abs().max().item()
    print(f"loaded {len(model_state)} LoRA tensors into the UNet; max |output change| = {changed:.3e}")
    if nonzero_b and changed == 0.0:
        problems.append("the adapter has non-zero B but does not change the UNet's output")

    if problems:
        print("FAILED:\n  " + "\n  ".join(problems))
        sys.exit(1)
    print("OK: no missing or unexpected keys; values equal the file's")


if __name__ == "__main__":
    main()
