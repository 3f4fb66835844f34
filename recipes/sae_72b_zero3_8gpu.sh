#!/usr/bin/env bash
# "72B model, ZeRO-3 on 8 GPUs": an SAE on a model that no single GPU holds. Rank 0 loads the
# model in bf16 spread over all 8 GPUs (--device-map auto, ~145 GB) and harvests activations to
# XSAE_CACHE while the other ranks wait (the model stays on rank 0 for the final CE-loss evaluation,
# ~18 GB per GPU); the SAE (d_sae = 32 x 8192 = 262,144 latents: 17 GB of weights, 34 GB of Adam
# state) trains with weights, gradients and Adam state split over the 8 GPUs by DeepSpeed ZeRO-3.
# Budget (xsae_cli/sae/budget.py recipe_budget): GPU memory per rank 52.5 GB (model 18.2 GB + SAE 8.6 GB + working 25.8 GB), disk 327.7 GB
# (the model split over the GPUs; the cache in bf16, the model's dtype).
# Not run on GPUs by the xsae tests (none were available); its CPU-sized twin is (tests/e2e/test_recipes.py).
# Needs: 8 GPUs with >= 80 GB each, pip install 'xsae[deepspeed]', the model in the zoo or on the
# hub, XSAE_CACHE with room for the harvest (TOKENS x 8192 x 2 bytes in bf16: 3.3 GB per 200k tokens).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
GPUS=${GPUS:-8}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-Qwen/Qwen2-72B}
HOOK=${HOOK:-model.layers.40}
K=${K:-64}
EXPANSION=${EXPANSION:-32}
BATCH=${BATCH:-8192}
TOKENS=${TOKENS:-20M}
CONTEXT=${CONTEXT:-1024}
OUT=${OUT:-runs/sae-72b-zero3}
PORT=${PORT:-29500}
exec xsae --device "$DEVICE" --dtype "${DTYPE:-bfloat16}" --launcher deepspeed --num-processes "$GPUS" --main-process-port "$PORT" \
  --deepspeed-config "$here/deepspeed/zero3.json" \
  sae train --model "$MODEL" --hook "$HOOK" --arch topk --k "$K" --expansion "$EXPANSION" --optimizer adam \
  --batch-size "$BATCH" --tokens "$TOKENS" --context-size "$CONTEXT" --device-map "${DEVICE_MAP:-auto}" --out "$OUT" ${EXTRA:-}
