"""build.py's parts, in process and fast (each test kills mutants that `examples/mutation.sh build` found
surviving the end-to-end build tests)."""
from __future__ import annotations

import json
import os
import shutil
import time

import numpy as np
import pytest
import zarr

import subcache
from subcache.build import BuildConfig, image_job, restore_scales, source_fingerprint
from subcache.data import ImageSource, open_source
from subcache.photos import make_photo_folder
from subcache.pipeline import image_loader


def test_recorded_options_are_those_that_change_the_bits():
    config = BuildConfig(out="o.zarr", layers=("3", "5"), data="d.npz", splits=("train",), device="cuda", workers=4,
                         resume=True, download=True, data_root="r")
    assert config.recorded() == {
        "layers": ["3", "5"], "model": "efficientnet_lite0", "weights": "imagenet", "data": "d.npz",
        "splits": ["train"], "limit": None, "image_size": None, "dtype": "float16", "codec": "auto", "shard_mb": None,
        "flip_views": False, "batch_size": 128, "chunk_mb": 1.0, "batching": "position"}
    other = BuildConfig(out="o.zarr", decode="gpu", corrupt="gaussian_blur:1").recorded()
    assert other["decode"] == "gpu" and other["corrupt"] == "gaussian_blur:1"


def source(labels=(0, 1, 2), ids=(10, 11, 12), array=None, files=None) -> ImageSource:
    return ImageSource("s", "train", np.asarray(labels), np.asarray(ids), ["a", "b", "c"], array=array, files=files)


def test_the_source_fingerprint_changes_with_labels_ids_pixels_and_files(tmp_path):
    pixels = np.zeros((3, 4, 4), np.uint8)
    base = source_fingerprint({"train": source(array=pixels)})
    assert source_fingerprint({"train": source(array=pixels.copy())}) == base
    changed = pixels.copy()
    changed[2, 3, 3] = 1
    for other in (source(labels=(0, 1, 1), array=pixels), source(ids=(10, 11, 13), array=pixels),
                  source(array=changed)):
        assert source_fingerprint({"train": other}) != base
    files = [tmp_path / f"{i}.jpg" for i in range(3)]
    for f in files:
        f.write_bytes(b"jpeg")
    photos = source_fingerprint({"train": source(files=files)})
    assert photos != source_fingerprint({"train": source()})
    os.utime(files[1], ns=(0, 10 ** 9))
    touched = source_fingerprint({"train": source(files=files)})
    files[1].write_bytes(b"jpeg!")
    os.utime(files[1], ns=(0, 10 ** 9))
    assert len({photos, touched, source_fingerprint({"train": source(files=files)})}) == 3


def test_an_image_job_loads_with_the_backbone_s_preprocessing_and_decodes_in_workers_only_for_files(
        tmp_path, npz_path, resnet18):
    import torch

    folder = make_photo_folder(tmp_path / "p", 4, classes=2, seed=0)
    photos = open_source(str(folder), "train")
    config = BuildConfig(out="o", workers=2, batch_size=3)
    job = image_job(photos, resnet18, config, torch.device("cpu"))
    load, _ = image_loader(photos, resnet18.preprocess, "cpu", torch.device("cpu"))
    assert (job.n, job.workers, job.batch) == (4, 2, 3)
    torch.testing.assert_close(job.finish(job.load(1, 3)), load(1, 3), rtol=0, atol=0)
    assert job.load(0, 1).shape[-1] == resnet18.preprocess.image_size
    in_memory = image_job(open_source(npz_path, "train", limit=5), resnet18, config, torch.device("cpu"))
    assert in_memory.workers == 0  # sliced in the main process, whatever --workers says


def test_a_resume_rewrites_only_missing_int8_scales(int8_store, tmp_path):
    out = shutil.copytree(int8_store, tmp_path / "c.zarr")
    cache = subcache.open_cache(out, mode="r+")
    stored = {s: cache.split(s).x_scale[:] for s in cache.splits}
    new = np.full_like(stored["train"], 7.0)
    restore_scales(cache, lambda: {"scale": new})  # both splits' scales decode: nothing is rewritten
    assert all((cache.split(s).x_scale[:] == stored[s]).all() for s in cache.splits)
    shutil.rmtree(out / "test" / "x_scale" / "c")
    restore_scales(cache, lambda: {"scale": new})
    assert (cache.split("test").x_scale[:] == 7.0).all() and (cache.split("train").x_scale[:] == stored["train"]).all()


