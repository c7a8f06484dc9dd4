#!/usr/bin/env bash
# Deployment options on the embedded default (Lite0 ImageNet + Fashion-MNIST 64 px, cache at block 9):
# plain vs Siamese SubTuning of blocks 14-16, channel pruning at 0.25 / 0.5 / 0.75, then two tasks served at once
# by MultiTaskModel (`subcache predict`). Tiny mode for tests: QUICK=1.
set -euo pipefail
OUT=${OUT:-runs/quickstart}
EPOCHS=${EPOCHS:-20}; TRAIN=${TRAIN:-1000}; BLOCKS=${BLOCKS:-14-16}; PREDICT=${PREDICT:-2000}
if [[ "${QUICK:-0}" == 1 ]]; then EPOCHS=1; TRAIN=100; BLOCKS=15-16; PREDICT=64; fi
[[ -e "$OUT/fmnist-b9.zarr" ]] || OUT="$OUT" QUICK="${QUICK:-0}" bash "$(dirname "$0")/quickstart.sh"
CACHE="$OUT/fmnist-b9.zarr"
common=(--cache "$CACHE" --blocks "$BLOCKS" --examples "$TRAIN" --epochs "$EPOCHS" --overwrite --json)  # reruns replace

subcache train "${common[@]}" --out "$OUT/deploy/plain" > "$OUT/deploy-plain.json"
subcache train "${common[@]}" --siamese --out "$OUT/deploy/siamese" > "$OUT/deploy-siamese.json"
for r in 0.25 0.5 0.75; do
  subcache train "${common[@]}" --prune "$r" --out "$OUT/deploy/prune-$r" > "$OUT/deploy-prune-$r.json"
done
subcache predict --task "$OUT/deploy/plain" --task "$OUT/deploy/prune-0.5" --data fashion-mnist --split test \
  --limit "$PREDICT" --out "$OUT/deploy/predictions.csv" --overwrite

python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'variant':<14} {'test accuracy':>13} {'trainable params':>17} {'param fraction':>15}")
for name in ("plain", "siamese", "prune-0.25", "prune-0.5", "prune-0.75"):
    m = json.load(open(f"{out}/deploy-{name}.json"))
    print(f"{name:<14} {m['test_accuracy']:>13.4f} {m['trainable_params']:>17,} {m['param_fraction']:>15.2f}")
PY
