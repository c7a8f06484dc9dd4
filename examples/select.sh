#!/usr/bin/env bash
# Choosing blocks at a tenth of a profile's compute: ground truth on five tasks sharing one backbone
# (EfficientNet-Lite0, ImageNet weights, Fashion-MNIST at 64 px, caches at block 11, the first LIMIT train / LIMIT
# test images of each split):
#   fm       Fashion-MNIST, 10 classes
#   noise    Fashion-MNIST under gaussian_noise:3 (a CIFAR-10-C style shift, deterministic)
#   blur     Fashion-MNIST under gaussian_blur:5 (the severe shift)
#   coarse   the fm cache with a coarse label set: tops / bottoms / shoes / bags
#   tops     a class subset: the five upper-body classes (T-shirt, pullover, dress, coat, shirt), its own cache
# For each: the full profile (windows of WIDTH blocks in RANGE, SEEDS seeds, EXAMPLES training examples of which
# VAL validate; test = every cached test image) is the ground truth; `select` runs at each of BUDGETS for each of
# SEEDS seeds (RANK=1 adds `rank --method all`, HALVING=1 `profile --halving`). Summary: OUT/select.json, and a
# table on stdout (regret against the profile's validation pick and against the best test window; a pick whose
# test mean is within a standard error of the best window's counts as right).
# Time on the project's shared 2-core CPU under a load of 10-16: 20-30 minutes per task's profile (21 runs of
# 55-90 s), 3-10 minutes per `select`; about 2.5 hours for the defaults, one process at a time.
# Every step resumes: rerun to finish (several TASKS may run as separate processes).
# Knobs: LIMIT EXAMPLES VAL SEEDS EPOCHS RANGE WIDTH BATCH BUDGETS TASKS SELECT_SEEDS (select's seeds, e.g.
# "$(seq 0 12)"; default: the profile's 0..SEEDS-1)
# SELECT (0: ground truth only). Tiny mode for tests: QUICK=1.
set -euo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # on a shared CPU, one thread per process trains ~8× faster here
OUT=${OUT:-runs/select}
LIMIT=${LIMIT:-5000}; EXAMPLES=${EXAMPLES:-2000}; VAL=${VAL:-0.5}; SEEDS=${SEEDS:-3}; EPOCHS=${EPOCHS:-2}
RANGE=${RANGE:-13-16}; WIDTH=${WIDTH:-1,2}; BATCH=${BATCH:-32}; BUDGETS=${BUDGETS:-0.1}
TASKS=${TASKS:-fm noise blur coarse tops}; SELECT=${SELECT:-1}
if [[ "${QUICK:-0}" == 1 ]]; then LIMIT=120; EXAMPLES=100; VAL=0.2; SEEDS=1; EPOCHS=1; RANGE=15-16; WIDTH=1
  BUDGETS=1; TASKS="tops coarse"; RANK=1; HALVING=1; fi
mkdir -p "$OUT"
# this checkout's library and CLI (a `subcache` on PATH may belong to another install)
ROOT=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
run() { python -m subcache "$@"; }
build() {  # build NAME [options]: a block-11 cache of the first LIMIT images of each split
  local name=$1; shift
  [[ -e "$OUT/$name.zarr/.done" ]] && return
  run build --model efficientnet_lite0 --image-size 64 --limit "$LIMIT" --layer 11 --out "$OUT/$name.zarr" \
    --resume --json "$@" > /dev/null
  touch "$OUT/$name.zarr/.done"
}

for task in $TASKS; do
  case $task in
    fm|coarse) build fm --data fashion-mnist ;;
    noise) build noise --data fashion-mnist --corrupt gaussian_noise:3 ;;
    blur) build blur --data fashion-mnist --corrupt gaussian_blur:5 ;;
    tops)
      [[ -e "$OUT/tops.npz" ]] || python - "$OUT/tops.npz" <<'PY'
