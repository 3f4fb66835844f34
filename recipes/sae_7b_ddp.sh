#!/usr/bin/env bash
# "7B model, DDP": TopK SAE on the middle residual stream of a 7B model, plain data parallel.
# Every GPU holds the whole SAE and its Adam state (d_sae = 16 x 4096 = 65,536 latents: ~3 GB with
# Adam); rank 0 loads the model in bf16 (~15 GB) and harvests, the other ranks read its harvest.
# Needs: $GPUS GPUs (default 8, >= 24 GB each), the model in the zoo or on the hub (online), and
# XSAE_CACHE on a disk with room for the harvest (TOKENS x 4096 x 4 bytes: ~3.3 GB per 200k tokens).
# Every variable below can be overridden from the environment (the tests run this script on CPU).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
GPUS=${GPUS:-8}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-mistralai/Mistral-7B-v0.1}
HOOK=${HOOK:-model.layers.16}
K=${K:-64}
EXPANSION=${EXPANSION:-16}
BATCH=${BATCH:-8192}
TOKENS=${TOKENS:-50M}
CONTEXT=${CONTEXT:-1024}
OUT=${OUT:-runs/sae-7b-ddp}
PORT=${PORT:-29500}
exec xsae --device "$DEVICE" --dtype "${DTYPE:-bfloat16}" --launcher accelerate --num-processes "$GPUS" --main-process-port "$PORT" \
  sae train --model "$MODEL" --hook "$HOOK" --arch topk --k "$K" --expansion "$EXPANSION" \
  --batch-size "$BATCH" --tokens "$TOKENS" --context-size "$CONTEXT" --out "$OUT" ${EXTRA:-}
