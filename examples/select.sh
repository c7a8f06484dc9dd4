#!/usr/bin/env bash
# Choosing blocks without a full profile, on three tasks sharing one backbone (EfficientNet-Lite0, ImageNet
# weights, Fashion-MNIST at 64 px, caches at block 11):
#   fm       Fashion-MNIST, 10 classes
#   fmc      Fashion-MNIST under gaussian_noise:3 (a CIFAR-10-C style shift, deterministic)
#   coarse   the fm cache with a coarse label set: tops / bottoms / shoes / bags
# For each: a full profile (windows of 1 and 2 blocks in 11-16, SEEDS seeds, selected on a 20 % validation split
# of TRAIN examples), every rank method against it, successive halving, and `select` under a BUDGET (fraction of
# the profile's compute). Summary: OUT/select.json.
# Knobs: LIMIT TRAIN SEEDS EPOCHS RANGE WIDTH VAL BATCH BUDGET TASKS. Tiny mode for tests: QUICK=1.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a shared CPU, one thread per process trains ~8× faster here
OUT=${OUT:-runs/select}
LIMIT=${LIMIT:-2000}; TRAIN=${TRAIN:-1000}; SEEDS=${SEEDS:-2}; EPOCHS=${EPOCHS:-3}; RANGE=${RANGE:-11-16}
WIDTH=${WIDTH:-1,2}; VAL=${VAL:-0.2}; BATCH=${BATCH:-64}; BUDGET=${BUDGET:-0.1}; TASKS=${TASKS:-fm fmc coarse}
if [[ "${QUICK:-0}" == 1 ]]; then LIMIT=120; TRAIN=100; SEEDS=1; EPOCHS=1; RANGE=15-16; WIDTH=1; BUDGET=1; fi
mkdir -p "$OUT"
# this checkout's library and CLI (a `subcache` on PATH may belong to another install)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
run() { python -m subcache "$@"; }

if [[ -z "${SKIP_BUILD:-}" ]]; then  # SKIP_BUILD=1: the caches and the coarse labels are there already
run build --model efficientnet_lite0 --data fashion-mnist --image-size 64 --limit "$LIMIT" --layer 11 \
  --out "$OUT/fm.zarr" --resume --json > /dev/null
run build --model efficientnet_lite0 --data fashion-mnist --image-size 64 --limit "$LIMIT" --layer 11 \
  --corrupt gaussian_noise:3 --out "$OUT/fmc.zarr" --resume --json > /dev/null
python - "$OUT/fm.zarr" "$OUT" <<'PY'
import sys, subcache
from subcache.store import open_cache, read
coarse = {0: "tops", 1: "bottoms", 2: "tops", 3: "tops", 4: "tops", 5: "shoes", 6: "tops", 7: "shoes", 8: "bags",
          9: "shoes"}
cache = open_cache(sys.argv[1])
for split in ("train", "test"):
    s = cache.split(split)
    path = f"{sys.argv[2]}/coarse-{split}.csv"
    with open(path, "w") as f:
        f.write("id,label\n")
        for i, y in zip(read(s.id, slice(None)), cache.read_y(split).tolist()):
            f.write(f"{int(i)},{coarse[y]}\n")
    subcache.add_labels(sys.argv[1], "coarse", path, split)
PY
fi

for task in $TASKS; do
  cache="$OUT/$task.zarr"; extra=()
  [[ $task == coarse ]] && { cache="$OUT/fm.zarr"; extra=(--labels coarse); }
  common=(--cache "$cache" --range "$RANGE" --width "$WIDTH" --examples "$TRAIN" "${extra[@]}")
  mkdir -p "$OUT/$task"
  run profile "${common[@]}" --repeats "$SEEDS" --epochs "$EPOCHS" --batch-size "$BATCH" --val-fraction "$VAL" \
    --no-probe --out "$OUT/$task/profile" --json > "$OUT/$task/profile.out.json"
  run rank "${common[@]}" --method all --val-fraction "$VAL" --against "$OUT/$task/profile" \
    --out "$OUT/$task/rank" --json > "$OUT/$task/rank.out.json"
  run profile "${common[@]}" --repeats "$SEEDS" --epochs "$EPOCHS" --batch-size "$BATCH" --val-fraction "$VAL" --halving \
    --eta 3 --out "$OUT/$task/halving" --json > "$OUT/$task/halving.out.json"
  run select "${common[@]}" --epochs "$EPOCHS" --batch-size "$BATCH" --val-fraction "$VAL" --budget "$BUDGET" \
    --out "$OUT/$task/select" --overwrite --json > "$OUT/$task/select.out.json"
done

python - "$OUT" <<'PY'
import json, os, sys
out, table = sys.argv[1], {}
for task in ("fm", "fmc", "coarse"):
    if not os.path.exists(f"{out}/{task}/halving.out.json"):
        continue
    rank = json.load(open(f"{out}/{task}/rank.out.json"))
    halving = json.load(open(f"{out}/{task}/halving.out.json"))
    profile = {s["blocks"]: s for s in json.load(open(f"{out}/{task}/profile.out.json"))["summary"]}
    c = rank["comparison"]
    pick = halving["best"]["blocks"]
    sel = json.load(open(f"{out}/{task}/select.out.json"))
    table[task] = {"profile_pick": c["profile_pick"], "profile_pick_test": c["profile_pick_test"],
                   "rank": c["methods"], "rank_seconds": rank["seconds"],
                   "halving": {"pick": pick, "compute_fraction": halving["compute_fraction"],
                               "regret": 100 * (c["profile_pick_test"] - profile[pick]["mean"])},
                   "select": {"pick": sel["blocks"], "compute_fraction": sel["compute_fraction"],
                              "total_fraction": sel["total_fraction"], "test_accuracy": sel["test_accuracy"],
                              "regret": 100 * (c["profile_pick_test"] - profile[sel["blocks"]]["mean"])}}
    print(f"{task}: profile picks {c['profile_pick']} ({c['profile_pick_test']:.4f} test)")
    for m, v in c["methods"].items():
        print(f"  rank {m:>9}: Spearman {v['spearman']:+.2f}  top {v['top']:>5}  regret {v['regret']:+.2f} points")
    h = table[task]["halving"]
    print(f"  halving       : picks {pick:>5}  regret {h['regret']:+.2f} points at {h['compute_fraction']:.0%} "
          f"of the profile's training compute")
    v = table[task]["select"]
    print(f"  select        : picks {v['pick']:>5}  regret {v['regret']:+.2f} points at {v['compute_fraction']:.0%} "
          f"of the profile's compute ({v['total_fraction']:.0%} with the winner's training); its task "
          f"{v['test_accuracy']:.4f} test")
json.dump(table, open(f"{out}/select.json", "w"), indent=1)
PY
