"""Issue 20: opening a file never runs its code; a complete store never reads a hole; no output is half-written.

Every test here was watched failing on the code before its fix (the bug planted back in, the test run, removed).
"""
from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner

import subcache
from subcache.cli.main import main

EVIL = """
import pathlib
pathlib.Path({marker!r}).write_text("imported")


def boom():
    pathlib.Path({marker!r}).write_text("called")
"""


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def one_error_line(r, *needles):
    assert r.exit_code != 0, r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit), r.output
    lines = [line for line in r.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, r.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, resnet_cache, resnet18):
    out = tmp_path_factory.mktemp("task") / "t"
    subcache.train(resnet_cache, subcache.TrainConfig(blocks="6", epochs=1, batch_size=64, device="cpu"), out=str(out),
                   backbone=resnet18)
    return out


def edit_json(path, fn):
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


# -- 1. critical: a cache or task never makes subcache import or call code it names ---------------------------------
@pytest.fixture
def evil(tmp_path, monkeypatch, resnet_cache, task_dir):
    """A cache and a task whose records name `evilmod:boom`, a module on sys.path that writes a marker when imported
    or called."""
    marker = tmp_path / "MARKER"
    src = tmp_path / "src"
    src.mkdir()
    (src / "evilmod.py").write_text(EVIL.format(marker=str(marker)))
    monkeypatch.syspath_prepend(str(src))
    monkeypatch.delenv("SUBCACHE_ALLOW_FACTORY", raising=False)
    cache, task = tmp_path / "c.zarr", tmp_path / "task"
    shutil.copytree(resnet_cache, cache)
    shutil.copytree(task_dir, task)
    edit_json(cache / "zarr.json", lambda d: d["attributes"]["backbone"].update(model="evilmod:boom"))
    edit_json(task / "task.json", lambda d: d["backbone"].update(model="evilmod:boom"))
    return {"cache": cache, "task": task, "marker": marker, "dir": tmp_path}


def commands(e, npz):
    c, t, d = e["cache"], e["task"], e["dir"]
    return {
        "train": ["train", "--cache", c, "--blocks", "6", "--epochs", "1", "--out", d / "t2"],
        "evaluate": ["evaluate", "--task", t, "--cache", c],
        "score": ["score", "--cache", c, "--task", t, "--out", d / "s.csv"],
        "predict": ["predict", "--task", t, "--data", npz, "--limit", "4"],
        "export": ["export", "--task", t, "--format", "torchscript", "--out", d / "m.pt"],
        "build --from": ["build", "--from", c, "--layer", "7", "--out", d / "d.zarr"],
        "profile": ["profile", "--cache", c, "--range", "6-6", "--epochs", "1", "--no-probe", "--out", d / "p"],
    }


@pytest.mark.parametrize("command", ["train", "evaluate", "score", "predict", "export", "build --from", "profile"])
def test_a_factory_named_by_a_file_is_never_imported(evil, npz_path, command):
    r = run(*commands(evil, npz_path)[command])
    one_error_line(r, "evilmod:boom", "--allow-factory evilmod:boom", "SUBCACHE_ALLOW_FACTORY")
    assert not evil["marker"].exists(), f"{command} ran code the file named"


def test_the_user_can_allow_a_factory_by_name(evil, npz_path):
    """Allowed by name (option or environment), the factory runs (here it returns None: refused after the call)."""
    r = run(*commands(evil, npz_path)["predict"], "--allow-factory", "other:thing")
    one_error_line(r, "--allow-factory evilmod:boom")
    assert not evil["marker"].exists()
    r = run(*commands(evil, npz_path)["predict"], "--allow-factory", "evilmod:boom")
    one_error_line(r, "returned NoneType")
    assert evil["marker"].read_text() == "called"
    evil["marker"].unlink()
    r = run(*commands(evil, npz_path)["export"], env={"SUBCACHE_ALLOW_FACTORY": "x:y,evilmod:boom"})
    one_error_line(r, "returned NoneType")
    assert evil["marker"].exists()