def test_a_float_store_never_plans_scales(tmp_path, npz_path, resnet18):
    out = tmp_path / "f.zarr"
    subcache.build_cache(BuildConfig(out=str(out), layers=("3",), model="resnet18", weights="none", data=npz_path,
                                     image_size=32, limit=8, splits=("test",)), backbone=resnet18, progress=False)

    def plan():
        raise AssertionError("a float16 store has no scales to plan")

    restore_scales(subcache.open_cache(out, mode="r+"), plan)


def test_a_store_records_its_format_layer_backbone_and_build(int8_store, resnet18, npz_path):
    import torch

    from subcache.inputs import record

    from subcache.store import FORMAT, FORMAT_VERSION

    attrs = subcache.open_cache(int8_store).attrs
    assert (attrs["format"], attrs["format_version"]) == (FORMAT, FORMAT_VERSION) == ("subcache-cache", 2)
    assert attrs["layer"] == {"index": 3, "name": resnet18.block_names[2], "num_blocks": 8}
    assert resnet18.block_names[2] == "layer2.0"
    assert attrs["backbone"] == {**resnet18.identity(), "weights_spec": "none", "image_size": 32}
    assert attrs["sample_shape"] == list(resnet18.input_shape(3)) and attrs["dtype"] == "int8"
    assert (attrs["splits"], attrs["classes"], attrs["flip_views"]) == (["train", "test"], ["0", "1", "2", "3"], False)
    assert attrs["build"]["layers"] == ["3"] and attrs["build"]["limit"] == 24 and attrs["data"] == npz_path
    made = record(resnet18.preprocess, open_source(npz_path, "train", limit=24))
    assert attrs["preprocess"] == json.loads(json.dumps(made))  # as JSON keeps it (tuples become lists)
    assert attrs["versions"] == {"subcache": subcache.__version__, "torch": torch.__version__,
                                 "zarr": zarr.__version__}
    assert abs(time.mktime(time.strptime(attrs["created"], "%Y-%m-%dT%H:%M:%SZ")) - time.mktime(time.gmtime())) < 3600


def test_bad_build_options_are_refused_before_any_work():
    from subcache.build import check_build_config
    from subcache.errors import ConfigError

    for options, message in [
            ({"resume": True, "overwrite": True}, "--resume and --overwrite exclude each other: resume keeps finished "
                                                  "chunks, overwrite discards them"),
            ({"splits": ()}, "no --split given; e.g. --split train --split test"),
            ({"shard_mb": 0.5}, "--shard-mb must be at least --chunk-mb (1.0), got 0.5"),
            ({"batch_size": 0}, "--batch-size must be positive, got 0"),
            ({"workers": -1}, "--workers must be 0 (decode in the main process) or a positive number, got -1")]:
        with pytest.raises(ConfigError) as e:
            check_build_config(BuildConfig(out="o", **options))
        assert str(e.value) == message
    check_build_config(BuildConfig(out="o", shard_mb=1.0, workers=0))


def tiny(out, npz_path, **options) -> BuildConfig:
    return BuildConfig(**{"out": str(out), "layers": ("3",), "model": "resnet18", "weights": "none",
                          "data": npz_path, "image_size": 32, "batch_size": 16, "limit": 24, **options})


def test_int8_scales_are_measured_on_the_first_calibration_items_of_the_first_split(tmp_path, npz_path, resnet18,
                                                                                      monkeypatch):
    import torch

    import subcache.plan
    from subcache.store import quantize_scale

    monkeypatch.setattr(subcache.plan, "CALIBRATION", 8)  # of 24 items; the first chunk holds 4
    exact = subcache.build_cache(tiny(tmp_path / "f.zarr", npz_path, dtype="float32", codec="none"),
                                 backbone=resnet18, progress=False).paths[0]
    x = subcache.open_cache(exact).read_x("train")
    int8 = subcache.build_cache(tiny(tmp_path / "q.zarr", npz_path, dtype="int8", chunk_mb=1 / 64),
                                backbone=resnet18, progress=False).paths[0]
    want = quantize_scale(x[:8].abs().amax(dim=(0, 2, 3)))
    assert not torch.equal(want, quantize_scale(x.abs().amax(dim=(0, 2, 3))))  # the count matters here
    torch.testing.assert_close(subcache.open_cache(int8).scale(), want, rtol=0, atol=0)


