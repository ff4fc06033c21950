#!/usr/bin/env bash
# Prints docs/performance.md's table: rl4pix (Candle) against diffusers on the same UNet
# configs, batch and thread count. Extra arguments go to `rl4pix-bench compare`, e.g.
#   bench/compare.sh --threads 1,2
#   bench/compare.sh --rows tiny,small --iters-scale 2
# Needs a Python with torch, diffusers and peft: RL4PIX_BENCH_PYTHON (default: the project's
# /work/pyenv/bin/python when present, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${RL4PIX_BENCH_PYTHON:-}" && -x /work/pyenv/bin/python ]]; then
    export RL4PIX_BENCH_PYTHON=/work/pyenv/bin/python
fi
cargo build --release -p rl4pix-bench
exec target/release/rl4pix-bench compare "$@"
