#!/usr/bin/env bash
# Rebuilds the shipped LDS benchmark benchmarks/digits-mlp from nothing, as it was built:
# about 45 minutes on a 2-core CPU (two single-thread shards; a GPU is not needed at this size).
#   bash benchmarks/build_digits_mlp.sh [OUT] [SHARDS]
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${1:-benchmarks/digits-mlp}
SHARDS=${2:-2}
BASE=${BASE:-runs/lds-base}

# The base: mlp-tiny on the digits' 60% training split (1078 images), 6000 steps of 64, with
# training snapshots for TracIn. One thread, so that retraining it reproduces it bit for bit.
OMP_NUM_THREADS=1 "$BIN/diffattr" train --data digits --query-fraction 0.4 --model mlp-tiny \
    --steps 6000 --checkpoint-every 1500 --snapshots --out "$BASE" --quiet
# 64 subsets of half the training set, 2 training seeds each; 100 held-out and 100 generated
# queries; ground truth: each query's loss at all 1000 timesteps, 2 noise draws (the defaults).
"$BIN/diffattr" lds init "$OUT" --base "$BASE" --quiet
for ((i = 0; i < SHARDS; i++)); do
    OMP_NUM_THREADS=1 "$BIN/diffattr" lds build "$OUT" --shard "$i/$SHARDS" --device cpu --quiet &
done
wait
"$BIN/diffattr" lds merge "$OUT"