def test_timm_hub_names_in_a_record_are_code_too(evil, npz_path):
    edit_json(evil["task"] / "task.json", lambda d: d["backbone"].update(model="timm:hf-hub:evil/model"))
    r = run(*commands(evil, npz_path)["predict"])
    one_error_line(r, "timm:hf-hub:evil/model", "--allow-factory")


# -- 5 (tasks). A task's weights are checked by sha256 before use, and must be finite floating point --------------
def resave(task, edit):
    """Rewrite task.safetensors with ``edit(state)`` and make task.json name the new file's sha256."""
    import hashlib

    from safetensors.torch import load_file, save_file

    state = load_file(str(task / "task.safetensors"))
    edit(state)
    save_file(state, str(task / "task.safetensors"), metadata={"format": "subcache-task"})
    digest = hashlib.sha256((task / "task.safetensors").read_bytes()).hexdigest()
    edit_json(task / "task.json", lambda d: d.update(weights_sha256=digest))


def first_weight(state):
    return next(k for k, v in state.items() if v.is_floating_point() and v.numel() > 1)


@pytest.mark.parametrize("case, needle", [
    ("nan", "not finite"), ("bool", "is bool"), ("int", "is int32"), ("no sha", "names no weights_sha256")])
def test_tasks_with_unusable_weights_are_refused(tmp_path, task_dir, resnet_cache, case, needle):
    import torch

    task = tmp_path / "t"
    shutil.copytree(task_dir, task)
    if case == "nan":
        resave(task, lambda s: s[first_weight(s)].view(-1).__setitem__(0, float("nan")))
    elif case in ("bool", "int"):
        dtype = torch.bool if case == "bool" else torch.int32
        resave(task, lambda s: s.update({first_weight(s): s[first_weight(s)].to(dtype)}))
    else:
        edit_json(task / "task.json", lambda d: d.pop("weights_sha256"))
    one_error_line(run("evaluate", "--task", task, "--cache", resnet_cache), needle)


# -- 2. a complete store never reads a hole as zeros ------------------------------------------------------------
def chunk_file(store, split, array):
    return next(f for f in sorted((store / split / array / "c").rglob("*")) if f.is_file())


def hole_commands(cache, task, tmp_path):
    return {"train": ["train", "--cache", cache, "--blocks", "6", "--epochs", "1", "--out", tmp_path / "t"],
            "score": ["score", "--cache", cache, "--task", task, "--split", "train", "--out", tmp_path / "s.csv"]}


@pytest.mark.parametrize("array, command", [("x", "train"), ("y", "train"), ("id", "score"), ("key", "score"),
                                            ("x", "score")])
@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_a_hole_in_a_complete_store_is_the_same_error_as_a_corrupt_chunk(tmp_path, resnet_cache, task_dir, array,
                                                                         command, damage):
    cache = tmp_path / "c.zarr"
    shutil.copytree(resnet_cache, cache)
    f = chunk_file(cache, "train", array)
    if damage == "missing":
        f.unlink()
    else:
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    line = one_error_line(run(*hole_commands(cache, task_dir, tmp_path)[command]),
                          f"split train, array {array}, chunk 0 (samples 0–191) is corrupt (",
                          "rerun the build with --resume to recompute it")
    assert ("its object is missing" in line) == (damage == "missing")
    assert not (tmp_path / "s.csv").exists() and not (tmp_path / "t" / "task.json").exists()


@pytest.fixture(scope="module")
def int8_store(tmp_path_factory, npz_path):
    out = tmp_path_factory.mktemp("int8") / "i8.zarr"
    args = ["build", "--model", "resnet18", "--weights", "none", "--image-size", "32", "--data", npz_path,
            "--layer", "6", "--dtype", "int8", "--batch-size", "64", "--out", out]
    r = run(*args)
    assert r.exit_code == 0, r.output
    return out, args, subcache.open_cache(out).read_x("train")


