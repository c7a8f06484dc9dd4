"""Cache format 2: checksums and `verify`, codec by measurement, int8 caches, self-describing arrays (xarray, plain
zarr-python, tensorstore), sharding for object stores, and bad input / faults."""
import errno
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

import subcache
import subcache.store as store
from subcache.errors import ConfigError, CorruptChunkError, StoreError
from test_cli import one_line_error, run
from test_distributed import torchrun

LIMIT = 64  # items per split; layer 3 of resnet18 at 32 px is 64×8×8: 1/16 MiB float16 chunks hold 8 items


def build(out, npz_path, resnet18, **kw):
    config = dict(out=str(out), layers=("3",), model="resnet18", weights="none", data=npz_path, image_size=32,
                  batch_size=16, chunk_mb=1 / 16, limit=LIMIT)
    return subcache.build_cache(subcache.BuildConfig(**{**config, **kw}), backbone=resnet18)


@pytest.fixture(scope="module")
def f16(tmp_path_factory, npz_path, resnet18):
    out = tmp_path_factory.mktemp("v2") / "f16.zarr"
    build(out, npz_path, resnet18)
    return str(out)


@pytest.fixture(scope="module")
def i8(tmp_path_factory, npz_path, resnet18):
    out = tmp_path_factory.mktemp("v2") / "i8.zarr"
    build(out, npz_path, resnet18, dtype="int8", chunk_mb=1 / 32)
    return str(out)


def copy(path, tmp_path, name="c.zarr"):
    return str(shutil.copytree(path, tmp_path / name))


def chunk_file(path, split, name, index):
    return Path(path, split, name, "c", str(index), *(["0"] * (zarr.open_array(f"{path}/{split}/{name}").ndim - 1)))


