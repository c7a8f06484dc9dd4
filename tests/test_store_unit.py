"""The store's pure helpers, exactly: codecs, axis names and notes, int8 scales and codes, chunk sizes, which
chunks a read touches, the corrupt-chunk message (each test kills mutants that `examples/mutation.sh store`
found surviving)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from subcache import store
from subcache.errors import ConfigError, CorruptChunkError


def test_compressors_per_codec_and_item_size():
    zstd = store.compressors("zstd", np.float16)
    assert len(zstd) == 2 and isinstance(zstd[1], Crc32cCodec)
    assert zstd[0] == BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)
    assert store.compressors("lz4", np.int8)[0] == BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle", typesize=1)
    assert store.compressors("lz4", np.float32, checksum=False) == [
        BloscCodec(cname="lz4", clevel=5, shuffle="shuffle", typesize=4)]
    none = store.compressors("none", np.float32)
    assert len(none) == 1 and isinstance(none[0], Crc32cCodec) and store.compressors("none", np.int8, checksum=False) == []
    for bad in ("auto", "gzip"):
        with pytest.raises(ConfigError) as e:
            store.compressors(bad, np.float32)
        assert str(e.value) == f"unknown codec {bad!r}; allowed: auto, zstd, lz4, none"


def test_choose_codec_measures_and_keeps_zstd_only_at_15_percent(monkeypatch):
    import numcodecs

    sizes = {}

    class Fake:
        SHUFFLE = numcodecs.Blosc.SHUFFLE

        def __init__(self, cname, clevel, shuffle):
            assert (clevel, shuffle) == ({"zstd": 3, "lz4": 5}[cname], numcodecs.Blosc.SHUFFLE)
            self.cname = cname

        def encode(self, a):
            assert a.flags.c_contiguous
            return b"x" * sizes[self.cname]

    monkeypatch.setattr(numcodecs, "Blosc", Fake)
    chunk = np.zeros((10, 10), np.float32)[:, ::2]  # 200 bytes, not contiguous
    for zstd, lz4, want in [(85, 100, "zstd"), (86, 100, "lz4"), (169, 199, "zstd"), (170, 199, "lz4"),
                            (170, 200, "zstd"), (171, 200, "none"),
                            (170, 250, "zstd"), (171, 250, "none"), (100, 199, "zstd")]:
        sizes.update(zstd=zstd, lz4=lz4)
        assert store.choose_codec(chunk) == (want, {"raw_bytes": 200, "zstd_bytes": zstd, "lz4_bytes": lz4})
    assert store.choose_codec(chunk, "none")[0] == "none"


def test_dimension_names_channel_axis_and_storage_notes():
    assert [store.dimension_names(n) for n in (1, 2, 3, 4)] == [
        ("sample",), ("sample", "dim"), ("sample", "token", "dim"), ("sample", "channel", "height", "width")]
    assert store.dimension_names(5) == ("sample", "axis1", "axis2", "axis3", "axis4")
    assert [store.channel_axis(n) for n in (2, 3, 4, 5)] == [1, 2, 1, 4]
    assert store.storage_note("bfloat16", 4) == ("bfloat16 stored as its raw uint16 bits: float32 = (uint32(x) << 16) "
                                                 "viewed as float32")
    assert store.storage_note("int8", 3) == ("int8 symmetric per-channel codes: activation = float32(x) * x_scale, "
                                             "x_scale broadcast along axis 2")
    assert store.storage_note("float16", 4) == "float16 values as computed (rounded to float16)"


def test_int8_scales_codes_and_the_round_trip():
    amax = torch.tensor([254.0, 0.0, 1.27], dtype=torch.float64)
    assert store.quantize_scale(amax).tolist() == pytest.approx([2.0, 1.0, 0.01]) and \
        store.quantize_scale(amax).dtype == torch.float32
    x = torch.tensor([[[[1.0, -3.0]], [[0.4, 0.6]]]])  # (1, 2, 1, 2): channel 0 scale 2, channel 1 scale 0.5
    scale = torch.tensor([2.0, 0.5])
    assert store.scale_like(scale, x).shape == (1, 2, 1, 1)
    assert store.scale_like(scale, torch.zeros(1, 5, 2)).shape == (1, 1, 2)
    codes = store.to_storage(x, "int8", scale)
    assert codes.dtype == np.int8 and codes.tolist() == [[[[0, -2]], [[1, 1]]]]  # round half to even
    big = store.to_storage(torch.tensor([[[[1000.0]]], [[[-1000.0]]]]), "int8", torch.tensor([1.0]))
    assert big.ravel().tolist() == [127, -127]


def test_bfloat16_and_float_storage():
    x = torch.tensor([1.0, -2.5, 3.140625])
    bits = store.to_storage(x, "bfloat16")
    assert bits.dtype == np.uint16 and bits.tolist() == [0x3F80, 0xC020, 0x4049]
    back = store.from_storage(bits, "bfloat16")
    assert back.dtype == torch.bfloat16 and back.float().tolist() == [1.0, -2.5, 3.140625]
    half = store.to_storage(x, "float16")
    assert half.dtype == np.float16 and store.from_storage(half, "float16").dtype == torch.float16
    strided = np.arange(6, dtype=np.float32)[::2]
    assert store.from_storage(strided, "float32").tolist() == [0.0, 2.0, 4.0]


def test_chunk_length_is_a_power_of_two_reaching_the_target_within_need():
    assert store.chunk_length((256, 4, 4), 4, 100_000) == 64  # 16 KiB a sample: 1 MiB = 64 samples
    assert store.chunk_length((256, 4, 4), 4, 100_000, chunk_mb=0.5) == 32
    assert store.chunk_length((250, 4, 4), 4, 100_000) == 128  # 15.6 KiB: 64 samples fall short of 1 MiB
    assert store.chunk_length((256, 4, 4), 4, 40) == 64 and store.chunk_length((256, 4, 4), 4, 33) == 64
    assert store.chunk_length((256, 4, 4), 4, 32) == 32 and store.chunk_length((256, 4, 4), 4, 1) == 1
    assert store.chunk_length((2,), 1, 10 ** 6) == store.MAX_CHUNK_SAMPLES == 16384
    assert store.chunk_length((), 1, 5, chunk_mb=0) == 1 and store.chunk_length((64, 64, 64), 4, 5) == 1


@pytest.fixture
def array(tmp_path):
    arr = zarr.create_array(str(tmp_path / "c.zarr"), name="train/x", shape=(50, 3), chunks=(8, 3), dtype="float32",
                            compressors=store.compressors("none", np.float32))
    arr[:] = np.arange(150, dtype=np.float32).reshape(50, 3)
    return arr


def test_chunks_touched_by_each_kind_of_selection(array):
    assert store.chunks_touched(array, slice(None)) == list(range(7))
    assert store.chunks_touched(array, slice(8, 17)) == [1, 2] and store.chunks_touched(array, slice(8, 16)) == [1]
    assert store.chunks_touched(array, (slice(40, None), 1)) == [5, 6]
    assert store.chunks_touched(array, 9) == [1] and store.chunks_touched(array, -1) == [6]
    assert store.chunks_touched(array, np.array([49, 0, 0, 17])) == [0, 2, 6]
    assert store.chunks_touched(array, np.array([-50, 50, 99])) == [0]  # out of range rows read nothing
    assert store.chunks_touched(array, np.arange(50) == 24) == [3]
    assert store.chunks_touched(array, ()) == list(range(7))
    assert store.chunks_touched(array, np.array([0.5])) == list(range(7))
    assert store.chunks_touched(array, [[1, 2], [3]]) == list(range(7))  # ragged: not an index array


def test_a_corrupt_chunk_is_named_with_its_samples(array, tmp_path):
    assert store.write_len(array) == 8
    assert store.bad_chunk(array, 6) is None
    (tmp_path / "c.zarr" / "train" / "x" / "c" / "2" / "0").write_bytes(b"garbage")
    why = store.bad_chunk(array, 2)
    assert why is not None and store.bad_chunk(array, 1) is None
    message = store.corrupt_message(array, 6, "x" * 100)
    assert message == (f"cache {array.store}: split train, array x, chunk 6 (samples 48–49) is corrupt ({'x' * 80}); "
                       "rerun the build with --resume to recompute it (`subcache verify` lists every bad chunk)")
    assert store.read(array, slice(0, 16)).tolist() == np.arange(48).reshape(16, 3).tolist()
    assert store.read(array, np.array([1, 40]), orthogonal=True)[:, 0].tolist() == [3, 120]
    with pytest.raises(CorruptChunkError) as e:
        store.read(array, slice(10, 30))
    assert str(e.value) == store.corrupt_message(array, 2, why)
    (tmp_path / "c.zarr" / "train" / "x" / "c" / "3" / "0").unlink()
    with pytest.raises(CorruptChunkError):
        store.read(array, np.array([20, 30]), orthogonal=True)


def test_why_a_chunk_fails_is_its_error_s_first_line_or_its_missing_object(array, tmp_path):
    chunk = tmp_path / "c.zarr" / "train" / "x" / "c" / "2" / "0"
    chunk.write_bytes(b"garbage")
    try:
        array[16:24]
    except store.DECODE_ERRORS as exc:
        first_line = str(exc).splitlines()[0]
    assert store.bad_chunk(array, 2) == first_line and first_line not in ("ValueError", "RuntimeError", "None")

    class Silent:  # a decoder error without a message is named by its type
        chunks = (8,)

        def __getitem__(self, selection):
            raise RuntimeError()

    assert store.bad_chunk(Silent(), 0) == "RuntimeError"


def test_a_missing_object_and_a_label_set_s_chunk_are_named(int8_store, tmp_path):
    import shutil

    import subcache

    out = shutil.copytree(int8_store, tmp_path / "c.zarr")
    cache = subcache.open_cache(out)
    (out / "train" / "x" / "c" / "1" / "0" / "0" / "0").unlink()
    assert store.bad_chunk(cache.split("train").x, 1) == "its object is missing"
    labels = cache.group["train"]["labels"]["parity"]
    assert store.corrupt_message(labels, 0, "why").startswith(
        f"cache {labels.store}: split train, array labels/parity, chunk 0 (samples 0–")


def test_the_int8_scales_array_says_what_it_holds_and_how_to_read_it(int8_store):
    import subcache

    scale = subcache.open_cache(int8_store).split("train").x_scale
    assert scale.metadata.dimension_names == ("channel",) and scale.dtype == np.float32
    assert dict(scale.attrs) == {"holds": "float32 per-channel scales of the int8 arrays x and x_flip",
                                 "quantization": "symmetric per-channel int8, codes in [-127, 127]",
                                 "axis": 1, "dequantize": "x * x_scale (broadcast along axis)"}


def test_keys_are_the_source_keys_as_strings_else_the_ids(int8_store, tmp_path):
    import shutil

    import subcache

    cache = subcache.open_cache(int8_store)
    ids = cache.split("train").id[:]
    keys = cache.read_keys("train")
    assert keys.dtype.kind == "U" and keys.tolist() == [str(k) for k in cache.split("train").key[:].tolist()]
    renumbered = shutil.copytree(int8_store, tmp_path / "c.zarr")
    zarr.open_array(str(renumbered / "train" / "key"), mode="r+")[:] = np.asarray([f"img{i}.jpg" for i in ids])
    assert subcache.open_cache(renumbered).read_keys("train").tolist() == [f"img{i}.jpg" for i in ids]
    shutil.rmtree(renumbered / "train" / "key")  # a cache made before keys existed: each item's index
    old = subcache.open_cache(renumbered)
    assert old.split("train").key is None and old.read_keys("train").tolist() == [str(i) for i in ids]


def test_identity_is_the_attrs_digest_without_status_in_any_key_order(int8_store, tmp_path):
    import hashlib
    import json
    import shutil

    import subcache

    cache = subcache.open_cache(int8_store)
    fixed = {k: v for k, v in cache.attrs.items() if k not in ("status", "finished")}
    assert "finished" in cache.attrs and cache.identity() == {
        "path": str(int8_store.absolute()),
        "attrs_sha256": hashlib.sha256(json.dumps(fixed, sort_keys=True).encode()).hexdigest()}
    copy = shutil.copytree(int8_store, tmp_path / "c.zarr")
    group = zarr.open_group(str(copy), mode="r+")
    reordered = dict(reversed(list(group.attrs.items())))
    group.attrs.clear()
    group.attrs.update({**reordered, "finished": "another time", "status": "complete"})
    again = subcache.open_cache(copy)
    assert list(again.attrs) != list(cache.attrs)
    assert again.identity()["attrs_sha256"] == cache.identity()["attrs_sha256"]
    group.attrs.update({"layer": {**cache.attrs["layer"], "index": 99}})
    assert subcache.open_cache(copy).identity()["attrs_sha256"] != cache.identity()["attrs_sha256"]


def test_a_foreign_backbone_is_refused_naming_both(int8_store):
    import subcache
    from subcache.errors import ForeignStoreError

    cache = subcache.open_cache(int8_store)
    mine = cache.backbone
    cache.check_backbone(dict(mine))
    for other in ({**mine, "model": "resnet50"}, {**mine, "weights_sha256": "f" * 64, "weights": "mine.pt"}):
        with pytest.raises(ForeignStoreError) as e:
            cache.check_backbone(other)
        assert str(e.value) == (f"cache {cache.path} was built with resnet18 weights {mine['weights']} (sha256 "
                                f"{mine['weights_sha256'][:12]}…), not {other['model']} weights {other['weights']} "
                                f"(sha256 {other['weights_sha256'][:12]}…)")
    with pytest.raises(ForeignStoreError, match=r"not None weights None \(sha256 None…\)"):
        cache.check_backbone({})


def test_sweep_and_remove_touch_only_what_they_should(int8_store, tmp_path):
    import shutil

    from subcache.errors import StoreExistsError

    out = shutil.copytree(int8_store, tmp_path / "c.zarr")
    litter = [out / "train" / "x" / "c" / "0.partial", out / "test" / "y" / "c" / "1.partial"]
    for f in litter:
        f.write_bytes(b"half")
    assert store.sweep_partials(str(out)) == 2 and not any(f.exists() for f in litter)
    assert store.dir_bytes(str(out)) == sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) > 0
    assert store.is_store(str(out))
    other = tmp_path / "photos"
    other.mkdir()
    (other / "a.jpg").write_bytes(b"jpeg")
    with pytest.raises(StoreExistsError, match="refuses to delete"):
        store.remove(str(other))
    assert (other / "a.jpg").exists()
    store.remove(str(out))
    assert not out.exists()


def test_every_array_says_what_it_holds_and_reads_by_range_and_view(tmp_path, npz_path, resnet18):
    import subcache

    out = tmp_path / "flip.zarr"
    subcache.build_cache(subcache.BuildConfig(out=str(out), layers=("3",), model="resnet18", weights="none",
                                              data=npz_path, image_size=32, limit=8, splits=("train",),
                                              flip_views=True), backbone=resnet18, progress=False)
    cache = subcache.open_cache(out)
    s = cache.split("train")
    assert cache.attrs["checksums"] == "crc32c"
    assert dict(s.y.attrs) == {"holds": "class index into the root attrs' classes", "storage": "int64",
                               "codec": "zstd"}
    assert dict(s.id.attrs) == {"holds": "position of the item in its source split", "storage": "int64",
                                "codec": "zstd"}
    assert dict(s.key.attrs) == {"holds": "where each item came from: its path under an ImageFolder root, else its "
                                          "index in the source split", "storage": "variable-length UTF-8"}
    for name, holds in (("x", "activations at the input of block 3 (layer2.0)"),
                        ("x_flip", "activations at the input of block 3 of the mirrored image")):
        attrs = dict(getattr(s, name).attrs)
        assert attrs["holds"] == holds and attrs["storage"] == "float16 values as computed (rounded to float16)"
        assert attrs["codec"] in ("zstd", "lz4", "none") and set(attrs["codec_measured"]) == {
            "raw_bytes", "zstd_bytes", "lz4_bytes"}
    x, mirrored = torch.from_numpy(s.x[:]), torch.from_numpy(s.x_flip[:])
    assert not torch.equal(x, mirrored)
    assert torch.equal(cache.read_x("train", 2, 5), x[2:5]) and torch.equal(cache.read_x("train", flip=True), mirrored)
    assert torch.equal(cache.read_x("train", 5), x[5:])
