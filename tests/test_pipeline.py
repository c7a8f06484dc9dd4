"""The build pipeline: photo workload, decode in worker processes (bits independent of their number, resume
included), the writer pool, and the stage-by-stage `bench build`."""
import json
import os
import subprocess
import sys
import threading
from dataclasses import replace

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner

import subcache
from subcache.cli.main import main
from subcache.faults import KILLED_EXIT
from subcache.photos import make_photo_folder

BUILD = ["build", "--model", "resnet18", "--weights", "none", "--image-size", "32", "--layer", "3",
         "--batch-size", "4", "--chunk-mb", "0.12", "--dtype", "float32"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """14 train + 6 test JPEGs (500×375) in 10 classes, from foolbox's ImageNet photos."""
    return make_photo_folder(tmp_path_factory.mktemp("photos") / "p", 14, 6, classes=10, seed=3)


def test_photo_folder_is_seeded_photo_like_and_never_imports_foolbox(photos, tmp_path):
    from PIL import Image

    files = sorted(photos.rglob("*.jpg"))
    assert len(files) == 20 and len(list((photos / "train").iterdir())) == 10
    assert sorted(p.name for p in (photos / "test").iterdir()) == [f"class{c:02d}" for c in range(6)]
    with Image.open(files[0]) as im:
        assert im.size == (500, 375) and im.format == "JPEG" and im.mode == "RGB"
        assert np.asarray(im).std() > 20  # a photo, not a flat colour
    again = make_photo_folder(tmp_path / "again", 14, 6, classes=10, seed=3)
    other = make_photo_folder(tmp_path / "other", 2, 0, classes=10, seed=4)
    assert all(f.read_bytes() == (again / f.relative_to(photos)).read_bytes() for f in files)
    assert (other / "train/class00/000000.jpg").read_bytes() != (photos / "train/class00/000000.jpg").read_bytes()
    pixels = [np.asarray(Image.open(f)) for f in files[:6]]
    assert all(not np.array_equal(pixels[0], p) for p in pixels[1:])  # each image its own crop/jitter
    assert "foolbox" not in sys.modules


def run(*args):
    result = CliRunner().invoke(main, list(args))
    return result


# batches of 12 straddle the 8-item units: [0, 12) serves units [0, 8) and [8, 14)'s first items
WIDE = [*BUILD[:BUILD.index("--batch-size")], "--batch-size", "12", *BUILD[BUILD.index("--batch-size") + 2:]]


@pytest.mark.parametrize("args", [BUILD, WIDE], ids=["batch<unit", "batch>unit"])
def test_workers_do_not_change_the_bits(photos, tmp_path, args):
    """Units of 8 items (a chunk; the train split's second one short), forwarded in batches of 4 (two a unit) or
    12 (across units), decoded a batch at a time by the main process or by 2 worker processes."""
    stores = {}
    for w in (0, 2):
        out = str(tmp_path / f"w{w}.zarr")
        result = run(*args, "--data", str(photos), "--workers", str(w), "--out", out, "--json")
        assert result.exit_code == 0, result.output
        stores[w] = zarr.open_group(out, mode="r")
    assert stores[0]["train/x"].chunks[0] == 8  # two units in train
    for split in ("train", "test"):
        for name in ("x", "y", "id", "key"):
            np.testing.assert_array_equal(stores[0][f"{split}/{name}"][:], stores[2][f"{split}/{name}"][:])
    ref = subcache.open_source(str(photos), "train")  # and the bits are the images', in source order
    backbone = subcache.load_backbone("resnet18", "none", image_size=32)
    x = subcache.data.to_input(ref.load(0, len(ref), backbone.preprocess), backbone.preprocess)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(stores[2]["train/x"][:]), backbone.prefix(x, 3))