@pytest.mark.parametrize("damage", ["missing", "corrupt"])
def test_resume_rewrites_missing_or_damaged_int8_scales(tmp_path, int8_store, damage):
    import torch

    src, args, want = int8_store
    out = tmp_path / "i8.zarr"
    shutil.copytree(src, out)
    f = chunk_file(out, "train", "x_scale")
    if damage == "missing":
        f.unlink()
    else:
        f.write_bytes(f.read_bytes()[:-1] + bytes([f.read_bytes()[-1] ^ 1]))
    one_error_line(run("train", "--cache", out, "--blocks", "6", "--epochs", "1", "--out", tmp_path / "t"),
                   "array x_scale, chunk 0", "--resume")
    r = run(*args[:-1], out, "--resume")
    assert r.exit_code == 0, r.output
    assert torch.equal(subcache.open_cache(out).read_x("train"), want)  # the same bits as before the damage


def test_finish_refuses_an_int8_store_whose_scales_are_gone(tmp_path, int8_store, monkeypatch):
    from subcache import build

    src, args, _ = int8_store
    out = tmp_path / "i8.zarr"
    shutil.copytree(src, out)
    chunk_file(out, "test", "x_scale").unlink()
    monkeypatch.setattr(build, "restore_scales", lambda cache, plan: None)  # a resume that forgot them
    one_error_line(run(*args[:-1], out, "--resume"), "x_scale (the int8 scales) is missing")
    assert subcache.open_cache(out, require_complete=False).status == "complete"  # untouched: it was complete


def add_label_set(cache, tmp_path, name="coarse", split="train"):
    ids = subcache.open_cache(cache).split(split).id[:]
    f = tmp_path / f"labels-{split}.csv"
    f.write_text("id,label\n" + "".join(f"{i},{'ab'[i % 2]}\n" for i in ids))
    r = run("labels", "add", cache, "--name", name, "--file", f, "--split", split)
    assert r.exit_code == 0, r.output


@pytest.mark.parametrize("array", ["labels/coarse", "key", "x", "id"])
def test_verify_covers_every_array_and_label_sets_are_checksummed(tmp_path, resnet_cache, array):
    cache = tmp_path / "c.zarr"
    shutil.copytree(resnet_cache, cache)
    add_label_set(cache, tmp_path)
    f = chunk_file(cache, "train", array)
    data = bytearray(f.read_bytes())
    data[-1] ^= 0x01  # one flipped bit
    f.write_bytes(bytes(data))
    r = run("verify", cache, "--json")
    report = json.loads(r.stdout)
    assert r.exit_code == 1 and [(b["split"], b["array"]) for b in report["bad"]] == [("train", array)]
    if array == "labels/coarse":
        one_error_line(run("train", "--cache", cache, "--labels", "coarse", "--blocks", "6", "--epochs", "1",
                           "--out", tmp_path / "t"), "split train, array labels/coarse, chunk 0", "is corrupt")
    f.unlink()
    report = json.loads(run("verify", cache, "--json").stdout)
    assert [(m["array"], m["object"]) for m in report["missing"]] == [(array, 0)] and not report["bad"]


def edit_array(cache, split, array, fn):
    edit_json(cache / split / array / "zarr.json", fn)


def drop_crc(d):
    d["codecs"] = [c for c in d["codecs"] if c["name"] != "crc32c"]


@pytest.mark.parametrize("edit, needle", [
    (("train", "y", drop_crc), "array y has no crc32c checksum"),
    (("test", "key", drop_crc), "array key has no crc32c checksum"),
    (("train", "id", lambda d: d.update(shape=[100])), "array id has shape (100,), the store's record says (192,)"),
    (("test", "x", lambda d: d.update(shape=[96, 128, 4, 5])), "array x has shape (96, 128, 4, 5)"),
    (("train", "y", lambda d: d.update(data_type="int32", fill_value=0)), "array y has dtype int32"),
])
def test_every_array_must_match_the_stores_record(tmp_path, resnet_cache, edit, needle):
    cache = tmp_path / "c.zarr"
    shutil.copytree(resnet_cache, cache)
    split, array, fn = edit
    edit_array(cache, split, array, fn)
    for args in (["verify", cache], ["train", "--cache", cache, "--blocks", "6", "--epochs", "1", "--out",
                                     tmp_path / "t"]):
        one_error_line(run(*args), needle, "the store is damaged")