def test_a_build_loads_its_backbone_by_name_records_its_source_and_reports_progress(tmp_path, npz_path, capsys):
    out = tmp_path / "c.zarr"
    result = subcache.build_cache(tiny(out, npz_path, limit=5, splits=("test",)))  # no backbone given; progress on
    assert "test → block 3" in capsys.readouterr().err
    cache = subcache.open_cache(out)
    assert cache.backbone["model"] == "resnet18" and cache.backbone["weights_spec"] == "none"
    assert cache.backbone["image_size"] == 32 and cache.sample_shape == (64, 8, 8)  # resnet18 layer2.0 at 32 px
    assert len(cache.split("test")) == 5 and result.images == 5
    src = open_source(npz_path, "test", limit=5)
    assert cache.attrs["source"] == {"data": npz_path, "sha256": source_fingerprint({"test": src})}


def test_a_corrupted_build_is_drawn_from_the_corrupted_images(tmp_path, npz_path, resnet18):
    plain = subcache.build_cache(tiny(tmp_path / "p.zarr", npz_path, limit=4, splits=("test",)), backbone=resnet18,
                                 progress=False).paths[0]
    noisy = subcache.build_cache(tiny(tmp_path / "n.zarr", npz_path, limit=4, splits=("test",),
                                      corrupt="gaussian_noise:3"), backbone=resnet18, progress=False).paths[0]
    a, b = subcache.open_cache(plain).read_x("test"), subcache.open_cache(noisy).read_x("test")
    assert (a - b).abs().amax() > 0.1
    assert subcache.open_cache(noisy).attrs["build"]["corrupt"] == "gaussian_noise:3"


def test_a_build_from_python_objects_reads_them_not_the_config_s_data(tmp_path, npz_path, resnet18):
    rng = np.random.default_rng(0)
    items = [(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8), i % 2) for i in range(6)]
    out = subcache.build_cache(tiny(tmp_path / "o.zarr", "no-such-dataset", limit=None), backbone=resnet18,
                               data={"train": items}, progress=False).paths[0]
    cache = subcache.open_cache(out)
    assert cache.splits == ["train"] and cache.read_y("train").tolist() == [0, 1, 0, 1, 0, 1]
    assert cache.attrs["data"] == "python:list"


def test_the_batches_measured_to_plan_the_store_are_not_forwarded_again(tmp_path, npz_path, resnet18):
    calls = []
    hook = resnet18.stem.register_forward_pre_hook(lambda module, args: calls.append(len(args[0])))
    try:
        subcache.build_cache(tiny(tmp_path / "c.zarr", npz_path, chunk_mb=1 / 64), backbone=resnet18, progress=False)
    finally:
        hook.remove()
    # one item probes the block's input shape; the first chunk (2 items) is measured in a whole forward batch (16),
    # which the build keeps: train's 24 items = 16 + 8, then test's
    assert calls == [1, 16, 8, 16, 8]


def test_shards_pack_the_chunks_when_asked(tmp_path, npz_path, resnet18):
    out = subcache.build_cache(tiny(tmp_path / "s.zarr", npz_path, chunk_mb=1 / 64, shard_mb=1 / 16, splits=("test",)),
                               backbone=resnet18, progress=False).paths[0]
    x = subcache.open_cache(out).split("test").x
    assert (x.chunks[0], x.shards[0]) == (2, 8)  # float16 (64, 8, 8): 8 KiB an item


def test_a_resume_rewrites_only_the_missing_units_and_counts_them(tmp_path, npz_path, resnet18, capsys):
    from dataclasses import replace

    config = tiny(tmp_path / "c.zarr", npz_path, chunk_mb=1 / 64)  # float16: 2-item chunks, 12 units a split
    t0 = time.perf_counter()
    full = subcache.build_cache(config, backbone=resnet18, progress=False)
    assert (full.images, full.skipped_units, full.layers) == (48, 0, [3])
    assert 0 < full.seconds < time.perf_counter() - t0 and capsys.readouterr().err == ""  # progress=False: silent
    names = [f"{s}/{a}" for s in ("train", "test") for a in ("x", "y", "id", "key")]
    want = {name: zarr.open_array(f"{config.out}/{name}", mode="r")[:] for name in names}
    # as a kill leaves it: still building, three units not on disk (train's 4th x chunk, last y chunk, test's id 0)
    zarr.open_group(config.out, mode="r+").attrs["status"] = "building"
    for chunk in ("train/x/c/3/0/0/0", "train/y/c/11", "test/id/c/0"):
        os.remove(f"{config.out}/{chunk}")
    again = subcache.build_cache(replace(config, resume=True), backbone=resnet18)  # progress on: lines on stderr
    assert (again.images, again.skipped_units) == (6, 21)
    lines = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()]
    assert lines == ["train → block 3 22/24", "train → block 3 24/24", "test → block 3 24/24"]
    for name in names:
        np.testing.assert_array_equal(zarr.open_array(f"{config.out}/{name}", mode="r")[:], want[name])
    assert subcache.open_cache(config.out).status == "complete"


