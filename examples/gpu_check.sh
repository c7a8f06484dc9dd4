#!/usr/bin/env bash
# The GPU checks, as one script: `pytest -m gpu`, the main job on CUDA in fp32 and bf16 (+ channels_last, fused
# AdamW), and the benchmarks on CUDA. Every figure lands in $OUT (default runs/gpu) as JSON or a log.
# Sizes: LIMIT images per split (Lite0, Fashion-MNIST, 64 px), EPOCHS for the main job. DEVICE=cpu dry-runs it.
set -uo pipefail
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-10000}
EPOCHS=${EPOCHS:-10}
PY=${PYTHON:-python3}
W=${WORK:-/tmp/subcache-gpu}
mkdir -p "$OUT" "$W"
step() { echo "== $*" >&2; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch, timm, zarr; print('torch', torch.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" | tee -a "$OUT/device.txt"

if [[ "$DEVICE" == cuda ]]; then
  step "pytest -m gpu"
  timeout 240 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
fi

step "main job on $DEVICE: one build, then the defaults (fp32; channels_last + fused AdamW on CUDA), plain fp32, bf16"
timeout 120 $PY -m subcache build --model efficientnet_lite0 --data fashion-mnist --image-size 64 \
  --limit "$LIMIT" --layer 13 --out "$W/fmnist-b13.zarr" --device "$DEVICE" --overwrite 2>&1 | tail -2
for run in "defaults" "fp32-plain --no-channels-last --no-fused" "bf16 --precision bf16 --no-channels-last --no-fused"; do
  set -- $run; name=$1; shift
  timeout 120 $PY -m subcache train --cache "$W/fmnist-b13.zarr" --blocks 14-16 --epochs "$EPOCHS" --device "$DEVICE" \
    "$@" --out "$W/task-$name" --json > "$OUT/train_$name.json" 2> "$OUT/train_$name.log"
  $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'acc', round(r['test_accuracy'],4),
          'samples/s', round(r['samples_per_second']))" "$OUT/train_$name.json" "$name" || tail -3 "$OUT/train_$name.log"
done

for bench in train build score multitask profile; do
  step "bench $bench on $DEVICE"
  timeout 100 $PY -m subcache bench "$bench" --device "$DEVICE" --limit "$LIMIT" --epochs 3 --json \
    --workdir "$W/bench-$bench" > "$OUT/bench_$bench.json" 2> "$OUT/bench_$bench.log"
  cat "$OUT/bench_$bench.json"; echo
done

for bench in train profile; do  # at 224 px the frozen prefix is a larger share of a step
  step "bench $bench on $DEVICE at 224 px"
  timeout 100 $PY -m subcache bench "$bench" --device "$DEVICE" --image-size 224 --limit $((LIMIT / 2)) --epochs 3 \
    --json --workdir "$W/bench-$bench-224" > "$OUT/bench_${bench}_224.json" 2> "$OUT/bench_${bench}_224.log"
  cat "$OUT/bench_${bench}_224.json"; echo
done
