import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import zarr

import subcache
from subcache.data import to_input
from subcache.errors import DataError, ForeignStoreError, IncompleteStoreError, StoreExistsError


def live_prefix(backbone, source, layer, flip=False):
    x = to_input(source.load(0, len(source), backbone.preprocess), backbone.preprocess, flip=flip)
    with torch.no_grad():
        return backbone.prefix(x, layer)


@pytest.mark.parametrize("model, layer", [("resnet18", "layer2.1"), ("timm:vit_tiny_patch16_224", "4")])
def test_cached_activations_equal_a_live_forward(tmp_path, npz_path, model, layer):
    backbone = subcache.load_backbone(model, "none", image_size=32)
    out = str(tmp_path / "c.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=(layer,), model=model, weights="none", data=npz_path,
                                              image_size=32, batch_size=50), backbone=backbone)
    cache = subcache.open_cache(out)
    assert cache.status == "complete" and cache.layer == backbone.resolve(layer)
    for split in ("train", "test"):
        source = subcache.open_source(npz_path, split)
        expected = live_prefix(backbone, source, cache.layer)
        got = cache.read_x(split)
        assert got.dtype == torch.float16 and got.shape == expected.shape
        torch.testing.assert_close(got, expected.half(), rtol=0, atol=0)  # float16 rounding only
        np.testing.assert_array_equal(cache.split(split).y[:], source.labels)
        np.testing.assert_array_equal(cache.split(split).id[:], np.arange(len(source)))


def test_several_layers_in_one_pass_and_exact_flip_views(tmp_path, npz_path, resnet18):
    out = str(tmp_path / "multi")
    result = subcache.build_cache(subcache.BuildConfig(out=out, layers=("3", "layer3.0"), model="resnet18",
                                                       weights="none", data=npz_path, splits=("test",),
                                                       image_size=32, flip_views=True, dtype="float32"),
                                  backbone=resnet18)
    assert result.paths == [f"{out}/block03.zarr", f"{out}/block05.zarr"]
    source = subcache.open_source(npz_path, "test")
    for path, layer in zip(result.paths, (3, 5)):
        cache = subcache.open_cache(path)
        torch.testing.assert_close(cache.read_x("test"), live_prefix(resnet18, source, layer))
        torch.testing.assert_close(cache.read_x("test", flip=True), live_prefix(resnet18, source, layer, flip=True))


def test_bfloat16_storage_round_trips(tmp_path, npz_path, resnet18):
    out = str(tmp_path / "bf.zarr")
    subcache.build_cache(subcache.BuildConfig(out=out, layers=("2",), model="resnet18", weights="none",
                                              data=npz_path, splits=("test",), image_size=32, dtype="bfloat16"),
                         backbone=resnet18)
    got = subcache.open_cache(out).read_x("test")
    assert got.dtype == torch.bfloat16
    expected = live_prefix(resnet18, subcache.open_source(npz_path, "test"), 2)
    torch.testing.assert_close(got, expected.bfloat16(), rtol=0, atol=0)


KILLER = textwrap.dedent("""
    import os, signal, sys, threading
    import subcache.build as b
    calls, kill_at, finished = [0], int(sys.argv[1]), threading.Semaphore(0)
    lock, original = threading.Lock(), b._write_unit
    def write_then_die(stores, split, a, bb, acts, job):  # units are written by a pool of threads
        with lock:
            calls[0] += 1
            me = calls[0]
        if me > kill_at:  # later units never finish: exactly kill_at - 1 are on disk at the kill
            threading.Event().wait()
        if me == kill_at:  # once the earlier calls are done, die half-way through a unit: x written, y/id not
            for _ in range(kill_at - 1):
                finished.acquire()
            stores[0].split(split).x[a:bb] = acts[stores[0].layer]["x"]
            os.kill(os.getpid(), signal.SIGKILL)
        original(stores, split, a, bb, acts, job)
        finished.release()
    b._write_unit = write_then_die
    from subcache.cli.main import main
    main(sys.argv[2:])
""")