def test_a_split_within_the_measured_batch_is_written_from_the_measurement_alone(tmp_path, npz_path, resnet18):
    out = subcache.build_cache(tiny(tmp_path / "c.zarr", npz_path, limit=10, splits=("train",)), backbone=resnet18,
                               progress=False).paths[0]
    assert len(subcache.open_cache(out).split("train")) == 10


def test_outputs_that_are_files_or_overlap_the_source_are_refused(tmp_path, npz_path, resnet18):
    from subcache.build import check_outputs, check_overlap
    from subcache.errors import ConfigError, StoreExistsError

    a_file = tmp_path / "out"
    a_file.write_text("mine")
    with pytest.raises(StoreExistsError) as e:
        check_outputs(str(a_file), [f"{a_file}/block03.zarr", f"{a_file}/block05.zarr"], overwrite=False, resume=False)
    assert str(e.value) == f"output {a_file} is a file; a multi-layer build writes a folder of stores"
    with pytest.raises(StoreExistsError, match="exists; pass --resume"):  # one layer: the file is the store's path
        check_outputs(str(a_file), [str(a_file)], overwrite=False, resume=False)
    photos = make_photo_folder(tmp_path / "photos", 2, classes=2, seed=0)
    check_overlap([str(tmp_path / "c.zarr")], [str(photos)])
    for inside in (f"{photos}/train/c.zarr", str(tmp_path)):
        with pytest.raises(ConfigError) as e:
            check_overlap([inside], [str(photos)])
        assert str(e.value) == f"--out {inside} overlaps the build's source {photos}; write the cache elsewhere"
    before = sorted(photos.rglob("*"))
    with pytest.raises(ConfigError, match="overlaps the build's source"):
        subcache.build_cache(tiny(photos / "train" / "c.zarr", str(photos), splits=("train",)), backbone=resnet18,
                             progress=False)
    assert sorted(photos.rglob("*")) == before  # not even a lock file


def test_config_paths_become_text():
    from pathlib import Path

    config = BuildConfig(out=Path("o.zarr"), data=Path("d.npz"), data_root=Path("root"))
    assert (config.out, config.data, config.data_root) == ("o.zarr", "d.npz", "root")


def test_several_layers_one_pass_keys_fault_points_and_no_block_past_the_last(tmp_path, npz_path, resnet18,
                                                                            monkeypatch, capsys):
    import subcache.build

    points, ran = [], []
    monkeypatch.setattr(subcache.build, "fault", points.append)
    hooks = [resnet18.block(i).register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i in range(1, 9)]
    try:
        result = subcache.build_cache(tiny(tmp_path / "out", npz_path, layers=("5", "3"), limit=4), backbone=resnet18)
    finally:
        for hook in hooks:
            hook.remove()
    assert result.paths == [str(tmp_path / "out" / "block03.zarr"), str(tmp_path / "out" / "block05.zarr")]
    assert set(ran) == {1, 2, 3, 4}  # block 5's input is the last kept: blocks 5.. never run
    assert points == ["unit-written"] * 2 + ["before-finish"]  # one 4-item unit a split
    assert [line.split(" (")[0] for line in capsys.readouterr().err.splitlines()] == [
        "train → block 3, 5 4/4", "test → block 3, 5 4/4"]
    for path, layer in zip(result.paths, (3, 5)):
        cache = subcache.open_cache(path)
        assert cache.layer == layer and cache.read_keys("test").tolist() == ["0", "1", "2", "3"]  # an .npz: ids


