#!/usr/bin/env bash
# Builds the LoRA LDS benchmark benchmarks/digits-lora from nothing: the Stable-Diffusion
# attribution protocol of D-TRAK and DAS (a pretrained text-to-image model, a LoRA fine-tune on
# new data, attribution of its generations to the fine-tuning set), at digit scale on a CPU.
#   bash benchmarks/build_digits_lora.sh [OUT] [SHARDS]
# Every step resumes: rerun it after an interruption.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-benchmarks/digits-lora}
SHARDS=${2:-2}
RUNS=${RUNS:-runs/digits-lora}
PROMPTS="a handwritten {label}"

# 1. The pretrained model: cunet-tiny (text-conditioned UNet2DConditionModel with a byte-level
#    prompt encoder) on the digits 0-4 with their prompts, 3000 steps of 64.
OMP_NUM_THREADS=1 "$BIN/diffattr" train --data digits --prompts "$PROMPTS" --labels 0,1,2,3,4 \
    --model cunet-tiny --steps 3000 --checkpoint-every 1000 --out "$RUNS/pretrained" --quiet
# 2. The fine-tune: rank-4 LoRA on the attention projections, on the digits 5-9 (85% train,
#    15% held out), 1200 steps of 32. Only the 9,984 adapter parameters train.
OMP_NUM_THREADS=1 "$BIN/diffattr" train --data digits --prompts "$PROMPTS" --labels 5,6,7,8,9 \
    --query-fraction 0.15 --init "$RUNS/pretrained" --lora 4 --steps 1200 --batch-size 32 \
    --checkpoint-every 600 --out "$RUNS/lora" --quiet
# 3. 64 subsets of half the fine-tuning set, one LoRA fine-tune each from the same pretrained
#    model; 50 held-out and 50 generated queries (guidance 2, the prompts "a handwritten 5".."9"
#    in turn); ground truth: each query's loss at 50 timesteps, 2 noise draws.
OMP_NUM_THREADS=1 "$BIN/diffattr" lds init "$OUT" --base "$RUNS/lora" --model-seeds 1 --n-heldout 50 \
    --n-generated 50 --truth-timesteps 50 --guidance-scale 2 --quiet
for ((i = 0; i < SHARDS; i++)); do
    OMP_NUM_THREADS=1 "$BIN/diffattr" lds build "$OUT" --shard "$i/$SHARDS" --device cpu --quiet &
done
wait
"$BIN/diffattr" lds merge "$OUT"
