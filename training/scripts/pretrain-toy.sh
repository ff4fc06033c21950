#!/usr/bin/env bash
# The embedded default model's whole pretraining in one command: 1 h 47 min on the
# two-core machine this project is developed on (see model/assets/toy/README.md for what each
# stage measured).
#
#   training/scripts/pretrain-toy.sh [OUT]        # OUT defaults to runs/toy-pretrain
#
# Resumable: rerun the same command after an interruption and every stage continues from its
# newest checkpoint (finished stages are skipped). Meant for the background:
#   nohup training/scripts/pretrain-toy.sh > pretrain-toy.log 2>&1 &
# The finished model lands in OUT/model (diffusers layout, f16), with the CLIP in OUT/model/clip.
set -euo pipefail

OUT=${1:-runs/toy-pretrain}
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pretrain-common.sh"
stamp "start"

# The CLIP (for CLIP-T; not needed by the model) trains on its own core from the start.
(
  if [ ! -f clip/clip/config.json ]; then
    "$BIN" pretrain-clip --out clip --seed 5 --steps 4000 --batch 64 --hard-negatives 2 \
      --eval-every 500 $(start_flags clip)
  fi
) > clip.log 2>&1 &
CLIP=$!

# 1. VAE (16-32-64 channels, 32x32x3 -> 8x8x4).
base_vae

# 2. Beside the UNet: the decoder fine-tuned alone (the encoder, so the latent space the UNet
#    learns, stays as it is): sharper reconstructions for the exported model.
(
  if [ ! -f vae-dec/vae/config.json ]; then
    "$BIN" pretrain-vae --out vae-dec --decoder-from vae/vae --seed 3 --steps 4000 --batch 16 \
      --lr 5e-4 --warmup 50 --channels 16,32,64 --norm-groups 8 --checkpoint-every 500 \
      --eval-every 500 $(start_flags vae-dec)
  fi
) > vae-dec.log 2>&1 &
DECODER=$!

# 3. UNet + text encoder from scratch: v-prediction, one 15000-step cosine schedule, each batch
#    split across both cores.
if [ "$(latest_step unet)" -lt 15000 ]; then
  stamp "unet"
  "$BIN" pretrain --out unet --vae vae/vae --seed 2 --steps 15000 --lr 5e-4 --warmup 200 \
    --prediction-type v_prediction --batch 64 --channels 64,128,128 --attention 1,1,0 \
    --checkpoint-every 250 --eval-every 500 --log-every 10 --data-parallel 2 \
    $(start_flags unet)
fi

stamp "waiting for the decoder and the CLIP"
wait "$DECODER" "$CLIP"

# 4. Export (EMA weights, f16) with the fine-tuned decoder, the model's sampler (DDIM,
#    guidance 2 / 1.5, chosen on a validation world), and the CLIP beside it.
"$BIN" pretrain-export --run unet --vae vae-dec/vae --out model \
  --scheduler ddim --guidance-scale 2 --image-guidance-scale 1.5
rm -rf model/clip
cp -r clip/clip model/clip
stamp "done: $OUT/model"