def flip_byte(file):
    data = bytearray(file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    file.write_bytes(bytes(data))


def same_arrays(a, b, names=("x", "y", "id")):
    ga, gb = zarr.open_group(a, mode="r"), zarr.open_group(b, mode="r")
    for split in ("train", "test"):
        for name in names:
            np.testing.assert_array_equal(ga[f"{split}/{name}"][:], gb[f"{split}/{name}"][:])


# -- checksums -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["auto", "none"])  # without compression only the checksum sees a flipped byte
def test_a_flipped_byte_is_named_on_read_listed_by_verify_and_recomputed_by_resume(f16, tmp_path, npz_path,
                                                                                     resnet18, codec):
    path = build(tmp_path / "c.zarr", npz_path, resnet18, codec=codec).paths[0]
    flip_byte(chunk_file(path, "train", "x", 2))
    with pytest.raises(CorruptChunkError, match=r"split train, array x, chunk 2 \(samples 16–23\).*--resume"):
        subcache.open_cache(path).read_x("train")
    r = run("verify", path, "--json")
    assert r.exit_code == 1
    assert [(b["split"], b["array"], b["chunk"]) for b in json.loads(r.stdout)["bad"]] == [("train", "x", 2)]
    r = run("verify", path)
    assert r.exit_code == 1 and "corrupt train/x chunk 2" in r.output
    one_line_error(run("train", "--cache", path, "--blocks", "none", "--epochs", 1, "--out", tmp_path / "t"),
                   "split train, array x, chunk 2")
    result = build(path, npz_path, resnet18, codec=codec, resume=True)
    assert result.images == 8  # only the damaged chunk's unit was recomputed
    same_arrays(f16, path)
    assert run("verify", path).exit_code == 0


def test_a_failed_read_decodes_only_the_chunks_it_touched(tmp_path, npz_path, resnet18, monkeypatch):
    path = build(tmp_path / "c.zarr", npz_path, resnet18).paths[0]
    x = subcache.open_cache(path).split("train").x  # 64 items in chunks of 8
    flip_byte(chunk_file(path, "train", "x", 5))
    checked, real = [], store.bad_chunk
    monkeypatch.setattr(store, "bad_chunk", lambda arr, i, *a: checked.append(i) or real(arr, i, *a))
    with pytest.raises(CorruptChunkError, match="chunk 5"):
        store.read(x, slice(30, 44))  # chunks 3, 4, 5
    assert checked == [3, 4, 5]
    checked.clear()
    with pytest.raises(CorruptChunkError, match="chunk 5"):
        store.read(x, np.array([63, 41, 2]), orthogonal=True)  # chunks 7, 5, 0
    assert checked == [0, 5]  # in order; the damaged one stops the scan
    assert store.chunks_touched(x, (slice(None), 0)) == list(range(8))
    assert store.chunks_touched(x, -1) == [7] and store.chunks_touched(x, np.arange(64) < 9) == [0, 1]


def test_format_1_stores_without_checksums_still_open(tmp_path, npz_path, resnet18, monkeypatch):
    plain = store.compressors
    monkeypatch.setattr(store, "compressors", lambda name, dtype, checksum=True: plain(name, dtype, checksum=False))
    path = str(tmp_path / "v1.zarr")
    build(path, npz_path, resnet18, splits=("test",))
    zarr.open_group(path, mode="r+").attrs.update({"format_version": 1})
    monkeypatch.undo()
    info = json.loads(run("info", path, "--json").stdout)
    assert info["checksums"] is False and info["format_version"] == 1
    assert subcache.open_cache(path).read_x("test").shape == (LIMIT, 64, 8, 8)
    assert json.loads(run("verify", path, "--json").stdout)["ok"]
    assert json.loads(run("info", copy(path, tmp_path, "again.zarr"), "--json").stdout)["checksums"] is False


@pytest.mark.parametrize("dtype, measured", [("float16", "first chunk"), ("int8", "calibration")])
def test_the_build_measures_only_the_items_its_storage_plan_needs(tmp_path, npz_path, resnet18, monkeypatch,
                                                                  dtype, measured):
    import subcache.build as build_module
    import subcache.plan as plan_module

    forwarded, real = [], build_module._forward_unit
    monkeypatch.setattr(build_module, "_forward_unit", lambda bb, layers, x, *a: forwarded.append(len(x)) or
                        real(bb, layers, x, *a))
    monkeypatch.setattr(plan_module, "CALIBRATION", 64)
    build(tmp_path / "c.zarr", npz_path, resnet18, dtype=dtype, codec="auto", limit=None, splits=("train",))
    chunk = subcache.open_cache(tmp_path / "c.zarr").split("train").chunk_len
    extra = sum(forwarded) - 192  # the training split is 192 items; anything more was measured first
    # float16: the first chunk measured is the first unit's own forward, reused (not forwarded twice); int8's
    # codes need the scales first, so its calibration items are forwarded again
    assert extra == (0 if measured == "first chunk" else max(chunk, 64))


def test_info_says_the_store_has_checksums(f16):
    info = json.loads(run("info", f16, "--json").stdout)
    assert info["checksums"] is True and info["format_version"] == 2
    assert [c["name"] for c in info["codecs"]][-1] == "crc32c"


# -- codecs --------------------------------------------------------------------------------------------------------
def test_auto_keeps_zstd_only_where_it_saves_15_percent():
    rng = np.random.default_rng(0)
    noise = rng.standard_normal((64, 256)).astype(np.float32)
    assert store.choose_codec(noise.view(np.uint8))[0] == "none"  # incompressible bytes
    codec, measured = store.choose_codec(noise.astype(np.float16))
    fast = min(measured["lz4_bytes"], measured["raw_bytes"])
    assert (codec == "zstd") == (measured["zstd_bytes"] <= 0.85 * fast)
    sparse = np.where(noise > 1.5, noise, 0).astype(np.float16)  # ReLU-like: mostly zeros
    assert store.choose_codec(sparse)[0] == "zstd"
    assert store.choose_codec(sparse, "lz4")[0] == "lz4"


@pytest.mark.parametrize("dtype, itemsize", [("float32", 4), ("float16", 2), ("int8", 1)])
def test_blosc_typesize_follows_each_arrays_dtype(tmp_path, npz_path, resnet18, dtype, itemsize):
    path = build(tmp_path / "c.zarr", npz_path, resnet18, dtype=dtype, codec="zstd", splits=("test",)).paths[0]
    s = subcache.open_cache(path).split("test")
    for arr, size in ((s.x, itemsize), (s.y, 8), (s.id, 8)):
        blosc = [c for c in arr.metadata.codecs if c.to_dict()["name"] == "blosc"]
        assert blosc[0].typesize == size
    assert s.x.attrs["codec"] == "zstd"


def test_bench_build_reports_the_codec_and_its_decode_speed(npz_path):
    from subcache.bench import BenchConfig, bench_build

    result = bench_build(BenchConfig(model="resnet18", weights="none", data=npz_path, image_size=32, limit=64,
                                     layer="3"), progress=False)
    assert result["codec"] in ("zstd", "lz4", "none") and result["decode_mb_per_s"] > 0 and result["bytes_ratio"] < 1


# -- int8 ----------------------------------------------------------------------------------------------------------
def test_int8_is_a_quarter_of_float32_and_close_to_it(i8, tmp_path, npz_path, resnet18):
    f32 = build(tmp_path / "f32.zarr", npz_path, resnet18, dtype="float32", codec="none", chunk_mb=1 / 8).paths[0]
    q, ref = subcache.open_cache(i8), subcache.open_cache(f32)
    x, want = q.read_x("train"), ref.read_x("train")
    assert x.dtype == torch.float32
    scale = q.split("train").x_scale[:]
    assert (x - want).abs().max() <= scale.max() / 2 + 1e-6  # round to nearest, nothing clipped (calibrated here)
    assert (x - want).norm() / want.norm() < 0.01
    on_disk = [sum(f.stat().st_size for f in Path(p, "train", "x").rglob("*")) for p in (i8, f32)]
    assert on_disk[0] / on_disk[1] <= 0.27
    attrs = q.split("train").x_scale.attrs
    assert attrs["axis"] == 1 and "x * x_scale" in attrs["dequantize"]
    np.testing.assert_array_equal(scale, q.split("test").x_scale[:])


def test_int8_loaders_dequantize_on_the_device(i8):
    cache = subcache.open_cache(i8)
    labels = cache.read_y("train")
    want = cache.read_x("train")
    loader = subcache.loader.DeviceLoader.from_cache(cache, "train", None, labels, 16, 0, torch.device("cpu"))
    assert loader.x.dtype == torch.int8  # codes stay resident; batches are dequantized
    x, _, y = next(iter(loader.epoch(0)))
    assert x.dtype == torch.float32
    positions = [int(torch.nonzero((want == row).flatten(1).all(1))[0]) for row in x]
    torch.testing.assert_close(labels[positions], y)
    stream = subcache.loader.StreamLoader(cache, "train", None, labels, 16, 0, torch.device("cpu"))
    assert next(iter(stream.epoch(0)))[0].dtype == torch.float32


def test_int8_resume_after_damage_is_bit_identical(i8, tmp_path, npz_path, resnet18):
    path = copy(i8, tmp_path)
    chunk_file(path, "train", "x", 1).unlink()
    flip_byte(chunk_file(path, "test", "x", 3))
    zarr.open_group(path, mode="r+").attrs.update({"status": "building"})
    build(path, npz_path, resnet18, dtype="int8", chunk_mb=1 / 32, resume=True)
    same_arrays(i8, path, names=("x", "x_scale", "y", "id"))


def test_int8_derived_cache_reads_an_int8_source(i8, tmp_path, resnet18):
    from subcache.derive import DeriveConfig, derive_cache

    out = str(tmp_path / "d.zarr")
    derive_cache(DeriveConfig(source=i8, out=out, layers=("4",), dtype="float32"), backbone=resnet18)
    src = subcache.open_cache(i8)
    with torch.no_grad():
        want = resnet18.run_blocks(src.read_x("test"), 3, 3)
    torch.testing.assert_close(subcache.open_cache(out).read_x("test"), want)


# -- self-describing -----------------------------------------------------------------------------------------------
def test_every_array_has_dimension_names_and_says_what_it_holds(i8):
    g = zarr.open_group(i8, mode="r")["train"]
    assert g["x"].metadata.dimension_names == ("sample", "channel", "height", "width")
    assert g["x_scale"].metadata.dimension_names == ("channel",)
    assert g["y"].metadata.dimension_names == ("sample",) and g["id"].metadata.dimension_names == ("sample",)
    for name in ("x", "y", "id", "x_scale"):
        assert g[name].attrs["holds"]
    assert store.dimension_names(3) == ("sample", "token", "dim") and store.channel_axis(3) == 2


def plain_zarr_read(path, split):
    """What another tool does with only zarr-python and the attrs: no subcache code on this path."""
    g = zarr.open_group(path, mode="r")[split]
    x = g["x"][:]
    if "x_scale" in g:
        axis = g["x_scale"].attrs["axis"]
        shape = [1] * x.ndim
        shape[axis] = -1
        return x.astype(np.float32) * g["x_scale"][:].reshape(shape)
    if g["x"].attrs["storage"].startswith("bfloat16"):
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x


def test_xarray_zarr_python_and_tensorstore_read_the_same_values(i8, tmp_path, npz_path, resnet18):
    import xarray as xr

    bf16 = build(tmp_path / "bf.zarr", npz_path, resnet18, dtype="bfloat16", splits=("test",)).paths[0]
    torch.testing.assert_close(torch.from_numpy(plain_zarr_read(bf16, "test")),
                               subcache.open_cache(bf16).read_x("test").float(), rtol=0, atol=0)
    mine = subcache.open_cache(i8).read_x("test").numpy()
    np.testing.assert_array_equal(plain_zarr_read(i8, "test"), mine)
    ds = xr.open_zarr(i8, group="test", consolidated=False)
    assert ds["x"].dims == ("sample", "channel", "height", "width")
    np.testing.assert_array_equal((ds["x"] * ds["x_scale"]).transpose(*ds["x"].dims).values, mine)
    # tensorstore in its own process: its thread pool does not survive a fork (mutmut forks a process per mutant)
    read = ("import sys, numpy, tensorstore; spec = {'driver': 'zarr3', 'kvstore': {'driver': 'file', 'path': "
            "sys.argv[1]}}; numpy.save(sys.argv[2], tensorstore.open(spec, read=True).result().read().result())")
    subprocess.run([sys.executable, "-c", read, f"{i8}/test/x/", tmp_path / "codes.npy"], check=True)
    np.testing.assert_array_equal(np.load(tmp_path / "codes.npy"), zarr.open_array(f"{i8}/test/x", mode="r")[:])


# -- sharding ------------------------------------------------------------------------------------------------------
def count_objects(path):
    return sum(1 for f in Path(path).rglob("*") if f.is_file() and "/c/" in str(f))  # data objects


def test_shards_are_the_unit_of_writing_and_resume(f16, tmp_path, npz_path, resnet18):
    path = build(tmp_path / "s.zarr", npz_path, resnet18, shard_mb=1 / 4).paths[0]  # 4 chunks of 8 per shard
    x = zarr.open_array(f"{path}/train/x", mode="r")
    assert x.chunks[0] == 8 and x.shards[0] == 32
    same_arrays(f16, path)
    assert count_objects(path) * 4 == count_objects(f16)  # 12 shards hold the 48 chunks
    flip_byte(chunk_file(path, "train", "x", 1))
    assert [b["chunk"] for b in json.loads(run("verify", path, "--json").stdout)["bad"]][:1] in ([4], [5], [6], [7])
    result = build(path, npz_path, resnet18, shard_mb=1 / 4, resume=True)
    assert result.images == 32  # the damaged shard, whole
    same_arrays(f16, path)


def test_ranks_never_share_a_shard(f16, tmp_path, npz_path):
    """3 ranks, 2 shards of 4 chunks: split by chunks, rank 0 and 1 would both rewrite shard 0 (last one wins)."""
    out = str(tmp_path / "c.zarr")
    done = torchrun(3, "build", "--model", "resnet18", "--weights", "none", "--image-size", 32, "--layer", 3,
                    "--batch-size", 16, "--chunk-mb", 1 / 16, "--limit", LIMIT, "--shard-mb", 1 / 4, "--data",
                    npz_path, "--out", out, "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    same_arrays(f16, out)


def test_sharded_builds_on_memory_and_s3(f16, npz_path, resnet18, s3):
    import uuid

    import boto3

    run = uuid.uuid4().hex  # the memory store outlives a test session when pytest runs twice in a process (mutmut)
    for url in (f"memory://{run}/sharded.zarr", f"{s3}/{run}/sharded.zarr"):
        build(url, npz_path, resnet18, shard_mb=1 / 4)
        cache = subcache.open_cache(url)
        np.testing.assert_array_equal(cache.split("train").x[:], zarr.open_array(f"{f16}/train/x")[:])
    build(f"{s3}/{run}/chunked.zarr", npz_path, resnet18)
    listed = {name: boto3.client("s3").list_objects_v2(Bucket="caches", Prefix=f"{run}/{name}.zarr/")["Contents"]
              for name in ("sharded", "chunked")}
    data = {name: sum("/c/" in o["Key"] for o in objects) for name, objects in listed.items()}
    assert data == {"sharded": 16, "chunked": 64}  # x, y, id, key × 2 splits; 4 chunks per shard: a quarter


def test_shard_smaller_than_a_chunk_is_refused(tmp_path, npz_path, resnet18):
    with pytest.raises(ConfigError, match="--shard-mb must be at least --chunk-mb"):
        build(tmp_path / "c.zarr", npz_path, resnet18, shard_mb=1 / 64)


# -- bad input and faults ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("damage, fragment", [
    (lambda p: (Path(p) / "zarr.json").write_text('{"zarr_format": 3, "node_t'), "is not a subcache cache"),
    (lambda p: (Path(p) / "zarr.json").write_bytes(b"\x00\xff garbage"), "is not a subcache cache"),
    (lambda p: shutil.rmtree(Path(p) / "test" / "y"), "split test has no readable array y"),
    (lambda p: (Path(p) / "train" / "x" / "zarr.json").write_text("{"), "split train has no readable array x"),
])
def test_damaged_metadata_or_a_missing_array_is_one_line(f16, tmp_path, damage, fragment):
    path = copy(f16, tmp_path)
    damage(path)
    for command in (("info", path), ("verify", path)):
        one_line_error(run(*command), fragment)