import sys
import numpy as np
from subcache.data import open_source
keep = [0, 2, 3, 4, 6]  # T-shirt/top, pullover, dress, coat, shirt: the fine-grained half of Fashion-MNIST
arrays = {}
for split in ("train", "test"):
    src = open_source("fashion-mnist", split)
    x, y = src.array, np.asarray(src.labels)
    mask = np.isin(y, keep)
    arrays[f"x_{split}"] = x[mask].reshape(int(mask.sum()), *x.shape[-2:]).astype(np.uint8)
    arrays[f"y_{split}"] = np.searchsorted(keep, y[mask]).astype(np.int64)
np.savez(sys.argv[1], **arrays)
PY
      build tops --data "$OUT/tops.npz" ;;
    *) echo "Error: unknown task $task (allowed: fm noise blur coarse tops)" >&2; exit 2 ;;
  esac
done

if [[ " $TASKS " == *" coarse "* && ! -e "$OUT/coarse-test.csv" ]]; then
python - "$OUT/fm.zarr" "$OUT" <<'PY'
import sys, subcache
from subcache.store import open_cache, read
coarse = {0: "tops", 1: "bottoms", 2: "tops", 3: "tops", 4: "tops", 5: "shoes", 6: "tops", 7: "shoes", 8: "bags",
          9: "shoes"}
cache = open_cache(sys.argv[1])
for split in ("train", "test"):
    s = cache.split(split)
    path = f"{sys.argv[2]}/coarse-{split}.csv"
    with open(path + ".tmp", "w") as f:
        f.write("id,label\n")
        for i, y in zip(read(s.id, slice(None)), cache.read_y(split).tolist()):
            f.write(f"{int(i)},{coarse[y]}\n")
    subcache.add_labels(sys.argv[1], "coarse", path + ".tmp", split)
    import os; os.replace(path + ".tmp", path)
PY
fi

for task in $TASKS; do
  cache="$OUT/$task.zarr"; extra=()
  [[ $task == coarse ]] && { cache="$OUT/fm.zarr"; extra=(--labels coarse); }
  common=(--cache "$cache" --range "$RANGE" --width "$WIDTH" --examples "$EXAMPLES" --val-fraction "$VAL"
          --epochs "$EPOCHS" --batch-size "$BATCH" "${extra[@]}")
  mkdir -p "$OUT/$task"
  if [[ ! -e "$OUT/$task/profile.out.json" ]]; then
    run profile "${common[@]}" --repeats "$SEEDS" --no-probe --out "$OUT/$task/profile" --json \
      > "$OUT/$task/profile.out.json.tmp"
    mv "$OUT/$task/profile.out.json.tmp" "$OUT/$task/profile.out.json"
  fi
  [[ "$SELECT" == 1 ]] || continue
  for budget in $BUDGETS; do
    for seed in ${SELECT_SEEDS:-$(seq 0 $((SEEDS - 1)))}; do
      res="$OUT/$task/select-$budget-$seed.json"
      if [[ ! -e "$res" ]]; then
        run select "${common[@]}" --budget "$budget" --seed "$seed" --out "$OUT/$task/select-$budget-$seed" \
          --overwrite --json > "$res.tmp"
        mv "$res.tmp" "$res"
      fi
    done
  done
  if [[ "${RANK:-0}" == 1 && ! -e "$OUT/$task/rank.out.json" ]]; then
    run rank --cache "$cache" --range "$RANGE" --width "$WIDTH" --examples "$EXAMPLES" --val-fraction "$VAL" \
      "${extra[@]}" --method all --against "$OUT/$task/profile" --out "$OUT/$task/rank" --json \
      > "$OUT/$task/rank.out.json"
  fi
  if [[ "${HALVING:-0}" == 1 && ! -e "$OUT/$task/halving.out.json" ]]; then
    run profile "${common[@]}" --repeats 1 --halving --eta 3 --out "$OUT/$task/halving" --json \
      > "$OUT/$task/halving.out.json"
  fi
done