def test_absurd_recorded_shapes_are_refused_before_anything_is_allocated(tmp_path, resnet_cache):
    cache = tmp_path / "c.zarr"
    shutil.copytree(resnet_cache, cache)
    for array in ("x", "y", "id", "key"):
        edit_array(cache, "train", array, lambda d: d["shape"].__setitem__(0, 10 ** 12))
    one_error_line(run("verify", cache), "array x records 1000000000000 items, more than")
    edit_json(cache / "zarr.json", lambda d: d["attributes"].update(sample_shape=[10 ** 6, 10 ** 6, 10 ** 6]))
    one_error_line(run("verify", cache), "sample_shape [1000000, 1000000, 1000000] is not")


# -- 3. no output is ever half-written, and nothing subcache did not write is replaced without --overwrite ---------
def test_a_full_disk_during_export_leaves_nothing_and_keeps_the_old_file(tmp_path, task_dir, monkeypatch):
    import errno

    import torch

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as handle:
            handle.write(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.jit, "save", full_disk)
    out = tmp_path / "m.pt"
    one_error_line(run("export", "--task", task_dir, "--format", "torchscript", "--out", out), "No space left")
    assert list(tmp_path.iterdir()) == []  # no truncated model, no temp file
    out.write_bytes(b"the previous export")
    one_error_line(run("export", "--task", task_dir, "--format", "torchscript", "--out", out, "--overwrite"),
                   "No space left")
    assert out.read_bytes() == b"the previous export" and list(tmp_path.iterdir()) == [out]