def test_resume_refuses_other_options_and_changed_sources_and_sweeps_litter(tmp_path, npz_path, resnet18):
    from dataclasses import replace

    from subcache.errors import ForeignStoreError

    source = shutil.copy(npz_path, tmp_path / "src.npz")
    config = tiny(tmp_path / "c.zarr", str(source), limit=4, splits=("test",))
    subcache.build_cache(config, backbone=resnet18, progress=False)
    with pytest.raises(ForeignStoreError) as e:
        subcache.build_cache(replace(config, resume=True, chunk_mb=0.5), backbone=resnet18, progress=False)
    assert str(e.value).startswith(f"cannot resume {config.out}: it was built with other options") and \
        str(e.value).endswith("; rerun the original command or use --overwrite")
    arrays = dict(np.load(npz_path))
    np.savez(source, **{**arrays, "y_test": arrays["y_test"][::-1]})  # the same file, other labels
    with pytest.raises(ForeignStoreError) as e:
        subcache.build_cache(replace(config, resume=True), backbone=resnet18, progress=False)
    assert str(e.value) == (f"cannot resume {config.out}: its source data changed since the build began "
                            f"(fingerprint differs); rebuild it with --overwrite")
    shutil.copy(npz_path, source)
    litter = tmp_path / "c.zarr" / "test" / "x" / "c" / "9.partial"
    litter.write_bytes(b"half")
    subcache.build_cache(replace(config, resume=True), backbone=resnet18, progress=False)
    assert not litter.exists()


def test_overwrite_replaces_a_store_whole(tmp_path, npz_path, resnet18):
    from dataclasses import replace

    config = tiny(tmp_path / "c.zarr", npz_path, limit=6, splits=("test",))
    subcache.build_cache(config, backbone=resnet18, progress=False)
    subcache.build_cache(replace(config, limit=4, overwrite=True), backbone=resnet18, progress=False)
    assert len(subcache.open_cache(config.out).split("test")) == 4


def test_an_int8_resume_restores_missing_scales_first(tmp_path, npz_path, resnet18):
    from dataclasses import replace

    config = tiny(tmp_path / "c.zarr", npz_path, dtype="int8", limit=8, chunk_mb=1 / 64)
    subcache.build_cache(config, backbone=resnet18, progress=False)
    want = subcache.open_cache(config.out).scale().clone()
    zarr.open_group(config.out, mode="r+").attrs["status"] = "building"
    shutil.rmtree(tmp_path / "c.zarr" / "train" / "x_scale" / "c")
    subcache.build_cache(replace(config, resume=True), backbone=resnet18, progress=False)
    assert (subcache.open_cache(config.out).scale() == want).all()


@pytest.mark.parametrize("bad", [None, 0.0, float("inf")])
def test_finish_refuses_int8_scales_that_are_missing_or_not_finite_and_positive(int8_store, tmp_path, bad):
    from subcache.build import finish
    from subcache.errors import StoreError

    out = shutil.copytree(int8_store, tmp_path / "c.zarr")
    if bad is None:
        shutil.rmtree(out / "test" / "x_scale" / "c")
    else:
        scale = zarr.open_array(str(out / "test" / "x_scale"), mode="r+")
        scale[1] = bad
    cache = subcache.open_cache(out, mode="r+")
    with pytest.raises(StoreError) as e:
        finish(cache)
    assert str(e.value) == (f"{out}: test/x_scale (the int8 scales) is missing, damaged or not positive after the "
                            f"build; rerun with --resume")


def test_finish_names_missing_chunks_else_marks_the_store_complete(int8_store, tmp_path):
    from subcache.build import finish
    from subcache.errors import StoreError

    out = shutil.copytree(int8_store, tmp_path / "c.zarr")
    zarr.open_group(str(out), mode="r+").attrs.update({"status": "building", "finished": None})
    cache = subcache.open_cache(out, require_complete=False, mode="r+")
    finish(cache)
    assert cache.status == "complete" and time.strptime(cache.attrs["finished"], "%Y-%m-%dT%H:%M:%SZ")
    chunks = sorted((out / "train" / "y" / "c").iterdir(), key=lambda f: int(f.name))
    assert len(chunks) == 6
    for f in chunks:
        f.unlink()
    with pytest.raises(StoreError) as e:
        finish(cache)
    assert str(e.value) == f"{out}: train/y is missing chunks [0, 1, 2, 3, 4] after the build; rerun with --resume"