def test_an_int8_store_without_scales_is_refused(i8, tmp_path):
    path = copy(i8, tmp_path)
    shutil.rmtree(Path(path) / "train" / "x_scale")
    with pytest.raises(StoreError, match="no readable array x_scale .*int8 cache needs its scales"):
        subcache.open_cache(path)
    one_line_error(run("info", path), "x_scale")


def test_an_unknown_codec_is_one_line(tmp_path, npz_path):
    r = run("build", "--model", "resnet18", "--weights", "none", "--data", npz_path, "--layer", "3",
            "--codec", "gzip", "--out", tmp_path / "c.zarr")
    assert r.exit_code != 0 and "gzip" in r.output and not (tmp_path / "c.zarr").exists()
    with pytest.raises(ConfigError, match="unknown codec 'gzip'; allowed: auto, zstd, lz4, none"):
        build(tmp_path / "c.zarr", npz_path, None, codec="gzip")


def test_a_full_disk_leaves_the_store_building_and_resume_finishes_it(f16, tmp_path, npz_path, resnet18,
                                                                      monkeypatch):
    import zarr.storage._local as local

    real, calls = local._put, [0]

    def put(path, value, exclusive=False):  # the disk fills mid-file on a unit's last chunk (its id)
        calls[0] += "/id/c/" in str(path)
        if calls[0] == 3 and "/id/c/" in str(path):
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(value.to_bytes()[:7])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    path = str(tmp_path / "c.zarr")
    with pytest.raises(StoreError, match="no space left .*stays incomplete.*--resume"):
        build(path, npz_path, resnet18)
    monkeypatch.undo()
    assert subcache.cache_info(path)["status"] == "building"
    with pytest.raises(subcache.IncompleteStoreError):
        subcache.open_cache(path)
    build(path, npz_path, resnet18, resume=True)
    same_arrays(f16, path)