def test_a_killed_export_never_leaves_a_file_at_out(tmp_path, task_dir):
    import os
    import subprocess
    import sys

    out = tmp_path / "m.pt"
    env = {**os.environ, "SUBCACHE_FAULT": "before-rename", "PYTHONPATH": os.getcwd()}
    p = subprocess.run([sys.executable, "-m", "subcache", "export", "--task", str(task_dir), "--format",
                        "torchscript", "--out", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 86, p.stderr
    assert not out.exists()


@pytest.mark.parametrize("command", ["export", "score", "predict"])
def test_an_existing_output_file_needs_overwrite(tmp_path, task_dir, resnet_cache, npz_path, command):
    out = tmp_path / ("m.pt" if command == "export" else "out.csv")
    out.write_text("somebody's file")
    args = {"export": ["export", "--task", task_dir, "--format", "torchscript", "--out", out],
            "score": ["score", "--cache", resnet_cache, "--task", task_dir, "--out", out],
            "predict": ["predict", "--task", task_dir, "--data", npz_path, "--limit", "4", "--out", out]}[command]
    one_error_line(run(*args), f"--out {out} exists; pass --overwrite")
    assert out.read_text() == "somebody's file"
    r = run(*args, "--overwrite")
    assert r.exit_code == 0, r.output
    assert out.read_bytes() != b"somebody's file"


def test_an_output_that_is_a_folder_is_one_error_line(tmp_path, task_dir):
    one_error_line(run("export", "--task", task_dir, "--format", "timm", "--out", tmp_path), "is a folder")


def test_train_onto_a_complete_task_needs_overwrite(tmp_path, task_dir, resnet_cache):
    task = tmp_path / "t"
    shutil.copytree(task_dir, task)
    before = (task / "task.safetensors").read_bytes()
    args = ["train", "--cache", resnet_cache, "--blocks", "7", "--epochs", "1", "--batch-size", "64", "--out", task]
    one_error_line(run(*args), "already holds a task", "--overwrite")
    assert (task / "task.safetensors").read_bytes() == before
    r = run(*args, "--overwrite", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads((task / "task.json").read_text())["blocks"] == [7]


# -- 4. locks: OS locks the kernel releases; training reads labels and classes as one snapshot -------------------
def test_a_full_disk_never_strands_a_writer_lock(tmp_path, monkeypatch):
    import errno
    import pathlib

    from subcache.distributed import WriterLock

    def full(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    store = str(tmp_path / "c.zarr")
    with monkeypatch.context() as m:
        m.setattr(pathlib.Path, "write_text", full)
        m.setattr(json, "dump", full)
        try:
            with WriterLock(store):  # its pid/host note cannot be written: only a message, the lock holds
                with pytest.raises(subcache.StoreError, match=r"another build \(pid \? on \?\) is writing"):
                    WriterLock(store).__enter__()
        except OSError:
            pass
    with WriterLock(store):  # nothing stranded: the next writer takes it
        pass


def test_a_writer_that_died_holding_the_lock_does_not_block_the_next(tmp_path):
    import os
    import subprocess
    import sys

    from subcache.distributed import WriterLock

    store = str(tmp_path / "c.zarr")
    code = f"from subcache.distributed import WriterLock; import os; WriterLock({store!r}).__enter__(); os._exit(9)"
    assert subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.getcwd()}).returncode == 9
    assert (tmp_path / "c.zarr.lock.holder").exists()  # its note is left behind, its lock is not
    with WriterLock(store):
        pass


def test_labels_add_waits_for_a_reader_taking_a_snapshot(tmp_path, resnet_cache):
    import threading
    import time

    from subcache.distributed import reading_lock

    cache = tmp_path / "c.zarr"
    shutil.copytree(resnet_cache, cache)
    released = []

    def reader():
        with reading_lock(str(cache)):
            time.sleep(1.0)
            released.append(time.monotonic())

    t = threading.Thread(target=reader)
    t.start()
    time.sleep(0.2)
    add_label_set(cache, tmp_path)
    done = time.monotonic()
    t.join()
    assert released and done >= released[0]  # it waited for the reader


def test_a_label_set_rewritten_during_training_leaves_a_consistent_task(tmp_path, resnet_cache, resnet18):
    from safetensors.torch import load_file

    cache = tmp_path / "c.zarr"
    shutil.copytree(resnet_cache, cache)
    add_label_set(cache, tmp_path)  # 2 classes: a, b
    add_label_set(cache, tmp_path, split="test")
    ids = subcache.open_cache(cache).split("train").id[:]
    five = tmp_path / "five.csv"
    five.write_text("id,label\n" + "".join(f"{i},{'abcde'[i % 5]}\n" for i in ids))
    rewrites = []

    def relabel(_history):
        if not rewrites:
            rewrites.append(subcache.add_labels(str(cache), "coarse", str(five)))

    subcache.train(str(cache), subcache.TrainConfig(blocks="none", labels="coarse", epochs=2, batch_size=64,
                                                    device="cpu"), out=str(tmp_path / "t"), backbone=resnet18,
                   on_epoch=relabel)
    assert rewrites and len(rewrites[0]["classes"]) == 5  # the set did change mid-run
    meta = json.loads((tmp_path / "t" / "task.json").read_text())
    head = [v for k, v in load_file(str(tmp_path / "t" / "task.safetensors")).items() if k.endswith("head.weight")]
    assert meta["classes"] == ["a", "b"] and head[0].shape[0] == 2


# -- 5. small inputs that asked for huge allocations, or ended in a traceback ---------------------------------------
def test_a_huge_label_in_an_npz_is_refused_before_naming_its_classes(tmp_path):
    import numpy as np

    np.savez(tmp_path / "d.npz", x=np.zeros((2, 8, 8), np.uint8), y=np.array([0, 10 ** 9]))
    one_error_line(run("build", "--model", "resnet18", "--weights", "none", "--data", tmp_path / "d.npz", "--layer",
                       "6", "--out", tmp_path / "c.zarr"), "holds label 1000000000; labels are class indices below")
    assert not (tmp_path / "c.zarr").exists()


def test_a_label_file_with_a_million_columns_is_refused(tmp_path, resnet_cache):
    cache = tmp_path / "c.zarr"
    shutil.copytree(resnet_cache, cache)
    wide = tmp_path / "wide.csv"
    wide.write_text("id,label," + ",".join(f"c{i}" for i in range(10 ** 6)) + "\n0,a\n")
    one_error_line(run("labels", "add", cache, "--name", "w", "--file", wide), "at most 64 columns")
    long_row = tmp_path / "row.csv"
    long_row.write_text("id,label\n0,a," + ",".join("x" * 10 for _ in range(10 ** 5)) + "\n")
    one_error_line(run("labels", "add", cache, "--name", "w", "--file", long_row), "more fields than its header")


@pytest.mark.parametrize("edit, needle", [
    (lambda a: a.pop("backbone"), "record's backbone is missing or malformed"),
    (lambda a: a["layer"].update(index="six"), "record's layer is missing or malformed"),
    (lambda a: a.update(classes=None), "record's classes is missing or malformed"),
])
def test_a_damaged_record_is_one_error_line(tmp_path, resnet_cache, edit, needle):
    cache = tmp_path / "c.zarr"
    shutil.copytree(resnet_cache, cache)
    edit_json(cache / "zarr.json", lambda d: edit(d["attributes"]))
    for args in (["train", "--cache", cache, "--blocks", "6", "--out", tmp_path / "t"], ["info", cache],
                 ["verify", cache]):
        one_error_line(run(*args), needle)


def test_a_task_with_a_huge_sample_shape_is_refused(tmp_path, task_dir, resnet_cache):
    task = tmp_path / "t"
    shutil.copytree(task_dir, task)
    edit_json(task / "task.json", lambda d: d.update(sample_shape=[10 ** 5, 10 ** 5, 10 ** 5]))
    one_error_line(run("evaluate", "--task", task, "--cache", resnet_cache), "sample_shape [100000, 100000, 100000]")


def png(path, value=200, size=8, mode="RGB"):
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "I;16":
        Image.fromarray(np.full((size, size), value, np.uint16)).save(path)
    else:
        Image.fromarray(np.full((size, size, 3), value, np.uint8)).save(path)


def test_an_image_folder_never_follows_directory_symlinks(tmp_path):
    import os

    root = tmp_path / "imgs"
    for c in ("cat", "dog"):
        for i in range(3):
            png(root / "train" / c / f"{i}.png")
    os.symlink("..", root / "train" / "cat" / "loop")  # back into the root: dogs would be read as cats
    outside = tmp_path / "elsewhere" / "bird"
    png(outside / "0.png")
    os.symlink(outside, root / "train" / "bird")  # a class folder out of the root
    src = subcache.open_source(str(root), "train")
    assert src.classes == ["cat", "dog"] and len(src) == 6
    assert sorted(zip(src.source_keys(), src.labels.tolist())) == [
        (f"train/{c}/{i}.png", k) for k, c in enumerate(("cat", "dog")) for i in range(3)]


def test_a_file_name_that_is_not_utf8_is_one_error_line(tmp_path):
    import os

    root = tmp_path / "imgs"
    png(root / "train" / "cat" / "ok.png")
    good = (root / "train" / "cat" / "ok.png").read_bytes()
    with open(os.path.join(os.fsencode(root / "train" / "cat"), b"\xff\xfe.png"), "wb") as f:
        f.write(good)
    one_error_line(run("build", "--model", "resnet18", "--weights", "none", "--image-size", "32", "--data", root,
                       "--split", "train", "--layer", "6", "--out", tmp_path / "c.zarr"), "is not UTF-8")
    assert not (tmp_path / "c.zarr").exists()


def test_a_decompression_bomb_is_one_error_line(tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "imgs"
    png(root / "train" / "cat" / "0.png", size=64)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64 × 64 is then more than twice the limit
    one_error_line(run("build", "--model", "resnet18", "--weights", "none", "--image-size", "32", "--data", root,
                       "--split", "train", "--layer", "6", "--out", tmp_path / "c.zarr"), "decompression bomb")


def test_16_bit_images_are_scaled_not_saturated(tmp_path):
    root = tmp_path / "imgs"
    png(root / "train" / "a" / "0.png", value=30000, mode="I;16")
    png(root / "train" / "b" / "0.png", value=65535, mode="I;16")
    x = subcache.open_source(str(root), "train").load(0, 2, subcache.Preprocess(image_size=8, mean=(0.5,) * 3, std=(0.25,) * 3,
                                                                                crop_pct=1.0))
    assert x[0].unique().tolist() == [round(30000 / 257)] and x[1].unique().tolist() == [255]
