"""The cache: a Zarr v3 group of activations at the input of one block.

```
cache.zarr/  zarr.json (attrs: format, backbone, weights sha256, layer, preprocessing, dtype, versions, status)
  train/ x (N, C, H, W) or (N, T, D)   y (N,) int64   id (N,) int64   key (N,) str   [x_flip]   [x_scale (C,) int8 only]
  test/  ...
```
Chunks hold whole samples along N (≥ ~1 MiB each, a power of two in samples). With ``--shard-mb`` whole chunks
are packed into shards (zarr's sharding codec); the write unit (a shard, else a chunk) is the unit of resume and of
parallel writing. Format 2: every chunk ends in a crc32c checksum; each array carries ``dimension_names`` and
attrs saying what it holds and how to read it; the codec (zstd, lz4 or none) is chosen per store by measuring
the first chunk. A store is usable only once its attrs say ``status: complete``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec

from .errors import (ConfigError, CorruptChunkError, ForeignStoreError, IncompleteStoreError, MissingChunkError,
                     StoreError, StoreExistsError)
from .faults import fault
from .locations import location
from .integrity import CompleteStore, check_layout, check_record, has_checksums  # noqa: F401 - has_checksums: API

FORMAT = "subcache-cache"
FORMAT_VERSION = 2  # 2: crc32c per chunk, dimension_names and per-array attrs, measured codec, int8, sharding
MAX_CHUNK_SAMPLES = 16384
# bfloat16 kept as its raw bits; int8 as symmetric per-channel codes with float32 scales in x_scale
DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16, "int8": np.int8}
CODECS = ("auto", "zstd", "lz4", "none")
ZSTD_MIN_SAVING = 0.15  # `auto` keeps zstd only where it saves this much over the fast choice on the first chunk
# what a damaged chunk raises while decoding: crc32c mismatch (ValueError), blosc (RuntimeError)
DECODE_ERRORS = (ValueError, RuntimeError)


def compressors(name: str, dtype, *, checksum: bool = True) -> list:
    """Blosc zstd-3 / lz4 (byte shuffle, typesize = the array's item size) or nothing, then crc32c."""
    if name not in CODECS[1:]:
        raise ConfigError(f"unknown codec {name!r}; allowed: {', '.join(CODECS)}")
    size = np.dtype(dtype).itemsize
    blosc = [] if name == "none" else [BloscCodec(cname=name, clevel=3 if name == "zstd" else 5,
                                                  shuffle="shuffle" if size > 1 else "noshuffle", typesize=size)]
    return blosc + ([Crc32cCodec()] if checksum else [])


def choose_codec(first_chunk: np.ndarray, asked: str = "auto") -> tuple[str, dict]:
    """``asked`` unless it is ``auto``: then zstd only where it saves ≥ 15 % over lz4 (or raw) on the first chunk,
    else lz4 where it saves anything over raw, else none. Returns (codec, the bytes measured)."""
    import numcodecs

    raw = first_chunk.nbytes
    sizes = {c: len(numcodecs.Blosc(c, clevel=3 if c == "zstd" else 5, shuffle=numcodecs.Blosc.SHUFFLE)
                    .encode(np.ascontiguousarray(first_chunk))) for c in ("zstd", "lz4")}
    measured = {"raw_bytes": raw, "zstd_bytes": sizes["zstd"], "lz4_bytes": sizes["lz4"]}
    if asked != "auto":
        return asked, measured
    fast = "lz4" if sizes["lz4"] < raw else "none"
    if sizes["zstd"] <= (1 - ZSTD_MIN_SAVING) * min(sizes["lz4"], raw):
        return "zstd", measured
    return fast, measured


def dimension_names(ndim: int) -> tuple[str, ...]:
    """Axis names other tools (xarray) read: images (N, C, H, W), tokens (N, T, D), labels/ids (N,)."""
    return {1: ("sample",), 2: ("sample", "dim"), 3: ("sample", "token", "dim"),
            4: ("sample", "channel", "height", "width")}.get(ndim, ("sample", *(f"axis{i}" for i in range(1, ndim))))


def channel_axis(ndim: int) -> int:
    """The axis int8 scales run along: channels of (N, C, H, W), the embedding dim of (N, T, D)."""
    return 1 if ndim == 4 else ndim - 1


def storage_note(dtype: str, ndim: int) -> str:
    """How another tool turns the stored values into activations."""
    return {"bfloat16": "bfloat16 stored as its raw uint16 bits: float32 = (uint32(x) << 16) viewed as float32",
            "int8": f"int8 symmetric per-channel codes: activation = float32(x) * x_scale, x_scale broadcast along "
                    f"axis {channel_axis(ndim)}"}.get(dtype, f"{dtype} values as computed (rounded to {dtype})")


def scale_like(scale: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-channel int8 scales on x's device, shaped to broadcast along x's channel axis."""
    shape = [1] * x.dim()
    shape[channel_axis(x.dim())] = -1
    return scale.to(x.device).view(shape)


def quantize_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-channel symmetric scale from per-channel max |x| (all-zero channels get scale 1)."""
    return torch.where(amax > 0, amax / 127, torch.ones_like(amax)).float()


def chunk_length(sample_shape: tuple[int, ...], itemsize: int, num_items: int, chunk_mb: float = 1.0) -> int:
    """Samples per chunk: the power of two reaching ``chunk_mb`` MiB (≥ 1 MiB by default: big enough for fast
    codecs and object stores), no longer than needed for ``num_items``."""
    per_sample = max(1, math.prod(sample_shape) * itemsize)
    want = 1 << max(0, math.ceil(math.log2(max(1.0, chunk_mb * (1 << 20) / per_sample))))
    need = 1 << max(0, math.ceil(math.log2(max(1, num_items))))
    return min(want, need, MAX_CHUNK_SAMPLES)


def to_storage(x: torch.Tensor, dtype: str, scale: torch.Tensor | None = None) -> np.ndarray:
    """Activations → the array stored (float16/float32 as is; bfloat16 as uint16 bits; int8 as codes of
    ``scale``, computed on x's device)."""
    if dtype == "int8":
        codes = torch.round(x.float() / scale_like(scale, x)).clamp_(-127, 127)
        return codes.to(torch.int8).cpu().numpy()
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def write_len(array: zarr.Array) -> int:
    """Samples per stored object along N: a shard when the array is sharded, else a chunk."""
    return (array.shards or array.chunks)[0]


def bad_chunk(array: zarr.Array, index: int, length: int | None = None) -> str | None:
    """Why chunk ``index`` (of ``length`` samples; default: a chunk) fails to decode, or None when it decodes."""
    length = length or array.chunks[0]
    try:
        array[index * length:(index + 1) * length]
    except MissingChunkError:
        return "its object is missing"
    except DECODE_ERRORS as exc:
        return (str(exc).splitlines() or [type(exc).__name__])[0]
    return None


def read(array: zarr.Array, selection, *, orthogonal: bool = False) -> np.ndarray:
    """Read from a cache array; a chunk that fails to decode becomes one CorruptChunkError naming it. Any other
    error goes on as it was raised, once the chunks the selection touches have all decoded."""
    try:
        return array.oindex[selection] if orthogonal else array[selection]
    except DECODE_ERRORS:
        for index in chunks_touched(array, selection):
            if (why := bad_chunk(array, index)) is not None:
                raise CorruptChunkError(corrupt_message(array, index, why)) from None
        raise


def chunks_touched(array: zarr.Array, selection) -> list[int]:
    """Indices of the chunks along N that a selection (a slice, an index or an index array, alone or first in a
    tuple) reads; every chunk for anything else."""
    n, length = array.shape[0], array.chunks[0]
    every = list(range(-(-n // length)))
    first = selection[0] if isinstance(selection, tuple) and selection else selection
    if isinstance(first, slice):
        rows = np.arange(n)[first]
    else:
        try:
            rows = np.asarray(first).ravel()
        except (TypeError, ValueError):
            return every
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        if not np.issubdtype(rows.dtype, np.integer):
            return every
        rows = np.where(rows < 0, rows + n, rows)
        rows = rows[(rows >= 0) & (rows < n)]
    return sorted(set((rows // length).tolist()))


def corrupt_message(array: zarr.Array, index: int, why: str) -> str:
    split, name = array.path.split("/", 1)  # a label set is train/labels/NAME: split train, array labels/NAME
    return (f"cache {array.store}: split {split}, array {name}, chunk {index} (samples "
            f"{index * array.chunks[0]}–{min(array.shape[0], (index + 1) * array.chunks[0]) - 1}) is corrupt "
            f"({why[:80]}); rerun the build with --resume to recompute it (`subcache verify` lists every bad chunk)")


@dataclass
class Split:
    """The arrays of one split."""

    name: str
    x: zarr.Array
    y: zarr.Array
    id: zarr.Array
    x_flip: zarr.Array | None
    key: zarr.Array | None = None  # where each item came from (None in caches made before keys existed)

    x_scale: zarr.Array | None = None

    def __len__(self) -> int:
        return self.x.shape[0]

    @property
    def chunk_len(self) -> int:
        return self.x.chunks[0]


class Cache:
    """An open cache store (use `open_cache`)."""

    def __init__(self, group: zarr.Group, path: str):
        self.group, self.path = group, path
        self.attrs: dict[str, Any] = dict(group.attrs)

    @property
    def status(self) -> str:
        return self.attrs.get("status", "unknown")

    @property
    def layer(self) -> int:
        return int(self.attrs["layer"]["index"])

    @property
    def layer_name(self) -> str:
        return self.attrs["layer"]["name"]

    @property
    def dtype(self) -> str:
        return self.attrs["dtype"]

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one cached sample (no batch axis): the input of block `layer`."""
        return tuple(self.attrs["sample_shape"])

    @property
    def splits(self) -> list[str]:
        return list(self.attrs["splits"])

    @property
    def classes(self) -> list[str]:
        return list(self.attrs["classes"])

    @property
    def backbone(self) -> dict:
        return dict(self.attrs["backbone"])

    def split(self, name: str) -> Split:
        if name not in self.splits:
            raise StoreError(f"cache {self.path} has no split {name!r}; it has {', '.join(self.splits)}")
        try:
            g = self.group[name]
            arrays = {k: _writable(g[k]) for k in ("x", "y", "id")}
            opt = {k: g[k] if k in g else None for k in ("x_flip", "x_scale", "key")}
        except KeyError as exc:
            raise StoreError(f"cache {self.path} is damaged: split {name!r} lacks {exc}; rebuild it with "
                             f"`subcache build ... --overwrite`") from None
        flip = None if opt["x_flip"] is None else _writable(opt["x_flip"])
        return Split(name, arrays["x"], arrays["y"], arrays["id"], flip, opt["key"], opt["x_scale"])

    def read_keys(self, split: str) -> np.ndarray:
        """Each item's source key (path under an ImageFolder root, else its index) as strings."""
        s = self.split(split)
        values = read(s.key, slice(None)) if s.key is not None else read(s.id, slice(None))
        return np.asarray([str(v) for v in values.tolist()], dtype=str)  # numpy StringDType → plain str

    def identity(self) -> dict:
        """Where this cache is and what it holds: its absolute path and a sha256 of its creation attrs (backbone,
        layer, data fingerprint, build options, creation time)."""
        fixed = {k: v for k, v in self.attrs.items() if k not in ("status", "finished")}
        digest = hashlib.sha256(json.dumps(fixed, sort_keys=True, default=str).encode()).hexdigest()
        return {"path": location(self.path).absolute(), "attrs_sha256": digest}

    def read_x(self, split: str, start: int = 0, stop: int | None = None, flip: bool = False) -> torch.Tensor:
        """Activations (float16/bfloat16/float32 as stored; int8 caches dequantized to float32)."""
        s = self.split(split)
        arr = s.x_flip if flip else s.x
        return self.decode(from_storage(read(arr, slice(start, stop)), self.dtype), split)

    def scale(self, split: str | None = None) -> torch.Tensor | None:
        """The int8 per-channel scales (float32, CPU; same in every split), None for float caches."""
        if self.dtype != "int8":
            return None
        if not hasattr(self, "_scale"):
            self._scale = torch.from_numpy(read(self.split(split or self.splits[0]).x_scale, slice(None)))
        return self._scale

    def decode(self, x: torch.Tensor, split: str | None = None) -> torch.Tensor:
        """Stored rows (on any device) → activations there: int8 codes × scales (float32); others unchanged."""
        scale = self.scale(split)
        if scale is None:
            return x
        return x.float() * scale_like(scale, x)

    def read_y(self, split: str) -> torch.Tensor:
        return torch.from_numpy(read(self.split(split).y, slice(None)).astype(np.int64))

    def check_backbone(self, identity: dict) -> None:
        """Refuse a backbone (or a task's record of one) other than the one that built this cache."""
        mine = self.backbone
        for key in ("model", "weights_sha256"):
            if identity.get(key) != mine.get(key):
                raise ForeignStoreError(f"cache {self.path} was built with {mine['model']} weights "
                                        f"{mine['weights']} (sha256 {mine['weights_sha256'][:12]}…), not "
                                        f"{identity.get('model')} weights {identity.get('weights')} "
                                        f"(sha256 {str(identity.get('weights_sha256'))[:12]}…)")


def _writable(array: zarr.Array) -> zarr.Array:
    """The array as stored, set to write every chunk, all-zero ones included: zarr 3.1 does not persist
    ``write_empty_chunks``, and resume and completeness count chunks on disk."""
    return array.with_config({"write_empty_chunks": True})


def exists(path: str) -> bool:
    return location(path).exists()


def open_cache(path: str | os.PathLike, *, require_complete: bool = True, mode: str = "r") -> Cache:
    """Open a cache; refuse foreign, damaged and (unless asked) incomplete stores with a message saying what to do."""
    path = str(path)
    if not location(path).exists():
        raise StoreError(f"cache {path} does not exist; create it with `subcache build ... --out {path}`")
    try:
        group = zarr.open_group(path, mode=mode)
    except Exception:  # noqa: BLE001 - a missing or unreadable zarr.json means "not a cache" for the user
        raise ForeignStoreError(f"{path} is not a subcache cache (no readable Zarr group: its zarr.json is missing, "
                                f"truncated or not JSON)") from None
    cache = Cache(group, path)
    if cache.attrs.get("format") != FORMAT:
        raise ForeignStoreError(f"{path} is a Zarr group but not a subcache cache (attrs have no format "
                                f"{FORMAT!r})")
    if cache.attrs.get("format_version", 0) > FORMAT_VERSION:
        raise ForeignStoreError(f"{path} has cache format {cache.attrs['format_version']}; this subcache reads "
                                f"up to {FORMAT_VERSION}: upgrade subcache")
    check_record(cache.attrs, f"cache {path}")
    if require_complete and cache.status != "complete":
        raise IncompleteStoreError(f"cache {path} is incomplete (status {cache.status}): rerun the same "
                                   f"`subcache build` command with --resume to finish it")
    if require_complete and mode == "r":  # a complete store has every chunk: a missing one is damage, not zeros
        cache = Cache(zarr.open_group(CompleteStore(group.store), mode="r"), path)
    check_arrays(cache, readers=mode == "r")
    return cache


def check_arrays(cache: Cache, readers: bool = True) -> None:
    """Every split has x, y, id (x_flip with flip views, x_scale for int8) with readable metadata, each array
    agreeing with the store's record (and, for ``readers``, checksummed: a writer makes its own arrays)."""
    wanted = ["x", "y", "id"] + ["x_flip"] * bool(cache.attrs.get("flip_views")) + ["x_scale"] * (cache.dtype == "int8")
    for split in cache.splits:
        try:
            names = set(cache.group[split].array_keys())
        except Exception:  # noqa: BLE001 - a missing or damaged group's zarr.json
            names = set()
        missing = [n for n in wanted if n not in names]
        if missing:
            why = " (an int8 cache needs its scales to be read)" if missing == ["x_scale"] else ""
            raise StoreError(f"cache {cache.path}: split {split} has no readable array {', '.join(missing)}{why}; "
                             f"the store is damaged: rebuild it with `subcache build ... --overwrite`")
    check_layout(cache, np.dtype(DTYPES.get(cache.dtype, np.float32)), checksums=readers)


@dataclass
class Layout:
    """How a store's arrays are laid out: per split (N, samples per chunk, samples per shard or None)."""

    sizes: dict[str, int]
    chunk_len: dict[str, int]
    shard_len: dict[str, int | None]
    sample_shape: tuple[int, ...]

    @property
    def unit(self) -> dict[str, int]:
        """Samples per write unit (shard, else chunk) per split: the unit of resume and of rank ownership."""
        return {s: self.shard_len[s] or c for s, c in self.chunk_len.items()}


def create_cache(path: str, attrs: dict, layout: Layout, *, flip_views: bool, codec: str = "zstd",
                 codec_measured: dict | None = None, scale: np.ndarray | None = None) -> Cache:
    """Create an empty store (status ``building``), every array with crc32c checksums, dimension names and attrs
    saying what it holds; an int8 store gets its scales (``x_scale``) now, once."""
    dtype, ndim = attrs["dtype"], 1 + len(layout.sample_shape)
    group = zarr.open_group(path, mode="w", attributes={**attrs, "status": "building", "checksums": "crc32c"})
    layer = attrs["layer"]
    for split, n in layout.sizes.items():
        g = group.create_group(split)
        clen, slen = layout.chunk_len[split], layout.shard_len[split]
        arrays = {"x": f"activations at the input of block {layer['index']} ({layer['name']})",
                  "x_flip": f"activations at the input of block {layer['index']} of the mirrored image",
                  "y": "class index into the root attrs' classes", "id": "position of the item in its source split"}
        for name, holds in arrays.items():
            if name == "x_flip" and not flip_views:
                continue
            wide = name.startswith("x")
            shape, np_dtype = ((n, *layout.sample_shape), DTYPES[dtype]) if wide else ((n,), np.int64)
            note = {"codec": codec, "codec_measured": codec_measured} if wide else {"codec": "zstd"}
            g.create_array(name, shape=shape, chunks=(clen, *shape[1:]),
                           shards=None if slen is None else (slen, *shape[1:]), dtype=np_dtype,
                           compressors=compressors(codec if wide else "zstd", np_dtype), fill_value=0,
                           dimension_names=dimension_names(len(shape)), config={"write_empty_chunks": True},
                           attributes={"holds": holds, "storage": storage_note(dtype, ndim) if wide else "int64",
                                       **note})
        g.create_array("key", shape=(n,), chunks=(clen,), shards=None if slen is None else (slen,), dtype=str,
                       compressors=compressors("zstd", np.uint8),
                       fill_value="", dimension_names=("sample",), config={"write_empty_chunks": True},
                       attributes={"holds": "where each item came from: its path under an ImageFolder root, else "
                                            "its index in the source split", "storage": "variable-length UTF-8"})
        fault("store-created")
        if scale is not None:
            _write_scale(g, scale, ndim)
    return Cache(group, path)


def _write_scale(group: zarr.Group, scale: np.ndarray, ndim: int) -> None:
    axis = channel_axis(ndim)
    arr = group.create_array("x_scale", shape=scale.shape, dtype=np.float32, compressors=[Crc32cCodec()],
                             dimension_names=(dimension_names(ndim)[axis],),
                             attributes={"holds": "float32 per-channel scales of the int8 arrays x and x_flip",
                                         "quantization": "symmetric per-channel int8, codes in [-127, 127]",
                                         "axis": axis, "dequantize": "x * x_scale (broadcast along axis)"})
    arr[:] = scale.astype(np.float32)


def written_chunks(array: zarr.Array) -> set[int]:
    """Indices (along N) of the chunks present in the store. Only renamed, whole chunk files count."""
    from zarr.core.sync import sync

    async def collect() -> set[str]:
        return {key async for key in array.store.list_prefix(f"{array.path}/c/")}

    keys = sync(collect())
    return {int(k[len(array.path) + 3:].split("/")[0]) for k in keys if not k.endswith(".partial")}


def good_chunks(array: zarr.Array) -> set[int]:
    """The written objects (shards, else chunks) that also decode: a damaged one counts as missing on resume."""
    length = write_len(array)
    return {i for i in written_chunks(array) if bad_chunk(array, i, length) is None}


def sweep_partials(path: str) -> int:
    """Remove the `.partial` temp files a killed writer leaves behind (local stores); returns how many."""
    return location(path).sweep_partials()


def is_store(path: str) -> bool:
    """Whether ``path`` is a subcache store (complete or not): a Zarr group whose attrs name our format."""
    try:
        return dict(zarr.open_group(str(path), mode="r").attrs).get("format") == FORMAT
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return False


def check_removable(path: str) -> None:
    """--overwrite may remove only a subcache store or an empty folder; anything else is refused."""
    if not exists(path) or is_store(path):
        return
    if location(path).is_empty_folder():
        return
    raise StoreExistsError(f"--overwrite refuses to delete {path}: it is not a subcache store (only stores and "
                           f"empty folders are ever removed); choose another --out")


def remove(path: str) -> None:
    """Remove a store (or an empty folder); refuses anything else (see `check_removable`)."""
    check_removable(path)
    location(path).remove()


def check_writable(path: str, *, overwrite: bool, resume: bool) -> None:
    """Refuse an existing output without --overwrite/--resume, and an output we cannot write."""
    if exists(path) and not (overwrite or resume):
        raise StoreExistsError(f"output {path} exists; pass --resume to finish an interrupted build or "
                               f"--overwrite to replace it")
    if overwrite:
        check_removable(path)
    problem = location(path).writable_problem()
    if problem:
        raise StoreError(f"cannot write {path}: {problem}")


def dir_bytes(path: str) -> int:
    return location(path).nbytes()
