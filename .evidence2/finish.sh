#!/bin/bash
# finish one task of the 2-seed evidence run: wait for its profile, then rank and halving (this checkout's CLI)
cd /work/wt-rank; export PYTHONPATH=$PWD OMP_NUM_THREADS=1
task=$1; pid=$2; cache=.evidence2/$task.zarr; extra=()
[[ $task == coarse ]] && { cache=.evidence2/fm.zarr; extra=(--labels coarse); }
while kill -0 $pid 2>/dev/null; do sleep 5; done
common=(--cache "$cache" --blocks 13-16 --width 1,2 --limit 300 "${extra[@]}")
python -m cli.main profile "${common[@]}" --seeds 2 --epochs 3 --batch-size 32 --val-fraction 0.2 --no-probe --out .evidence2/$task/profile --json > .evidence2/$task/profile.out.json
python -m cli.main rank "${common[@]}" --method all --val-fraction 0.2 --against .evidence2/$task/profile --out .evidence2/$task/rank --json > .evidence2/$task/rank.out.json
python -m cli.main profile "${common[@]}" --seeds 2 --epochs 3 --batch-size 32 --val-fraction 0.2 --halving --eta 3 --out .evidence2/$task/halving --json > .evidence2/$task/halving.out.json
echo done > .evidence2/$task/DONE
