"""Nothing lost, nothing wrong presented as right (issue 10): what --overwrite may delete, completeness that does
not depend on chunk contents, kills at every stage, resume identity, and bad input → one clear line."""
import json
import re
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import subcache
from subcache.cli.main import main
from subcache import faults
from subcache.derive import DeriveConfig, derive_cache
from subcache.errors import (ConfigError, DataError, ForeignStoreError, StoreError, StoreExistsError, TaskError,
                             TrainingError)
from subcache.labels import add_labels, read_labels
from subcache.task import load_task

from conftest import make_npz

ROOT = Path(__file__).resolve().parents[1]
R18 = ("--model", "resnet18", "--weights", "none", "--image-size", 32)


def config(out, data, **kw):
    kw = {"layers": ("2",), "model": "resnet18", "weights": "none", "image_size": 32, "dtype": "float32",
          "batch_size": 16, **kw}
    return subcache.BuildConfig(out=str(out), data=str(data), **kw)


def arrays(path):
    cache = subcache.open_cache(path)
    return {f"{s}/{k}": np.asarray(getattr(cache.split(s), k)[:]) for s in cache.splits for k in ("x", "y", "id")}


def assert_same_store(a, b):
    got, want = arrays(a), arrays(b)
    assert got.keys() == want.keys()
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


class Killed(BaseException):
    """An in-process stand-in for a kill at a fault point."""


@pytest.fixture
def kill_at(monkeypatch):
    """kill_at('point[:n]'): the next pass through that fault point raises Killed (no later code runs)."""
    def arm(spec):
        monkeypatch.setenv("SUBCACHE_FAULT", spec)
        monkeypatch.setattr(faults, "_passes", Counter())
        monkeypatch.setattr(faults.os, "_exit", lambda code: (_ for _ in ()).throw(Killed(spec)))
    return arm


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


# progress lines in logs (`inference on train 96/192 (50%) …`, `RUN epoch 1/1 loss …`) and a warning about the
# settings (`warning: … optimiser step per epoch`) may come before an error that happens after training
PROGRESS = re.compile(r"\d+/\d+ \(\d+%\)|^(\S+ )?epoch \d+/\d+ |^warning: ")


def one_line_error(result, fragment=""):
    assert result.exit_code != 0, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [line for line in result.output.strip().splitlines() if line.strip() and not PROGRESS.search(line)]
    assert len(lines) == 1 and lines[0].startswith("Error:"), result.output
    assert fragment in lines[0], lines[0]


# -- High 1: --overwrite deletes only stores (or empty folders), never the build's source ------------------------
def test_overwrite_refuses_a_folder_that_is_not_a_store(tmp_path, npz_path, resnet18):
    victim = tmp_path / "victim"
    (victim / "sub").mkdir(parents=True)
    (victim / "a.txt").write_text("precious")
    for out in (victim, victim / "a.txt"):
        with pytest.raises(StoreExistsError, match="not a subcache store"):
            subcache.build_cache(config(out, npz_path, limit=8, overwrite=True), backbone=resnet18)
    assert (victim / "a.txt").read_text() == "precious" and (victim / "sub").is_dir()
    empty = tmp_path / "empty"
    empty.mkdir()
    subcache.build_cache(config(empty, npz_path, limit=8, overwrite=True), backbone=resnet18)
    subcache.build_cache(config(empty, npz_path, limit=8, overwrite=True), backbone=resnet18)  # a store: replaced
    assert subcache.open_cache(empty).status == "complete"


def test_build_from_never_overwrites_its_source(tmp_path, npz_path, resnet18):
    src = tmp_path / "s.zarr"
    subcache.build_cache(config(src, npz_path, limit=8), backbone=resnet18)
    before = arrays(src)
    for out in (src, src / "inner.zarr"):
        with pytest.raises(ConfigError, match="overlaps the build's source"):
            derive_cache(DeriveConfig(source=str(src), out=str(out), layers=("4",), overwrite=True),
                         backbone=resnet18)
    assert subcache.open_cache(src).status == "complete"
    np.testing.assert_array_equal(arrays(src)["test/x"], before["test/x"])