# 90 items per split in 16-item units: 5 full units and a short one of 10 per split (train: calls 1-6, test: 7-12).
# Killing at 12 leaves the short last unit half-written (x on disk, y and id not); killing at 3 a full one.
@pytest.mark.parametrize("kill_at", [3, 12])
def test_resume_after_kill_is_bit_identical(tmp_path, npz_path, kill_at):
    args = ["build", "--model", "resnet18", "--weights", "none", "--data", npz_path, "--image-size", "32",
            "--layer", "4", "--batch-size", "16", "--chunk-mb", "0.05", "--limit", "90"]
    ref, out = str(tmp_path / "ref.zarr"), str(tmp_path / "out.zarr")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    done = subprocess.run([sys.executable, "-m", "subcache", *args, "--out", ref, "--json"], capture_output=True,
                          text=True, env=env)
    assert done.returncode == 0, done.stderr
    killed = subprocess.run([sys.executable, "-c", KILLER, str(kill_at), *args, "--out", out], capture_output=True,
                            env=env)
    assert killed.returncode == -9
    (tmp_path / "out.zarr" / "train" / "x" / "c" / "litter.1234.partial").write_bytes(b"half a chunk")
    with pytest.raises(IncompleteStoreError, match="--resume"):
        subcache.open_cache(out)
    again = subprocess.run([sys.executable, "-m", "subcache", *args, "--out", out], capture_output=True, text=True,
                           env=env)
    assert again.returncode == 1 and "--resume" in again.stderr and "Traceback" not in again.stderr
    resumed = subprocess.run([sys.executable, "-m", "subcache", *args, "--out", out, "--resume", "--json"],
                             capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["resumed_units"] == kill_at - 1  # units the writer finished before the kill
    a, b = zarr.open_group(ref, mode="r"), zarr.open_group(out, mode="r")
    assert a["train/x"].shape[0] == 90 and a["train/x"].chunks[0] == 16  # not a multiple of the unit
    for split in ("train", "test"):
        for name in ("x", "y", "id"):
            np.testing.assert_array_equal(a[f"{split}/{name}"][:], b[f"{split}/{name}"][:])
    assert not list((tmp_path / "out.zarr").rglob("*.partial"))
    assert subcache.open_cache(out).status == "complete"


def test_existing_output_needs_overwrite_and_resume_checks_options(tmp_path, npz_path, resnet18):
    out = str(tmp_path / "c.zarr")
    config = subcache.BuildConfig(out=out, layers=("2",), model="resnet18", weights="none", data=npz_path,
                                  splits=("test",), image_size=32)
    subcache.build_cache(config, backbone=resnet18)
    with pytest.raises(StoreExistsError, match="--resume .* --overwrite"):
        subcache.build_cache(config, backbone=resnet18)
    from dataclasses import replace

    with pytest.raises(ForeignStoreError, match="other options"):
        subcache.build_cache(replace(config, resume=True, dtype="float32"), backbone=resnet18)
    with pytest.raises(ForeignStoreError, match=r"\(batch_size differ"):  # the batches fix the bits: recorded
        subcache.build_cache(replace(config, resume=True, batch_size=64), backbone=resnet18)
    assert subcache.build_cache(replace(config, resume=True), backbone=resnet18).images == 0
    group = zarr.open_group(out, mode="r+")  # begun by a version that batched each unit from its own start
    group.attrs["build"] = {k: v for k, v in group.attrs["build"].items() if k != "batching"}
    with pytest.raises(ForeignStoreError, match=r"\(batching differ"):
        subcache.build_cache(replace(config, resume=True), backbone=resnet18)
    group.attrs["build"] = {**group.attrs["build"], "batching": "position"}
    # the same block spelt by name resumes (resolved indices are compared, not spellings); another block does not
    assert subcache.build_cache(replace(config, resume=True, layers=("layer1.1",)), backbone=resnet18).images == 0
    with pytest.raises(ForeignStoreError, match="other options"):
        subcache.build_cache(replace(config, resume=True, layers=("layer2.0",)), backbone=resnet18)
    assert subcache.build_cache(replace(config, overwrite=True), backbone=resnet18).images == 96


def test_foreign_stores_are_refused(tmp_path):
    zarr.open_group(str(tmp_path / "plain.zarr"), mode="w").create_array("x", shape=(2,), dtype="f4")
    with pytest.raises(ForeignStoreError, match="not a subcache cache"):
        subcache.open_cache(str(tmp_path / "plain.zarr"))
    with pytest.raises(ForeignStoreError, match="not a subcache cache"):
        subcache.open_cache(str(tmp_path))


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((2, 4, 4), np.uint8)}, "needs arrays x and y"),
    ({"x": np.zeros((2, 4, 4), np.float32), "y": np.zeros(2, np.int64)}, "must be uint8"),
    ({"x": np.zeros((2, 4, 4, 2), np.uint8), "y": np.zeros(2, np.int64)}, "C in 1, 3, 4"),
    ({"x": np.zeros((2, 4, 4), np.uint8), "y": np.zeros(3, np.int64)}, "matching x"),
])
def test_wrong_npz_layout_is_explained(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match=message):
        subcache.open_source(str(tmp_path / "bad.npz"), "train")


def test_missing_datasets_say_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBCACHE_FASHION_MNIST", str(tmp_path))
    monkeypatch.setattr("subcache.data.FASHION_MNIST_DIR", tmp_path)
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        subcache.open_source("fashion-mnist", "train", root=tmp_path)
    with pytest.raises(DataError, match="--download"):
        subcache.open_source("cifar10", "train", root=tmp_path)
    with pytest.raises(DataError, match="unknown data"):
        subcache.open_source("imagenet21k", "train")
    with pytest.raises(DataError, match="no split 'val'"):
        subcache.open_source("fashion-mnist", "val")


def test_image_folder_photos_are_resized_and_cropped(tmp_path):
    from PIL import Image

    for cls, color in (("cat", 200), ("dog", 30)):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (50 + 10 * i, 40), (color, color, color)).save(tmp_path / "train" / cls / f"{i}.png")
    source = subcache.open_source(str(tmp_path), "train")
    assert source.classes == ["cat", "dog"] and len(source) == 6
    pre = subcache.Preprocess(32, (0.5,) * 3, (0.5,) * 3, crop_pct=0.875)
    images = source.load(0, 6, pre)
    assert images.shape == (6, 3, 32, 32) and images.dtype == torch.uint8
