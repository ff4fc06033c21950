#!/usr/bin/env python3
"""How much running at the model's working size helps on pictures larger than it was trained on.

Edits the first turn of every session of synthetic worlds drawn at 128x128 (the default model
was trained at 32x32) through a running server, three ways:

  input       working_size=input: the model runs at the picture's own size (the old behaviour)
  model       working_size=model, keep_input=false: runs at 32x32, the result scaled back up
  model+keep  working_size=model (the default): as `model`, and the input's pixels are kept
              wherever the model left the picture unchanged

and scores each against the world's target picture: L1 over the whole image, L1 inside the
edit's mask (did the edit happen) and L1 outside it against the input (was the rest kept).
Pixels in [0, 1]; lower is better.

    rl4pix-train synth --out /tmp/w9001 --count 40 --seed 9001 --size 128
    rl4pix-train synth --out /tmp/w12345 --count 40 --seed 12345 --size 128
    cargo run --release -p rl4pix-server &
    python3 bench/working_size.py http://127.0.0.1:8080 /tmp/w9001 /tmp/w12345 [--sessions N]

Needs requests, numpy and pillow.
"""

import io
import json
import pathlib
import sys

import numpy as np
import requests
from PIL import Image

MODES = {
    "input": {"working_size": "input"},
    "model": {"working_size": "model", "keep_input": "false"},
    "model+keep": {"working_size": "model"},
}


def load(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0


def first_turns(world):
    sessions = json.loads((world / "edit_sessions.json").read_text())
    for session, turns in sorted(sessions.items()):
        turn = turns[0]
        folder = world / "images" / session
        yield folder / turn["input"], turn["instruction"], folder / turn["output"], folder / turn["mask"]


def main():
    args = sys.argv[1:]
    sessions = None
    if "--sessions" in args:
        i = args.index("--sessions")
        sessions = int(args[i + 1])
        del args[i : i + 2]
    url, worlds = args[0], [pathlib.Path(p) for p in args[1:]]
    for world in worlds:
        scores = {mode: [] for mode in MODES}
        turns = list(first_turns(world))[:sessions]
        for index, (source, instruction, target, mask) in enumerate(turns):
            src, tgt = load(source), load(target)
            region = load(mask)[..., 0] > 0.5
            for mode, fields in MODES.items():
                response = requests.post(
                    f"{url}/edit",
                    files={"image": source.read_bytes()},
                    data={"instruction": instruction, "seed": str(index), **fields},
                    timeout=600,
                )
                response.raise_for_status()
                out = np.asarray(Image.open(io.BytesIO(response.content)).convert("RGB"), dtype=np.float32) / 255.0
                diff = np.abs(out - tgt).mean(axis=2)
                kept = np.abs(out - src).mean(axis=2)
                scores[mode].append((
                    diff.mean(),
                    diff[region].mean() if region.any() else 0.0,
                    kept[~region].mean(),
                    float(response.headers["x-inference-ms"]),
                ))
        print(f"{world.name}: {len(scores['input'])} edits at {src.shape[1]}x{src.shape[0]}")
        print(f"  {'mode':<11} {'L1':>7} {'edit L1':>8} {'kept L1':>8} {'ms/edit':>8}")
        for mode, rows in scores.items():
            l1, edit, kept, ms = np.mean(np.array(rows), axis=0)
            print(f"  {mode:<11} {l1:7.4f} {edit:8.4f} {kept:8.4f} {ms:8.0f}")


if __name__ == "__main__":
    main()