# -- High 2: completeness does not depend on chunk contents -----------------------------------------------------
def test_single_class_data_with_all_zero_chunks_completes_and_resumes(tmp_path, resnet18, kill_at):
    data = make_npz(tmp_path / "one.npz", n_train=24, n_test=8, classes=1)  # y all zeros
    out = tmp_path / "c.zarr"
    subcache.build_cache(config(out, data, chunk_mb=0.01), backbone=resnet18)
    assert subcache.open_cache(out).status == "complete" and not arrays(out)["train/y"].any()
    kill_at("unit-written:2")
    with pytest.raises(Killed):
        subcache.build_cache(config(tmp_path / "k.zarr", data, chunk_mb=0.01), backbone=resnet18)
    os.environ.pop("SUBCACHE_FAULT")
    subcache.build_cache(config(tmp_path / "k.zarr", data, chunk_mb=0.01, resume=True), backbone=resnet18)
    assert_same_store(tmp_path / "k.zarr", out)


def test_class_sorted_image_folder_with_tiny_chunks(tmp_path, resnet18):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(5):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(tmp_path / "imgs" / c / f"{i}.png")
    out = tmp_path / "f.zarr"
    subcache.build_cache(config(out, tmp_path / "imgs", splits=("train",), chunk_mb=0.001), backbone=resnet18)
    cache = subcache.open_cache(out)
    assert cache.split("train").chunk_len == 1 and arrays(out)["train/y"].tolist() == [0] * 5 + [1] * 5


# -- Medium 3 + the kill-and-resume trial: a real kill (os._exit) at every stage, resumed bit-identical ----------
KILL_POINTS = ["store-created", "unit-written:1", "unit-written:3", "before-finish"]


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    return make_npz(tmp_path_factory.mktemp("kill") / "d.npz", n_train=48, n_test=16)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory, small_npz, resnet18):
    out = tmp_path_factory.mktemp("base") / "b"
    subcache.build_cache(config(out, small_npz, layers=("2", "4"), chunk_mb=0.05), backbone=resnet18)
    return out


@pytest.mark.parametrize("point", KILL_POINTS)
def test_a_killed_build_resumes_bit_identical(tmp_path, small_npz, resnet18, baseline, point):
    out = tmp_path / "k"
    code = (f"import subcache; subcache.build_cache(subcache.BuildConfig(out={str(out)!r}, data={small_npz!r}, "
            f"layers=('2', '4'), model='resnet18', weights='none', image_size=32, dtype='float32', batch_size=16, "
            f"chunk_mb=0.05))")
    env = {**os.environ, "SUBCACHE_FAULT": point, "PYTHONPATH": str(ROOT)}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert killed.returncode == faults.KILLED_EXIT, killed.stderr[-2000:]
    for store in ("block02.zarr", "block04.zarr"):
        if (out / store).exists():  # whatever a kill leaves: info and train refuse it cleanly, never call it done
            with pytest.raises(StoreError):
                subcache.open_cache(out / store)
    subcache.build_cache(config(out, small_npz, layers=("2", "4"), chunk_mb=0.05, resume=True), backbone=resnet18)
    for store in ("block02.zarr", "block04.zarr"):
        assert_same_store(out / store, baseline / store)
    assert not list(out.glob("*.creating")) and not list(out.rglob("*.partial"))


# -- Medium 4: profile / al resume only from the same cache and labels -------------------------------------------
def test_profile_and_al_refuse_state_from_another_cache(tmp_path, resnet_cache, resnet18):
    from subcache.selection import ProfileConfig, profile_blocks

    other = shutil.copytree(resnet_cache, tmp_path / "other.zarr")
    fast = subcache.TrainConfig(epochs=1, batch_size=64, device="cpu")
    pc = ProfileConfig(blocks="6-6", probe=False, train=fast)
    profile_blocks(resnet_cache, pc, out=str(tmp_path / "p"), backbone=resnet18)
    with pytest.raises(DataError, match="another cache"):
        profile_blocks(str(other), pc, out=str(tmp_path / "p"), backbone=resnet18)
    al = subcache.ALConfig(blocks="none", budgets=(8, 16), train=fast)
    subcache.active_learning(resnet_cache, al, out=str(tmp_path / "al"), backbone=resnet18)
    with pytest.raises(DataError, match="another cache"):
        subcache.active_learning(str(other), al, out=str(tmp_path / "al"), backbone=resnet18)


