"""What a complete store must be, checked whenever one is opened: every chunk there (a missing object raises like a
corrupt one instead of reading as zeros), every array checksummed, every array's shape and dtype agreeing with the
store's own record (``sample_shape``, ``dtype``, the length of ``x``), and sizes sane before anything is allocated."""
from __future__ import annotations

import math

import numpy as np
from zarr.storage import WrapperStore

from .errors import MissingChunkError, StoreError

MAX_SAMPLE_VALUES = 1 << 28  # values in one cached sample (1 GiB as float32): far above any backbone's activations
MAX_ITEMS = 1 << 34  # items in one split


class CompleteStore(WrapperStore):
    """The store of a complete cache, for reading: a chunk (or shard) object that is missing raises instead of
    reading as zeros, so a hole is reported like a corrupt chunk."""

    async def get(self, key: str, prototype, byte_range=None):
        value = await self._store.get(key, prototype, byte_range)
        if value is None and _is_chunk_key(key):
            raise MissingChunkError(_missing(key, self._store))
        return value

    async def get_partial_values(self, prototype, key_ranges):
        key_ranges = list(key_ranges)
        values = await self._store.get_partial_values(prototype, key_ranges)
        for (key, _), value in zip(key_ranges, values):
            if value is None and _is_chunk_key(key):
                raise MissingChunkError(_missing(key, self._store))
        return values

    def __str__(self) -> str:
        return str(self._store)


def _is_chunk_key(key: str) -> bool:
    return "/c/" in f"/{key}" and not key.endswith("zarr.json")


def _missing(key: str, store) -> str:
    return (f"chunk object {key} of cache {store} is missing; rerun the build with --resume to recompute it "
            f"(`subcache verify` lists every missing chunk)")


def codec_names(codecs) -> list[str]:
    """Names of an array's codecs, those nested in a sharding codec included."""
    out = []
    for c in codecs:
        d = c if isinstance(c, dict) else c.to_dict()
        out += [d["name"], *codec_names(d.get("configuration", {}).get("codecs", []))]
    return out


def has_checksums(array) -> bool:
    """Whether every chunk of ``array`` carries a crc32c (format 2; format 1 stores have none)."""
    return "crc32c" in codec_names(array.metadata.codecs)


def check_sample_shape(shape, where: str) -> tuple[int, ...]:
    """A recorded sample shape: 1 to 3 positive integers, at most MAX_SAMPLE_VALUES values in all."""
    if not isinstance(shape, (list, tuple)) or not 1 <= len(shape) <= 3 or \
            not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape) or \
            math.prod(shape) > MAX_SAMPLE_VALUES:
        raise StoreError(f"{where}: sample_shape {str(shape)[:60]} is not 1 to 3 positive sizes of at most "
                         f"{MAX_SAMPLE_VALUES} values in all; the record is damaged")
    return tuple(shape)


def split_arrays(group) -> dict:
    """Every array of one split group by name: x, y, id, key, x_flip, x_scale, and labels/NAME."""
    arrays = dict(group.arrays())
    if "labels" in group:
        arrays.update({f"labels/{k}": a for k, a in group["labels"].arrays()})
    return arrays


def check_layout(cache, x_dtype: np.dtype, checksums: bool = True) -> None:
    """Each array of each split against the store's record: shapes, dtypes, and (format 2, ``checksums``) a crc32c
    codec."""
    shape = check_sample_shape(cache.attrs.get("sample_shape"), f"cache {cache.path}")
    checksummed = checksums and cache.attrs.get("format_version", 1) >= 2
    for split in cache.splits:
        arrays = split_arrays(cache.group[split])
        n = arrays["x"].shape[0]
        if n > MAX_ITEMS:
            raise StoreError(f"cache {cache.path}: split {split}, array x records {n} items, more than the {MAX_ITEMS} "
                             f"a split may hold; the store is damaged: rebuild it with `subcache build ... --overwrite`")
        for name, arr in arrays.items():
            want = _expected(name, n, shape, x_dtype)
            why = _disagrees(arr, want, checksummed)
            if why:
                raise StoreError(f"cache {cache.path}: split {split}, array {name} {why}; the store is damaged: "
                                 f"rebuild it with `subcache build ... --overwrite`")


def _expected(name: str, n: int, shape: tuple[int, ...], x_dtype: np.dtype) -> tuple[tuple, object]:
    if name in ("x", "x_flip"):
        return (n, *shape), x_dtype
    if name == "x_scale":
        return (shape[0] if len(shape) == 3 else shape[-1],), np.dtype(np.float32)
    return (n,), (None if name == "key" else np.dtype(np.int64))


def _disagrees(arr, want: tuple[tuple, object], checksummed: bool) -> str | None:
    shape, dtype = want
    if tuple(arr.shape) != shape:
        return f"has shape {tuple(arr.shape)}, the store's record says {shape}"
    if dtype is not None and np.dtype(arr.dtype) != dtype:
        return f"has dtype {arr.dtype}, the store's record says {dtype}"
    if checksummed and not has_checksums(arr):
        return "has no crc32c checksum (every array of a format-2 store has one)"
    return None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _strings(v) -> bool:
    return isinstance(v, list) and all(isinstance(s, str) for s in v)


RECORD = {  # what every part of a cache's record must be before anything reads it
    "backbone": lambda b: isinstance(b, dict) and all(isinstance(b.get(k), str) for k in ("model", "weights_sha256")),
    "layer": lambda v: isinstance(v, dict) and _is_int(v.get("index")) and v["index"] >= 1 and
    isinstance(v.get("name"), str),
    "dtype": lambda v: isinstance(v, str),
    "splits": lambda v: _strings(v) and 0 < len(v) <= 64,
    "classes": lambda v: _strings(v) and len(v) <= MAX_CLASSES,
}
MAX_CLASSES = 1_000_000


def check_record(attrs: dict, where: str) -> None:
    """The store's record (its root attrs) has every part subcache reads, of the right kind: one line if not."""
    bad = [k for k, ok in RECORD.items() if not ok(attrs.get(k))]
    if bad:
        raise StoreError(f"{where}: its record's {', '.join(bad)} {'is' if len(bad) == 1 else 'are'} missing or "
                         f"malformed; the store is damaged: rebuild it with `subcache build ... --overwrite`")
