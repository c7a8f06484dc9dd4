#!/usr/bin/env bash
# The finetuning profile of EfficientNet-Lite0 on Fashion-MNIST (64 px) from the quickstart's cache at block 9:
# every window of 1 and 2 blocks in 9-16, 2 seeds, 1,000 training examples — then greedy selection on the same
# cache. Tiny mode for tests: QUICK=1.
set -euo pipefail
OUT=${OUT:-runs/quickstart}
SEEDS=${SEEDS:-2}; EPOCHS=${EPOCHS:-10}; TRAIN=${TRAIN:-1000}; RANGE=${RANGE:-9-16}
if [[ "${QUICK:-0}" == 1 ]]; then SEEDS=1; EPOCHS=1; TRAIN=100; RANGE=15-16; fi
[[ -e "$OUT/fmnist-b9.zarr" ]] || OUT="$OUT" QUICK="${QUICK:-0}" bash "$(dirname "$0")/quickstart.sh"

subcache profile --cache "$OUT/fmnist-b9.zarr" --range "$RANGE" --width 1,2 --repeats "$SEEDS" \
  --epochs "$EPOCHS" --examples "$TRAIN" --out "$OUT/profile"
subcache greedy --cache "$OUT/fmnist-b9.zarr" --range "$RANGE" --epsilon 0.005 --epochs "$EPOCHS" \
  --examples "$TRAIN" --out "$OUT/greedy"