def test_profile_refuses_state_trained_on_other_labels(tmp_path, resnet_cache, resnet18):
    from subcache.selection import ProfileConfig, profile_blocks

    cache = shutil.copytree(resnet_cache, tmp_path / "c.zarr")
    ids = subcache.open_cache(cache).split("train").id[:]
    for labels in ("even", "thirds"):
        mod = 2 if labels == "even" else 3
        (tmp_path / "l.csv").write_text("id,label\n" + "".join(f"{i},{i % mod}\n" for i in ids))
        add_labels(str(cache), "task", str(tmp_path / "l.csv"))
        if labels == "even":
            pc = ProfileConfig(blocks="6-6", probe=False, train=subcache.TrainConfig(
                epochs=1, batch_size=64, device="cpu", labels="task", test_split="train"))
            profile_blocks(str(cache), pc, out=str(tmp_path / "p"), backbone=resnet18)
    with pytest.raises(DataError, match="another labels"):
        profile_blocks(str(cache), pc, out=str(tmp_path / "p"), backbone=resnet18)


# -- Medium 5: a task is read as a matching pair or not at all ---------------------------------------------------
@pytest.fixture(scope="module")
def tasks(tmp_path_factory, resnet_cache, resnet18):
    root = tmp_path_factory.mktemp("tasks")
    for seed in (0, 1):
        subcache.train(resnet_cache, subcache.TrainConfig(blocks="6", epochs=1, batch_size=64, seed=seed,
                                                          device="cpu"), out=str(root / f"t{seed}"),
                       backbone=resnet18)
    return root


def test_weights_of_another_save_are_refused(tmp_path, tasks):
    t = shutil.copytree(tasks / "t0", tmp_path / "t")
    shutil.copy(tasks / "t1" / "task.safetensors", t / "task.safetensors")  # a kill between the two renames
    with pytest.raises(TaskError, match="not the file task.json describes"):
        load_task(t)


def test_a_kill_between_weights_and_json_leaves_no_matching_pair(tmp_path, tasks, resnet_cache, resnet18, kill_at):
    t = shutil.copytree(tasks / "t0", tmp_path / "t")
    kill_at("task-weights")
    with pytest.raises(Killed):
        subcache.train(resnet_cache, subcache.TrainConfig(blocks="6", epochs=1, batch_size=64, seed=1,
                                                          device="cpu"), out=str(t), backbone=resnet18,
                       overwrite=True)
    with pytest.raises(TaskError):
        load_task(t)


# -- Medium 6: --resume refuses changed source data -------------------------------------------------------------
def test_resume_refuses_a_changed_source(tmp_path, resnet18, kill_at):
    data = make_npz(tmp_path / "d.npz", n_train=32, n_test=8, seed=1)
    kill_at("unit-written:1")
    with pytest.raises(Killed):
        subcache.build_cache(config(tmp_path / "c.zarr", data, chunk_mb=0.05), backbone=resnet18)
    os.environ.pop("SUBCACHE_FAULT")
    make_npz(tmp_path / "d.npz", n_train=32, n_test=8, seed=2)  # same shapes, other pixels and labels
    with pytest.raises(ForeignStoreError, match="source data changed"):
        subcache.build_cache(config(tmp_path / "c.zarr", data, chunk_mb=0.05, resume=True), backbone=resnet18)


# -- Medium 7: a killed `labels add` leaves a set nobody trains on ------------------------------------------------
def test_a_killed_labels_add_is_refused(tmp_path, resnet_cache, kill_at):
    cache = shutil.copytree(resnet_cache, tmp_path / "c.zarr")
    ids = subcache.open_cache(cache).split("train").id[:]
    (tmp_path / "l.csv").write_text("id,label\n" + "".join(f"{i},{i % 2}\n" for i in ids))
    kill_at("labels-created")
    with pytest.raises(Killed):
        add_labels(str(cache), "parity", str(tmp_path / "l.csv"))
    with pytest.raises(DataError, match="incomplete"):
        read_labels(subcache.open_cache(cache), "train", "parity")