# -- real data -----------------------------------------------------------------------------------------------------
def x_bytes(path):
    return sum(f.stat().st_size for split in ("train", "test") for f in Path(path, split, "x").rglob("*"))


@pytest.mark.slow
def test_int8_cache_trains_as_well_as_float16_on_real_data(tmp_path):
    """Lite0 ImageNet weights, Fashion-MNIST 64 px, 1,000 items per split at block 16's input: the int8 cache is
    ≤ 0.27 of float32's bytes and the probe and block-16 runs land within 1 point of the float16 cache."""
    backbone = subcache.load_backbone("efficientnet_lite0", "imagenet", image_size=64)
    accuracy, sizes = {}, {}
    for dtype in ("float16", "int8"):
        out = str(tmp_path / f"{dtype}.zarr")
        subcache.build_cache(subcache.BuildConfig(out=out, layers=("16",), image_size=64, limit=1000, dtype=dtype),
                             backbone=backbone)
        sizes[dtype] = x_bytes(out)
        for blocks in ("none", "16"):
            config = subcache.TrainConfig(blocks=blocks, epochs=10, batch_size=64, lr=3e-3)
            result = subcache.train(out, config, backbone=backbone, out=str(tmp_path / f"{dtype}-{blocks}"))
            accuracy[dtype, blocks] = result.test_accuracy
    x = subcache.open_cache(str(tmp_path / "int8.zarr")).split("train").x
    float32 = 4 * int(np.prod(x.shape)) * 2  # both splits hold 1,000 items
    print(f"\nbytes vs float32: float16 {sizes['float16'] / float32:.3f}, int8 {sizes['int8'] / float32:.3f}; "
          f"accuracy {accuracy}")
    assert sizes["int8"] <= 0.27 * float32
    for blocks in ("none", "16"):
        assert abs(accuracy["int8", blocks] - accuracy["float16", blocks]) <= 0.01, accuracy