python - "$OUT" "$BUDGETS" $TASKS <<'PY'
import glob, json, math, os, sys
out, budgets, tasks = sys.argv[1], sys.argv[2].split(), sys.argv[3:]
table = {}
for task in tasks:
    runs = json.load(open(f"{out}/{task}/profile/profile.json"))["runs"]
    by = {}
    for r in runs:
        by.setdefault(r["blocks"], []).append(r)
    stats = {}
    for w, rs in by.items():
        t = [r["test_accuracy"] for r in rs]
        m = sum(t) / len(t)
        sd = math.sqrt(sum((x - m) ** 2 for x in t) / (len(t) - 1)) if len(t) > 1 else 0.0
        stats[w] = {"test": m, "se": sd / math.sqrt(len(t)), "val": sum(r["val_accuracy"] for r in rs) / len(rs),
                    "seeds": len(t)}
    pick = max(stats, key=lambda w: stats[w]["val"])
    best = max(stats, key=lambda w: stats[w]["test"])

    def judge(w):  # regret in test points against the profile's validation pick and the best test window;
        # right: within one standard error (of the difference of the two means over seeds) of the best window
        se = math.hypot(stats[w]["se"], stats[best]["se"])
        return {"pick": w, "regret": 100 * (stats[pick]["test"] - stats[w]["test"]),
                "regret_best": 100 * (stats[best]["test"] - stats[w]["test"]),
                "right": stats[best]["test"] - stats[w]["test"] <= se}

    row = {"profile_pick": pick, "best": best, "windows": stats,
           "tied": sorted(w for w in stats if judge(w)["right"]), "select": {}}
    for b in budgets:
        files = glob.glob(f"{out}/{task}/select-{b}-*.json")
        seeds = sorted(int(f[len(f"{out}/{task}/select-{b}-"):-len(".json")]) for f in files)
        sel = [(s, json.load(open(f"{out}/{task}/select-{b}-{s}.json"))) for s in seeds]
        row["select"][b] = [{**judge(d["blocks"]), "seed": s, "compute_fraction": d["compute_fraction"],
                             "total_fraction": d["total_fraction"], "task_test_accuracy": d["test_accuracy"]}
                            for s, d in sel]
    if os.path.exists(f"{out}/{task}/rank.out.json"):
        rank = json.load(open(f"{out}/{task}/rank.out.json"))
        row["rank"] = {m: judge(v["top"]) for m, v in rank["comparison"]["methods"].items()}
    if os.path.exists(f"{out}/{task}/halving.out.json"):
        h = json.load(open(f"{out}/{task}/halving.out.json"))
        row["halving"] = {**judge(h["best"]["blocks"]), "compute_fraction": h["compute_fraction"]}
    table[task] = row
    print(f"{task}: profile picks {pick} ({stats[pick]['test']:.4f} test), best test window {best} "
          f"({stats[best]['test']:.4f} ± {stats[best]['se']:.4f} s.e.); within a s.e. of it: {', '.join(row['tied'])}")
    for b, sel in row["select"].items():
        for v in sel:
            print(f"  select {b} seed {v['seed']}: picks {v['pick']:>5}  regret {v['regret']:+.2f} "
                  f"(vs best {v['regret_best']:+.2f}"
                  f"{', right' if v['right'] else ''}) at {v['compute_fraction']:.3f} of the profile "
                  f"({v['total_fraction']:.3f} with the winner's training)")
    for m, v in row.get("rank", {}).items():
        print(f"  rank {m:>9}: picks {v['pick']:>5}  regret {v['regret']:+.2f} (vs best {v['regret_best']:+.2f})")
    if "halving" in row:
        v = row["halving"]
        print(f"  halving: picks {v['pick']:>5}  regret {v['regret']:+.2f} (vs best {v['regret_best']:+.2f}) at "
              f"{v['compute_fraction']:.2f}")
json.dump(table, open(f"{out}/select.json", "w"), indent=1)
PY
