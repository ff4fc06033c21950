# Sourced by pretrain-toy.sh and pretrain-toy-chain.sh (with OUT set): finds or builds the
# rl4pix-train binary ($BIN), sets one thread per job, enters $OUT, and defines the helpers the
# stages use to skip or resume.

BIN=${RL4PIX_TRAIN:-target/release/rl4pix-train}
if [ ! -x "$BIN" ]; then
  cargo build --release -p rl4pix-training
fi
BIN=$(realpath "$BIN")
# One thread per job and per data-parallel shard: candle's pools spin at barriers inside every
# small op, which costs more than it gives on two shared cores.
export RAYON_NUM_THREADS=1 CANDLE_NUM_THREADS=1
mkdir -p "$OUT"
cd "$OUT"

# Newest checkpoint step of a run folder (0 when none).
latest_step() {
  local newest
  newest=$(ls "$1/checkpoints" 2>/dev/null | sort | tail -n 1)
  if [ -z "$newest" ]; then echo 0; else echo $((10#${newest#step-})); fi
}
# --resume when the run has a checkpoint, else the given flags (a warm start).
start_flags() {
  if [ "$(latest_step "$1")" -gt 0 ]; then echo --resume "$1"; else shift; echo "$@"; fi
}
stamp() { echo "[$(date -u +%H:%M:%S)] $*"; }
# Stage 1 of both recipes: the VAE (16-32-64 channels, 32x32x3 -> 8x8x4) in vae/, unless done.
base_vae() {
  if [ ! -f vae/vae/config.json ]; then
    stamp "vae"
    "$BIN" pretrain-vae --out vae --seed 1 --steps 900 --batch 16 --lr 1e-3 --warmup 50 \
      --channels 16,32,64 --norm-groups 8 --checkpoint-every 150 --eval-every 150 $(start_flags vae)
  fi
}