def test_a_full_disk_is_one_line_naming_the_store(tmp_path, npz_path, resnet18, monkeypatch):
    import errno

    import subcache.build
    from subcache.errors import StoreError

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(subcache.build, "_write_unit", full)
    out = tmp_path / "c.zarr"
    with pytest.raises(StoreError) as e:
        subcache.build_cache(tiny(out, npz_path, limit=4), backbone=resnet18, progress=False)
    assert str(e.value) == (f"no space left on the device while writing {out}; the store stays incomplete: free "
                            f"space and rerun the same command with --resume")


def test_one_dataset_object_serves_the_first_split_and_a_held_lock_refuses_a_second_writer(tmp_path, npz_path,
                                                                                         resnet18):
    from subcache.distributed import store_locks
    from subcache.errors import StoreError

    items = [(np.zeros((32, 32, 3), np.uint8), 1)] * 3
    out = subcache.build_cache(tiny(tmp_path / "o.zarr", "unused", limit=None, splits=("test", "train")),
                               backbone=resnet18, data=items, progress=False).paths[0]
    assert subcache.open_cache(out).splits == ["test"]
    with store_locks([str(tmp_path / "c.zarr")]):
        with pytest.raises(StoreError, match="another"):
            subcache.build_cache(tiny(tmp_path / "c.zarr", npz_path, limit=4), backbone=resnet18, progress=False)


def test_forwarded_reuses_the_measured_batches_in_order_then_loads_the_rest_on_the_device():
    import itertools

    import torch

    from subcache.build import Job, forwarded

    def job(n, load=None, **kw):  # n items with ids and keys, forwarded 2 at a time
        return Job(n, load, np.arange(n), np.arange(n), np.arange(n).astype(str), batch=2, **kw)

    loads, reused = [], {(0, 2): "acts 0-2", (2, 4): "acts 2-4"}
    job7 = job(7, lambda a, b: loads.append((a, b)) or torch.arange(a, b), reuse=lambda a, b: reused.get((a, b)))
    got = list(itertools.islice(forwarded(job7, [(0, 7)], lambda x: x.tolist(), torch.device("cpu")), 10))
    assert got == [((0, 2), "acts 0-2"), ((2, 4), "acts 2-4"), ((4, 6), [4, 5]), ((6, 7), [6])]
    assert loads == [(4, 6), (6, 7)]  # the reused batches are never loaded again
    # a Job without `finish` (build --from) moves each batch to the device; with one, `finish` does it
    finished = job(3, lambda a, b: torch.arange(a, b), finish=lambda x: x * 10)
    assert [x for _, x in forwarded(finished, [(0, 3)], lambda x: x.tolist(), torch.device("cpu"))] == [[0, 10], [20]]
    assert list(forwarded(job(4, reuse=lambda a, b: (a, b)), [(0, 4)], None, torch.device("cpu"))) == [((0, 2), (0, 2)), ((2, 4), (2, 4))]


def test_created_and_finished_are_utc_whatever_the_local_time_zone(int8_store, tmp_path, monkeypatch, resnet18):
    import calendar

    from subcache.build import _attrs, finish

    out = shutil.copytree(int8_store, tmp_path / "c.zarr")
    monkeypatch.setenv("TZ", "XYZ-5:30")  # local time 5 h 30 ahead of UTC (a POSIX rule: no tz database needed)
    time.tzset()
    try:
        cache = subcache.open_cache(out, mode="r+")
        finish(cache)
        stamped = calendar.timegm(time.strptime(cache.attrs["finished"], "%Y-%m-%dT%H:%M:%SZ"))
        assert abs(stamped - time.time()) < 600
        attrs = _attrs(BuildConfig(out="o.zarr"), resnet18, 3, (8, 4, 4), {"train": source()})
        assert abs(calendar.timegm(time.strptime(attrs["created"], "%Y-%m-%dT%H:%M:%SZ")) - time.time()) < 600
    finally:
        monkeypatch.undo()
        time.tzset()


def test_layers_named_by_block_are_recorded_as_indices(tmp_path, npz_path, resnet18):
    config = tiny(tmp_path / "c.zarr", npz_path, limit=2, splits=("test",), layers=("layer2.0",))
    subcache.build_cache(config, backbone=resnet18, progress=False)
    cache = subcache.open_cache(config.out)
    assert cache.layer == 3 and cache.attrs["build"]["layers"] == ["3"]  # `--layer 3 --resume` resumes it