def test_resume_with_workers_after_a_kill_is_bit_identical(photos, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    ref, out = str(tmp_path / "ref.zarr"), str(tmp_path / "out.zarr")
    common = [sys.executable, "-m", "subcache", *WIDE, "--data", str(photos)]
    assert run(*WIDE, "--data", str(photos), "--workers", "0", "--out", ref).exit_code == 0
    # output to a file, not a pipe: decode workers outliving the killed build would hold a pipe open (a hang)
    with open(tmp_path / "killed.log", "w") as log:
        killed = subprocess.run(common + ["--workers", "2", "--out", out], stdout=log, stderr=subprocess.STDOUT,
                                env={**env, "SUBCACHE_FAULT": "unit-written:2"})
    assert killed.returncode == KILLED_EXIT, (tmp_path / "killed.log").read_text()
    resumed = run(*WIDE, "--data", str(photos), "--workers", "2", "--out", out, "--resume", "--json")
    assert resumed.exit_code == 0, resumed.output
    assert 1 <= json.loads(resumed.stdout)["resumed_units"] < 3  # the killed run's finished units were kept
    a, b = zarr.open_group(ref, mode="r"), zarr.open_group(out, mode="r")
    for split in ("train", "test"):
        for name in ("x", "y", "id", "key"):
            np.testing.assert_array_equal(a[f"{split}/{name}"][:], b[f"{split}/{name}"][:])
    assert subcache.open_cache(out).status == "complete"


def test_a_broken_photo_in_a_worker_is_one_clear_line(photos, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(photos, data)
    (data / "train" / "class09" / "000009.jpg").write_bytes(b"not a jpeg")  # past the first chunk (calibration)
    result = run(*BUILD, "--data", str(data), "--workers", "2", "--out", str(tmp_path / "c.zarr"))
    assert result.exit_code == 1 and "Traceback" not in result.output and "DataLoader" not in result.output
    error = [line for line in result.output.splitlines() if "Error" in line]
    assert len(error) == 1 and error[0].startswith("Error: ") and "000009.jpg" in error[0]


def test_bad_workers_and_gpu_decode_without_cuda_are_refused(photos, tmp_path):
    out = tmp_path / "c.zarr"
    result = run(*BUILD, "--data", str(photos), "--workers", "-1", "--out", str(out))
    assert result.exit_code == 2 and "--workers" in result.output
    with pytest.raises(subcache.errors.ConfigError, match="--workers"):
        subcache.build_cache(subcache.BuildConfig(out=str(out), data=str(photos), workers=-1))
    if not torch.cuda.is_available():
        result = run(*BUILD, "--data", str(photos), "--decode", "gpu", "--device", "cpu", "--out", str(out))
        assert result.exit_code == 1 and "--decode gpu" in result.output and "CUDA" in result.output
        assert "Traceback" not in result.output
    assert not out.exists()


def test_image_batches_are_in_order_for_any_workers(photos):
    from subcache.pipeline import image_batches, ordered

    assert list(ordered(print, [], workers=2, piece=4)) == []  # a split whose units a resume all kept

    source = subcache.open_source(str(photos), "train")
    pre = subcache.load_backbone("resnet18", "none", image_size=32).preprocess
    want = source.load(0, len(source), pre)
    for w in (0, 2):
        got = list(image_batches(source, pre, 4, workers=w, device=torch.device("cpu")))
        assert [r for r, _ in got] == [(0, 4), (4, 8), (8, 12), (12, 14)]
        assert torch.equal(torch.cat([x for _, x in got]), want)


def test_the_writer_pool_writes_units_at_once_and_waits_only_when_full():
    from subcache.pipeline import Writer

    both = threading.Barrier(2, timeout=10)
    release = threading.Event()
    with Writer(threads=2) as writer:  # two units in flight at once, or the barrier breaks
        writer.submit(both.wait)
        writer.submit(both.wait)
    with Writer(threads=2) as writer:
        for _ in range(4):  # 2 × threads pending: none of these submissions waits
            writer.submit(release.wait)
        assert len(writer.pending) == 4
        release.set()
    with pytest.raises(RuntimeError, match="disk on fire"), Writer(threads=2) as writer:
        writer.submit(lambda: (_ for _ in ()).throw(RuntimeError("disk on fire")))


def test_predict_over_a_folder_decodes_in_workers_with_the_same_results(photos, tmp_path):
    out, task = str(tmp_path / "c.zarr"), str(tmp_path / "probe")
    assert run(*BUILD, "--data", str(photos), "--split", "train", "--out", out).exit_code == 0
    assert run("train", "--cache", out, "--blocks", "none", "--epochs", "2", "--out", task).exit_code == 0
    got = {}
    for w in (0, 2):
        r = run("predict", "--task", task, "--data", str(photos), "--split", "train", "--workers", str(w), "--json")
        assert r.exit_code == 0, r.output
        got[w] = json.loads(r.stdout)["predictions"]
    assert got[0] == got[2] and [row["key"] for row in got[2]] == subcache.open_cache(out).read_keys("train").tolist()


@pytest.mark.parametrize("batch, want", [(128, [40, 40]), (24, [24, 16, 24, 16])])
def test_the_first_batches_measured_to_plan_the_store_are_not_computed_again(npz_path, tmp_path, monkeypatch, batch,
                                                                             want):
    """Units of 16 items (a chunk), 40 items per split: the planner measures the first chunk rounded up to whole
    batches; the build keeps those batches and forwards the rest in whole batches fixed by position."""
    import subcache.build as b

    forwarded = []
    original = b._forward_unit
    monkeypatch.setattr(b, "_forward_unit", lambda bb, layers, x, *a: forwarded.append(len(x)) or
                        original(bb, layers, x, *a))
    config = subcache.BuildConfig(out=str(tmp_path / "c.zarr"), layers=("3",), model="resnet18", weights="none",
                                  data=npz_path, image_size=32, chunk_mb=0.12, limit=40, batch_size=batch)
    result = subcache.build_cache(config, backbone=subcache.load_backbone("resnet18", "none", image_size=32))
    assert result.images == 80 and forwarded == want
    assert zarr.open_group(config.out, mode="r")["train/x"].chunks[0] == 16


class _BatchMix(torch.nn.Module):
    """Adds a little of the batch's mean to every item: each item's activations depend on its batch's company,
    as a conv's float results may (exaggerated, so a different batching changes the bits for sure)."""

    def forward(self, x):
        return x + 0.1 * x.mean(0, keepdim=True)


def batch_sensitive(resnet18):
    torch.manual_seed(0)
    conv = lambda a, b, s=1: torch.nn.Conv2d(a, b, 3, stride=s, padding=1)  # noqa: E731
    return subcache.Backbone.from_modules(torch.nn.Sequential(conv(3, 8, 2), _BatchMix()),
                                          [conv(8, 8), torch.nn.Sequential(conv(8, 8), _BatchMix()), conv(8, 8)],
                                          torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()),
                                          resnet18.preprocess)


def test_batches_are_fixed_by_position_across_units_and_resumes(npz_path, tmp_path, resnet18, monkeypatch):
    """Units of 4 items, batches of 10 (so batches straddle units): every item is forwarded in the batch
    [10k, 10k + 10) of its split — in a whole build and in a resume that starts mid-batch after a kill."""
    from subcache import faults

    backbone = batch_sensitive(resnet18)
    config = subcache.BuildConfig(out=str(tmp_path / "ref.zarr"), layers=("3",), model="custom", weights="none",
                                  data=npz_path, image_size=32, chunk_mb=0.016, limit=36, batch_size=10,
                                  dtype="float32")
    subcache.build_cache(config, backbone=backbone, progress=False)
    ref = zarr.open_group(config.out, mode="r")
    assert ref["train/x"].chunks[0] == 4 and ref.attrs["build"]["batch_size"] == 10
    images = subcache.open_source(npz_path, "train", limit=36).load(0, 36, backbone.preprocess)
    with torch.no_grad():
        want = torch.cat([backbone.prefix(subcache.data.to_input(images[k:k + 10], backbone.preprocess), 3)
                          for k in range(0, 36, 10)])
    np.testing.assert_array_equal(ref["train/x"][:], want.numpy())
    out = str(tmp_path / "out.zarr")
    monkeypatch.setattr(subcache.pipeline, "writer_threads", lambda: 1)  # units written in order
    monkeypatch.setenv("SUBCACHE_FAULT", "unit-written:1")  # a kill after the first unit (the writer may finish more)
    monkeypatch.setattr(faults.os, "_exit", lambda code: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        subcache.build_cache(replace(config, out=out), backbone=backbone, progress=False)
    monkeypatch.delenv("SUBCACHE_FAULT")
    done = subcache.build_cache(replace(config, out=out, resume=True), backbone=backbone, progress=False)
    assert done.skipped_units in (1, 2, 3, 4)  # train's first units: the resume starts inside batch [0, 10) or [10, 20)
    got = zarr.open_group(out, mode="r")
    for split in ("train", "test"):
        for name in ("x", "y", "id"):
            np.testing.assert_array_equal(got[f"{split}/{name}"][:], ref[f"{split}/{name}"][:], err_msg=name)


def test_default_workers_are_the_cores_capped_on_cuda_and_none_on_the_cpu(monkeypatch):
    from subcache.pipeline import MAX_WORKERS, check_workers

    for cores, want in ((3, 3), (64, MAX_WORKERS)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)))
        assert check_workers(None, torch.device("cuda")) == want
        assert check_workers(None, torch.device("cpu")) == 0  # measured: threads cost less CPU there (README)
        assert check_workers(5, torch.device("cpu")) == 5


def test_decode_processes_start_from_the_forkserver_when_the_loader_pickles(photos):
    """A fork of the building process (its heap keeps the reused activation memory) made every page it wrote next a
    copy-on-write fault: 0.42 of the stage bound with 2 workers. Photo folders' loaders pickle, so they start from
    the forkserver; a dataset object that does not pickle still forks."""
    import functools
    import pickle

    from subcache.pipeline import _start, image_loader

    source = subcache.open_source(str(photos), "train")
    pre = subcache.load_backbone("resnet18", "none", image_size=32).preprocess
    source.load(0, 2, pre)  # starts the source's thread pool, which must stay behind when pickled
    load, _ = image_loader(source, pre, "cpu", torch.device("cpu"))
    assert _start(load) == "forkserver"
    assert torch.equal(pickle.loads(pickle.dumps(load))(0, 3), load(0, 3))
    assert _start(functools.partial(lambda s, a, b: s, threading.Lock())) == "fork"
