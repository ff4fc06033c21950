"""Builds a random-weight InstructPix2Pix pipeline with timbrooks/instruct-pix2pix's exact
architecture, saved by diffusers as fp16 safetensors, for the real-size edit benchmark.

    /work/pyenv/bin/python bench/make_sd15_pipeline.py --out /work/sd15-ip2p

Needs torch, diffusers and transformers; nothing is downloaded. The components are built from
the configs in this repository (UNet: model/configs/instruct-pix2pix/unet_config.json, which is
the published UNet config with in_channels 8; VAE and CLIP text encoder: bench/configs/sd15/)
with the libraries' default random init from torch seed 0. The tokenizer is the real CLIP BPE
vocabulary (tests/fixtures/tokenizer/clip, taken from open_clip's bpe_simple_vocab_16e6.txt.gz by
tests/make_model_fixtures.py) and the scheduler is the published one (Euler ancestral). The
pipeline is written with `save_pretrained(variant="fp16")`: each weight file is
`*.fp16.safetensors` (about 2.1 GB in all), as on the Hub. The folder is not committed.
"""

import argparse
import json
import shutil
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    EulerAncestralDiscreteScheduler,
    StableDiffusionInstructPix2PixPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

ROOT = Path(__file__).resolve().parent.parent

# timbrooks/instruct-pix2pix scheduler/scheduler_config.json (the fields it sets).
SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
}


def load_json(path):
    with open(path) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()

    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(
        load_json(ROOT / "model/configs/instruct-pix2pix/unet_config.json")
    )
    vae = AutoencoderKL.from_config(load_json(ROOT / "bench/configs/sd15/vae_config.json"))
    text_config = load_json(ROOT / "bench/configs/sd15/text_encoder_config.json")
    text_config.pop("architectures", None)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    vocab = ROOT / "tests/fixtures/tokenizer/clip"
    tokenizer = CLIPTokenizer(
        str(vocab / "vocab.json"), str(vocab / "merges.txt"), model_max_length=77
    )
    scheduler = EulerAncestralDiscreteScheduler(**SCHEDULER)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.to(torch.float16)
    if args.out.exists():
        shutil.rmtree(args.out)
    pipe.save_pretrained(args.out, variant="fp16", safe_serialization=True)
    params = {
        name: sum(p.numel() for p in m.parameters())
        for name, m in [("unet", unet), ("vae", vae), ("text_encoder", text_encoder)]
    }
    print(json.dumps({"out": str(args.out), "parameters": params}))


if __name__ == "__main__":
    main()
