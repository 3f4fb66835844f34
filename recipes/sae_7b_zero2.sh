#!/usr/bin/env bash
# "7B model, ZeRO-2": a wide TopK SAE (d_sae = 64 x 4096 = 262,144 latents: 8.6 GB of weights,
# 17 GB of Adam state) on a 7B model, with Adam state and gradients split over the GPUs by
# DeepSpeed ZeRO-2, so each GPU holds the weights plus 1/$GPUS of the rest. Every rank streams its
# own shard of the corpus through its own bf16 copy of the model: no harvest on disk.
# Budget (xsae_cli/sae/budget.py recipe_budget): GPU memory per rank 53.7 GB (model 14.5 GB + SAE 11.8 GB + working 27.4 GB), disk 0 B
# Needs: $GPUS GPUs (default 8, >= 80 GB each), pip install 'xsae[deepspeed]', the model in the zoo
# or on the hub. Checkpoints resume on any number of GPUs.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
GPUS=${GPUS:-8}
DEVICE=${DEVICE:-cuda}
MODEL=${MODEL:-mistralai/Mistral-7B-v0.1}
HOOK=${HOOK:-model.layers.16}
K=${K:-64}
EXPANSION=${EXPANSION:-64}
BATCH=${BATCH:-8192}
TOKENS=${TOKENS:-50M}
CONTEXT=${CONTEXT:-1024}
OUT=${OUT:-runs/sae-7b-zero2}
PORT=${PORT:-29500}
exec xsae --device "$DEVICE" --dtype "${DTYPE:-bfloat16}" --launcher deepspeed --num-processes "$GPUS" --main-process-port "$PORT" \
  --deepspeed-config "$here/deepspeed/zero2.json" \
  sae train --model "$MODEL" --hook "$HOOK" --arch topk --k "$K" --expansion "$EXPANSION" --optimizer adam \
  --batch-size "$BATCH" --tokens "$TOKENS" --context-size "$CONTEXT" --out "$OUT" ${EXTRA:-}
