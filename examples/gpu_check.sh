#!/usr/bin/env bash
# The GPU checks, as one script: `pytest -m gpu`, the main job on CUDA in fp32 and bf16 (+ channels_last, fused
# AdamW), greedy/al with --batch-runs off and auto, and the benchmarks on CUDA (`bench train`: streaming_ratio,
# stream_wait_fraction, stream_readers). Every figure lands in $OUT (default runs/gpu) as JSON or a log.
# Sizes: LIMIT images per split (Lite0, Fashion-MNIST, 64 px), EPOCHS for the main job. DEVICE=cpu dry-runs it
# (DATA=some.npz LIMIT=64 EPOCHS=1 REPEATS=2 SKIP_MAIN=1 for a quick one: only the engine grid).
set -uo pipefail
OUT=${OUT:-runs/gpu}
DEVICE=${DEVICE:-cuda}
LIMIT=${LIMIT:-10000}
EPOCHS=${EPOCHS:-10}
DATA=${DATA:-fashion-mnist}
REPEATS=${REPEATS:-4}
SKIP_MAIN=${SKIP_MAIN:-0}
PY=${PYTHON:-python3}
W=${WORK:-/tmp/subcache-gpu}
mkdir -p "$OUT" "$W"
step() { echo "== $*" >&2; }

step environment
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/device.txt"
$PY -c "import torch, timm, zarr; print('torch', torch.__version__, 'timm', timm.__version__, 'zarr', zarr.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')" | tee -a "$OUT/device.txt"

engine() {  # bench profile NAME MODEL WEIGHTS SIZE LIMIT "COMPILE BATCH_RUNS" …: one run per pair of engine knobs
  local name=$1 model=$2 weights=$3 size=$4 limit=$5; shift 5
  for knobs in "$@"; do
    set -- $knobs
    local tag="${name}_compile-$1_batch-$2"
    step "bench profile $tag on $DEVICE"
    timeout 100 $PY -m subcache bench profile --model "$model" --weights "$weights" --image-size "$size" --data "$DATA" \
      --limit "$limit" --epochs 2 --repeats "$REPEATS" --compile "$1" --batch-runs "$2" --device "$DEVICE" --json \
      --workdir "$W/engine-$name" > "$OUT/engine_$tag.json" 2> "$OUT/engine_$tag.log"
    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], {k: round(r[k], 3) for k in
            ('speedup', 'flop_bound', 'bound_fraction', 'setup_fraction', 'subcache_seconds', 'mfu')})" \
      "$OUT/engine_$tag.json" "$tag" || tail -3 "$OUT/engine_$tag.log"
  done
}

step "engine grid: bench profile with --compile and --batch-runs on and off ($REPEATS repeats per window)"
engine lite0-64 efficientnet_lite0 imagenet 64 "$LIMIT" "off off" "on off" "off auto" "on auto"
engine lite0-224 efficientnet_lite0 imagenet 224 $((LIMIT / 4)) "off off" "on auto"
engine resnet50-224 resnet50 none 224 $((LIMIT / 4)) "off off" "on auto"
step "photo folder: bench build at 224 px, CPU decode in worker processes vs --decode gpu (nvjpeg)"
PHOTOS=${PHOTOS:-$W/photos}
[[ -d "$PHOTOS/train" ]] || PYTHONPATH=. $PY examples/make_photos.py "$PHOTOS" --train "${PHOTO_TRAIN:-2000}" --test 200
for decode in cpu gpu; do
  [[ "$decode" == gpu && "$DEVICE" != cuda ]] && continue
  for model in efficientnet_lite0 resnet50; do
    tag="photos_${model}_${decode}"
    timeout 150 $PY -m subcache bench build --model "$model" --weights none --data "$PHOTOS" --image-size 224 \
      --layer 9 --limit "${PHOTO_TRAIN:-2000}" --decode "$decode" --device "$DEVICE" --json \
      --workdir "$W/bench-$tag" > "$OUT/bench_$tag.json" 2> "$OUT/bench_$tag.log"
    $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], {k: r.get(k) for k in
            ('decode_images_per_second', 'forward_images_per_second', 'build_vs_stage_bound', 'decode_workers')})" \
      "$OUT/bench_$tag.json" "$tag" || tail -3 "$OUT/bench_$tag.log"
  done
done
[[ "$SKIP_MAIN" == 1 ]] && exit 0

if [[ "$DEVICE" == cuda ]]; then
  step "pytest -m gpu"
  timeout 240 $PY -m pytest -m gpu -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/pytest_gpu.log" | tail -15
fi

step "main job on $DEVICE: one build, then the defaults (fp32; channels_last + fused AdamW on CUDA), plain fp32, bf16"
timeout 120 $PY -m subcache build --model efficientnet_lite0 --data "$DATA" --image-size 64 \
  --limit "$LIMIT" --layer 13 --out "$W/fmnist-b13.zarr" --device "$DEVICE" --overwrite 2>&1 | tail -2
for run in "defaults" "fp32-plain --no-channels-last --no-fused" "bf16 --precision bf16 --no-channels-last --no-fused"; do
  set -- $run; name=$1; shift
  timeout 120 $PY -m subcache train --cache "$W/fmnist-b13.zarr" --blocks 14-16 --epochs "$EPOCHS" --device "$DEVICE" \
    "$@" --out "$W/task-$name" --overwrite --json > "$OUT/train_$name.json" 2> "$OUT/train_$name.log"
  $PY -c "import json,sys; r=json.load(open(sys.argv[1])); print(sys.argv[2], 'acc', round(r['test_accuracy'],4),
          'samples/s', round(r['samples_per_second']))" "$OUT/train_$name.json" "$name" || tail -3 "$OUT/train_$name.log"
done

step "greedy --folds 4 and al --repeats 4 on $DEVICE: --batch-runs off vs auto (seconds each, same results)"
for mode in off auto; do
  for cmd in "greedy --range 15-16 --folds 4 --epsilon -1" "al --blocks 15-16 --budgets 500,1000 --repeats 4"; do
    set -- $cmd; name=$1; rm -rf "$W/$name-$mode"; start=$(date +%s.%N)
    timeout 150 $PY -m subcache "$@" --cache "$W/fmnist-b13.zarr" --epochs 2 --device "$DEVICE" --batch-runs "$mode" \
      --out "$W/$name-$mode" --json > "$OUT/${name}_batch-$mode.json" 2> "$OUT/${name}_batch-$mode.log"
    $PY -c "import sys, time; print(sys.argv[1], 'seconds', round(time.time() - float(sys.argv[2]), 2))" \
      "${name}_batch-$mode" "$start" | tee -a "$OUT/engine_runs.txt"
  done
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
