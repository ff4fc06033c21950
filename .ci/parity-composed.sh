#!/usr/bin/env bash
# The parity suite again with the fused CPU kernels off (RL4PIX_FUSED=0), so that the composed
# candle ops, the code a GPU runs, are checked against diffusers on this CPU too. Reuses the test
# executables `cargo test --workspace` built (an environment variable changes no build).
set -euo pipefail
cd "$(dirname "$0")/.."
export RL4PIX_FUSED=0
cargo test -p rl4pix-model \
    --test unet_parity --test vae_parity --test pipeline_parity --test adapter_formats \
    --test scheduler_parity --test text_encoder_parity --test clip_parity --test fused_gradients
cargo test -p rl4pix-training --test ddpo