# -- Medium 8: the last good weights are finite ----------------------------------------------------------------
def test_non_finite_weights_are_never_kept(tmp_path, resnet_cache, resnet18):
    from subcache.train import _train

    cfg = subcache.TrainConfig(blocks="6", epochs=2, lr=float("inf"), batch_size=16, limit=16, device="cpu")
    with pytest.raises(ConfigError):  # the CLI and `train` refuse it up front ...
        subcache.train(resnet_cache, cfg, out=str(tmp_path / "t"), backbone=resnet18)
    with pytest.raises(TrainingError):  # ... and past that check, the loop never keeps non-finite weights
        _train(resnet_cache, cfg, out=str(tmp_path / "t"), backbone=resnet18)
    task = load_task(tmp_path / "t", allow_incomplete=True)
    assert not task.meta["complete"]
    assert all(torch.isfinite(v).all() for v in task.state.values() if v.is_floating_point())


# -- Low: bad input → one line, non-zero exit, nothing half-written ----------------------------------------------
@pytest.fixture(scope="module")
def bad(tmp_path_factory, resnet_cache, tasks):
    """Damaged stores, tasks and files the table below feeds to the CLI."""
    root = tmp_path_factory.mktemp("bad")
    np.savez(root / "obj.npz", x=np.array([object()] * 4, dtype=object), y=np.zeros(4, dtype=np.int64))
    for name, damage in (("no_y", "train/y/zarr.json"), ("no_test", "test")):
        path = shutil.copytree(resnet_cache, root / f"{name}.zarr")
        (shutil.rmtree if (path / damage).is_dir() else os.remove)(path / damage)
    oob = shutil.copytree(resnet_cache, root / "oob.zarr")
    y = zarr.open_group(str(oob), mode="r+")["train/y"]
    y[0] = 99
    t = json.loads((tasks / "t0" / "task.json").read_text())
    for name, edit in (("blocks", {"blocks": [99]}), ("classes", {"classes": ["a"] * 7})):
        path = shutil.copytree(tasks / "t0", root / f"task_{name}")
        (path / "task.json").write_text(json.dumps({**t, **edit}))
    ids = subcache.open_cache(resnet_cache).split("train").id[:]
    files = {"binary.csv": b"\x89PNG\r\n\x1a\n\x00\xff\xfe" * 20,
             "conflict.csv": b"id,label\n0,1\n0,2\n", "range.csv": b"id,label\n0,99\n",
             "empty_label.csv": ("id,label\n" + "".join(f"{i},{'' if i == 0 else 'x'}\n" for i in ids)).encode(),
             "exclude.txt": b"0\n123456\n", "afile": b"x"}
    for name, content in files.items():
        (root / name).write_bytes(content)
    return root


