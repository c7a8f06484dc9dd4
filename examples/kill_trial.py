"""Kill-and-resume trial: kill `subcache build` (os._exit via SUBCACHE_FAULT, no cleanup) at every stage, resume,
and compare with an uninterrupted build bit for bit; kill `labels add` and `train --out` mid-write and check that
nothing half-written reads as complete. Prints one JSON line of counts.

    PYTHONPATH=. python examples/kill_trial.py [WORKDIR]     # ~2 min on 2 CPU cores (resnet18, random init, 32 px)
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import subcache
from subcache.errors import SubcacheError
from subcache.faults import KILLED_EXIT

ROOT = Path(__file__).resolve().parents[1]
BUILD = dict(layers=("2", "4"), model="resnet18", weights="none", image_size=32, dtype="float32", batch_size=16,
             chunk_mb=0.05, flip_views=True)


def killed(point: str, code: str) -> bool:
    env = {**os.environ, "SUBCACHE_FAULT": point, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True).returncode == KILLED_EXIT


def same(a: Path, b: Path) -> bool:
    ca, cb = subcache.open_cache(a), subcache.open_cache(b)
    return all(np.array_equal(getattr(ca.split(s), k)[:], getattr(cb.split(s), k)[:])
               for s in cb.splits for k in ("x", "x_flip", "y", "id"))


def build_trials(work: Path, data: str, base: Path, units: int) -> dict:
    points = ["store-created", *[f"unit-written:{i}" for i in range(1, units + 1)], "before-finish"]
    survived = 0
    for i, point in enumerate(points):
        out = work / f"kill{i}"
        code = (f"import subcache; subcache.build_cache(subcache.BuildConfig(out={str(out)!r}, data={data!r}, "
                f"**{BUILD!r}))")
        assert killed(point, code), point
        subcache.build_cache(subcache.BuildConfig(out=str(out), data=data, resume=True, **BUILD))
        survived += all(same(out / s, base / s) for s in ("block02.zarr", "block04.zarr"))
    return {"build_kill_points": len(points), "build_resumed_bit_identical": survived}


def write_trials(work: Path, cache: Path) -> dict:
    ids = subcache.open_cache(cache).split("train").id[:]
    (work / "l.csv").write_text("id,label\n" + "".join(f"{i},{i % 2}\n" for i in ids))
    refused = 0
    add = f"import subcache; subcache.add_labels({str(cache)!r}, 'p', {str(work / 'l.csv')!r})"
    assert killed("labels-created", add)
    try:
        subcache.train(str(cache), subcache.TrainConfig(epochs=1, labels="p", device="cpu"))
    except SubcacheError:
        refused += 1
    task = work / "task"
    cfg = "subcache.TrainConfig(blocks='3', epochs=1, device='cpu', seed={})"
    subcache.train(str(cache), eval(cfg.format(0), {"subcache": subcache}), out=str(task))
    retrain = f"import subcache; subcache.train({str(cache)!r}, {cfg.format(1)}, out={str(task)!r})"
    assert killed("task-weights", retrain)
    try:
        subcache.load_task(task)
    except SubcacheError:
        refused += 1
    return {"write_kill_points": 2, "half_written_refused": refused}


def main(work: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_npz

    data = make_npz(work / "d.npz", n_train=96, n_test=32)
    base = work / "base"
    subcache.build_cache(subcache.BuildConfig(out=str(base), data=data, **BUILD))
    stores = [subcache.open_cache(base / s) for s in ("block02.zarr", "block04.zarr")]
    units = sum(-(-len(stores[0].split(sp)) // max(c.split(sp).chunk_len for c in stores)) for sp in stores[0].splits)
    report = {**build_trials(work, data, base, units), **write_trials(work, base / "block02.zarr")}
    print(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="kill-trial-")))
