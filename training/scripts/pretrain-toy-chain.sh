#!/usr/bin/env bash
# The previous embedded default's pretraining (UNet fingerprint 5ecb37b4dbd1, 0.49x the
# identity's edit-region L1), stage by stage as it was run: a chain of four restarted UNet
# schedules, about 3 h 10 min on two cores. Replaced by training/scripts/pretrain-toy.sh (one
# 15000-step schedule, under two hours, 0.42x); kept because docs/rl.md's Table 1 runs name its
# stages.
#
#   training/scripts/pretrain-toy-chain.sh [OUT]  # OUT defaults to runs/toy-pretrain
#
# Resumable: rerun the same command after an interruption and every stage continues from its
# newest checkpoint (finished stages are skipped). Meant for the background:
#   nohup training/scripts/pretrain-toy-chain.sh > pretrain-toy-chain.log 2>&1 &
# The CLIP (for CLIP-T) and the VAE decoder fine-tuning run on the second core beside the UNet.
# The finished model lands in OUT/model (diffusers layout, f16), with the CLIP in OUT/model/clip.
set -euo pipefail

OUT=${1:-runs/toy-pretrain}
source "$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/pretrain-common.sh"

UNET=(--batch 64 --channels 64,128,128 --attention 1,1,0 --checkpoint-every 100 --eval-every 250 --log-every 10)

# 1. VAE (16-32-64 channels, 32x32x3 -> 8x8x4).
base_vae

# 2. Beside the UNet: decoder-only fine-tuning (latent space unchanged, so the UNet trains on the
#    first VAE's encoder meanwhile) in two runs as they happened: 500 steps (seed 3), then from
#    that decoder 2000 steps (seed 4), resumed with a 5000-step schedule stopped at 2200, then
#    with a 2600-step schedule; then the CLIP.
(
  if [ ! -f vae-dec/vae/config.json ]; then
    "$BIN" pretrain-vae --out vae-dec --decoder-from vae/vae --seed 3 --steps 500 --batch 16 \
      --lr 5e-4 --warmup 20 --channels 16,32,64 --norm-groups 8 $(start_flags vae-dec)
  fi
  DEC=(--decoder-from vae-dec/vae --seed 4 --batch 16 --lr 5e-4 --warmup 50 --channels 16,32,64
       --norm-groups 8 --checkpoint-every 100 --eval-every 250)
  if [ "$(latest_step vae-dec2)" -lt 2000 ]; then
    "$BIN" pretrain-vae --out vae-dec2 "${DEC[@]}" --steps 2000 $(start_flags vae-dec2)
  fi
  if [ "$(latest_step vae-dec2)" -lt 2200 ]; then
    "$BIN" pretrain-vae --out vae-dec2 "${DEC[@]}" --steps 5000 --stop-after 2200 --resume vae-dec2
  fi
  if [ "$(latest_step vae-dec2)" -lt 2600 ]; then
    "$BIN" pretrain-vae --out vae-dec2 "${DEC[@]}" --steps 2600 --resume vae-dec2
  fi
  if [ ! -f clip/clip/config.json ]; then
    "$BIN" pretrain-clip --out clip --seed 5 --steps 4000 --batch 64 --hard-negatives 2 \
      --eval-every 500 $(start_flags clip)
  fi
) > side.log 2>&1 &
SIDE=$!

# 3. UNet + text encoder, epsilon prediction, seed 2: a 5000-step schedule stopped at 800, then
#    a 3500-step schedule from there, stopped at 2100 (the run as it happened).
if [ "$(latest_step unet-eps)" -lt 800 ]; then
  stamp "unet-eps to 800"
  "$BIN" pretrain --out unet-eps --vae vae/vae --seed 2 --steps 5000 --lr 5e-4 --warmup 200 \
    --prediction-type epsilon "${UNET[@]}" --stop-after 800 $(start_flags unet-eps)
fi
if [ "$(latest_step unet-eps)" -lt 2100 ]; then
  stamp "unet-eps to 2100"
  "$BIN" pretrain --out unet-eps --vae vae/vae --seed 2 --steps 3500 --lr 5e-4 --warmup 200 \
    --prediction-type epsilon "${UNET[@]}" --stop-after 2100 --resume unet-eps
fi

# 4. v-prediction from those weights, seed 12: a 1800-step schedule stopped at 300, then 1000.
if [ "$(latest_step unet-v)" -lt 300 ]; then
  stamp "unet-v to 300"
  "$BIN" pretrain --out unet-v --vae vae/vae --seed 12 --steps 1800 --lr 4e-4 --warmup 100 \
    --prediction-type v_prediction "${UNET[@]}" --stop-after 300 \
    $(start_flags unet-v --init-from unet-eps/checkpoints/step-0002100)
fi
if [ "$(latest_step unet-v)" -lt 1000 ]; then
  stamp "unet-v to 1000"
  "$BIN" pretrain --out unet-v --vae vae/vae --seed 12 --steps 1000 --lr 4e-4 --warmup 100 \
    --prediction-type v_prediction "${UNET[@]}" --resume unet-v
fi

# 5. v-prediction continued, seed 22: a fresh 7000-step cosine schedule.
if [ "$(latest_step unet)" -lt 7000 ]; then
  stamp "unet to 7000"
  "$BIN" pretrain --out unet --vae vae/vae --seed 22 --steps 7000 --lr 4e-4 --warmup 100 \
    --prediction-type v_prediction "${UNET[@]}" \
    $(start_flags unet --init-from unet-v/checkpoints/step-0001000)
fi

# 6. v-prediction continued from step 7000's weights, seed 32: a fresh 4000-step cosine schedule
#    at half the learning rate.
if [ "$(latest_step unet-final)" -lt 4000 ]; then
  stamp "unet-final to 4000"
  "$BIN" pretrain --out unet-final --vae vae/vae --seed 32 --steps 4000 --lr 2e-4 --warmup 100 \
    --prediction-type v_prediction "${UNET[@]}" \
    $(start_flags unet-final --init-from unet/checkpoints/step-0007000)
fi

stamp "waiting for the decoder and the CLIP"
wait "$SIDE"

# 7. Export (EMA weights, f16) with the fine-tuned decoder, the model's own sampler (DDIM,
#    guidance 2 / 1.5, chosen on a validation world), and the CLIP beside it.
"$BIN" pretrain-export --run unet-final --vae vae-dec2/vae --out model \
  --scheduler ddim --guidance-scale 2 --image-guidance-scale 1.5
rm -rf model/clip
cp -r clip/clip model/clip
stamp "done: $OUT/model"
