#!/usr/bin/env bash
# "7B model, DDP": TopK SAE on the middle residual stream of a 7B model, plain data parallel.
# Every GPU holds the whole SAE and its optimizer state (d_sae = 16 x 4096 = 65,536 latents) and its
# own copy of the model in bf16: every rank streams its own shard of the corpus through the model
# (to the hooked layer) and trains on it, so the forward scales with the GPUs and nothing is written
# to disk (--cache: rank 0 harvests to XSAE_CACHE instead, TOKENS x 4096 x 2 bytes in bf16).
# Budget (xsae_cli/sae/budget.py recipe_budget): GPU memory per rank 29.0 GB (model 14.5 GB + SAE 6.4 GB + working 8.1 GB), disk 0 B
# Needs: $GPUS GPUs (default 8, >= 40 GB each), the model in the zoo or on the hub (online).
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
