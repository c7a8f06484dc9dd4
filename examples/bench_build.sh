#!/usr/bin/env bash
# `bench build` stage by stage (issue 23): Fashion-MNIST at 64 px (Lite0) and a photo folder at 224 px (Lite0 with
# 0 and 2 decode workers, ResNet-50 random init), one JSON file each under $OUT. Run from the repository root:
#   examples/bench_build.sh            (PHOTOS=/tmp/subcache-photos OUT=/tmp/subcache-bench-build; makes the photos)
# Image counts sized for a 2-core CPU (ResNet-50 at 224 px forwards ~5 images/s there); raise them on a bigger box.
set -euo pipefail
PHOTOS=${PHOTOS:-/tmp/subcache-photos}
OUT=${OUT:-/tmp/subcache-bench-build}
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
[ -d "$PHOTOS/train" ] || python examples/make_photos.py "$PHOTOS" --train 960 --test 60  # needs foolbox's files
B="python -m subcache bench build --json"
$B --data fashion-mnist --image-size 64 --layer 13 --limit 10000 > "$OUT/fmnist_64.json"
$B --data "$PHOTOS" --image-size 224 --layer 9 --limit 960 --workers 0 > "$OUT/lite0_224_w0.json"
$B --data "$PHOTOS" --image-size 224 --layer 9 --limit 960 --workers 2 > "$OUT/lite0_224_w2.json"
$B --model resnet50 --weights none --data "$PHOTOS" --image-size 224 --layer 9 --limit 64 --workers 0 \
  > "$OUT/r50_224_w0.json"
python - "$OUT" <<'PY'
import json, pathlib, sys
keys = ("decode_images_per_second", "forward_images_per_second", "write_images_per_second",
        "stage_bound_images_per_second", "build_images_per_second", "build_vs_stage_bound", "build_vs_forward",
        "build_cpu_vs_stages_cpu")
for f in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    d = json.loads(f.read_text())
    print(f.stem, d["decode_workers"], *(f"{k}={d[k]:.3g}" for k in keys))
PY