def cases(c, t, b, o):
    train = ("train", "--cache", c, "--blocks", "none", "--epochs", 1, "--out", o / "o")
    al = ("al", "--cache", c, "--blocks", "none", "--budgets", "4,8", "--epochs", 1, "--out", o / "al")
    build = ("build", *R18, "--data", b / "obj.npz", "--layer", 2, "--out", o / "x.zarr")
    return {
        "lr nan": (*train, "--lr", "nan"),
        "lr inf": (*train, "--lr", "inf"),
        "weight decay nan": (*train, "--weight-decay", "nan"),
        "negative seed with limit": (*train, "--seed", -1, "--examples", 8),
        "empty blocks": ("train", "--cache", c, "--blocks", "", "--out", o / "o"),
        "object-array npz": build,
        "task blocks edited": ("evaluate", "--task", b / "task_blocks", "--cache", c),
        "task classes edited": ("evaluate", "--task", b / "task_classes", "--cache", c),
        "store missing y metadata": ("train", "--cache", b / "no_y.zarr", "--blocks", "none", "--out", o / "o"),
        "store missing a split": ("evaluate", "--task", t, "--cache", b / "no_test.zarr"),
        "labels out of range in cache": ("train", "--cache", b / "oob.zarr", "--blocks", "none", "--out", o / "o"),
        "oracle label out of range": (*al, "--oracle", b / "range.csv"),
        "binary oracle": (*al, "--oracle", b / "binary.csv"),
        "conflicting oracle rows": (*al, "--oracle", b / "conflict.csv"),
        "second al strategy unknown": (*al[:-2], "--strategy", "margin,bogus", "--out", o / "al2"),
        "greedy folds > data": ("greedy", "--cache", c, "--folds", 1000, "--examples", 8, "--out", o / "g"),
        "greedy epsilon nan": ("greedy", "--cache", c, "--epsilon", "nan", "--out", o / "g"),
        "build --from with --data": ("build", "--from", c, "--data", "x.npz", "--layer", 8, "--out", o / "d"),
        "build --from with --model": ("build", "--from", c, "--model", "resnet50", "--layer", 8, "--out", o / "d"),
        "binary label file": ("labels", "add", c, "--name", "z", "--file", b / "binary.csv"),
        "empty label string": ("labels", "add", c, "--name", "z", "--file", b / "empty_label.csv"),
        "exclude unknown ids": ("score", "--cache", c, "--task", t, "--exclude", b / "exclude.txt",
                                "--out", o / "s.csv"),
        "train --out is a file": ("train", "--cache", c, "--blocks", "none", "--out", b / "afile"),
        "train --out under a file": ("train", "--cache", c, "--blocks", "none", "--out", b / "afile" / "t"),
        "profile --out under a file": ("profile", "--cache", c, "--range", "6-6", "--out", b / "afile" / "p"),
        "al --out under a file": (*al[:-2], "--out", b / "afile" / "al"),
    }


CASES = list(cases("c", "t", Path("b"), Path("o")))


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_one_line_before_any_training(case, bad, resnet_cache, tasks, monkeypatch, tmp_path):
    train_module = sys.modules["subcache.train"]

    def no_training(*a, **k):
        raise AssertionError("training ran before the bad input was refused")

    monkeypatch.setattr(train_module.Run, "fit", no_training)
    one_line_error(run(*cases(resnet_cache, tasks / "t0", bad, tmp_path)[case]))
    assert not list(bad.rglob("*.tmp")) and not list(tmp_path.rglob("*.tmp")) and not (tmp_path / "s.csv").exists()


def test_full_disk_leaves_no_half_written_files(tmp_path, resnet_cache, tasks, monkeypatch):
    active, task_module = sys.modules["subcache.active"], sys.modules["subcache.task"]

    def full(path, *a, **k):
        Path(path).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(active, "_write_rows", full)
    one_line_error(run("score", "--cache", resnet_cache, "--task", tasks / "t0", "--out", tmp_path / "s.csv"),
                   "No space left")
    monkeypatch.setattr(task_module, "save_file", lambda state, path, **k: full(path))
    one_line_error(run("train", "--cache", resnet_cache, "--blocks", "none", "--epochs", 1, "--out",
                       tmp_path / "t", "--json"), "No space left")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["t", "t.lock"]  # no CSV, no temp files, no task.json
    # (t.lock is the folder's OS lock file: it stays, unlocked, once its writer is gone)


# -- Low: one writer per store and per task folder -------------------------------------------------------------
def test_locks_are_per_store_and_per_task_folder(tmp_path, npz_path, resnet_cache, resnet18):
    from subcache.distributed import WriterLock

    (tmp_path / "D").mkdir()
    with WriterLock(str(tmp_path / "D" / "block05.zarr")):  # a live single-layer build of D/block05.zarr
        with pytest.raises(StoreError, match="is writing"):
            subcache.build_cache(config(tmp_path / "D", npz_path, layers=("3", "5"), limit=8), backbone=resnet18)
    with WriterLock(str(tmp_path / "t"), what="train"):  # a live `train --out t`
        with pytest.raises(StoreError, match="is writing"):
            subcache.train(resnet_cache, subcache.TrainConfig(epochs=1, device="cpu"), out=str(tmp_path / "t"),
                           backbone=resnet18)
