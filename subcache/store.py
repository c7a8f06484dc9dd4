"""The cache: a Zarr v3 group of activations at the input of one block.

```
cache.zarr/  zarr.json (attrs: format, backbone, weights sha256, layer, preprocessing, dtype, versions, status)
  train/ x (N, C, H, W) or (N, T, D)   y (N,) int64   id (N,) int64   key (N,) str   [x_flip]   [labels/NAME]
  test/  ...
```
Chunks hold whole samples along N (≥ ~1 MiB each, a power of two in samples) so a chunk is the unit of resume
and of parallel writing. A store is usable only once its attrs say ``status: complete``.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zarr
from zarr.codecs import BloscCodec

from .errors import ForeignStoreError, IncompleteStoreError, StoreError, StoreExistsError
from .faults import fault

FORMAT = "subcache-cache"
FORMAT_VERSION = 1
MAX_CHUNK_SAMPLES = 16384
DTYPES = {"float16": np.float16, "float32": np.float32, "bfloat16": np.uint16}  # bfloat16 kept as its raw bits


def codec() -> BloscCodec:
    """zstd level 3 with byte shuffle: ~2.5× on float16 activations, ~90 MB/s per core (bench build)."""
    return BloscCodec(cname="zstd", clevel=3, shuffle="shuffle", typesize=2)


def chunk_length(sample_shape: tuple[int, ...], itemsize: int, num_items: int, chunk_mb: float = 1.0) -> int:
    """Samples per chunk: the power of two reaching ``chunk_mb`` MiB (≥ 1 MiB by default: big enough for fast
    codecs and object stores), no longer than needed for ``num_items``."""
    per_sample = max(1, math.prod(sample_shape) * itemsize)
    want = 1 << max(0, math.ceil(math.log2(max(1.0, chunk_mb * (1 << 20) / per_sample))))
    need = 1 << max(0, math.ceil(math.log2(max(1, num_items))))
    return min(want, need, MAX_CHUNK_SAMPLES)


def to_storage(x: torch.Tensor, dtype: str) -> np.ndarray:
    """Activations → the array stored (float16/float32 as is; bfloat16 as uint16 bits)."""
    if dtype == "bfloat16":
        return x.to(torch.bfloat16).view(torch.int16).cpu().numpy().view(np.uint16)
    return x.to(getattr(torch, dtype)).cpu().numpy()


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def read(array: zarr.Array, selection, *, orthogonal: bool = False) -> np.ndarray:
    """Read from a cache array; a chunk that fails to decode becomes one clear StoreError."""
    try:
        return array.oindex[selection] if orthogonal else array[selection]
    except Exception as exc:  # noqa: BLE001 - codecs raise many types for damaged bytes
        raise StoreError(f"cache array {array.path} in {array.store} is corrupt or unreadable "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); rebuild it "
                         f"with `subcache build ... --overwrite`") from None


@dataclass
class Split:
    """The arrays of one split."""

    name: str
    x: zarr.Array
    y: zarr.Array
    id: zarr.Array
    x_flip: zarr.Array | None
    key: zarr.Array | None = None  # where each item came from (None in caches made before keys existed)

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
            flip = _writable(g["x_flip"]) if "x_flip" in g else None
            key = g["key"] if "key" in g else None
        except KeyError as exc:
            raise StoreError(f"cache {self.path} is damaged: split {name!r} lacks {exc}; rebuild it with "
                             f"`subcache build ... --overwrite`") from None
        return Split(name, arrays["x"], arrays["y"], arrays["id"], flip, key)

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
        path = str(local_path(self.path).absolute()) if is_local(self.path) else self.path
        return {"path": path, "attrs_sha256": digest}

    def read_x(self, split: str, start: int = 0, stop: int | None = None, flip: bool = False) -> torch.Tensor:
        s = self.split(split)
        arr = s.x_flip if flip else s.x
        return from_storage(read(arr, slice(start, stop)), self.dtype)

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


def is_local(path: str) -> bool:
    return "://" not in str(path) or str(path).startswith("file://")


def local_path(path: str) -> Path:
    return Path(str(path).removeprefix("file://"))


def exists(path: str) -> bool:
    if is_local(path):
        return local_path(path).exists()
    try:
        zarr.open_group(path, mode="r")
        return True
    except (FileNotFoundError, zarr.errors.GroupNotFoundError):  # type: ignore[attr-defined]
        return False


def open_cache(path: str | os.PathLike, *, require_complete: bool = True, mode: str = "r") -> Cache:
    """Open a cache; refuse foreign stores and (unless asked) incomplete ones with a message saying how to resume."""
    path = str(path)
    if is_local(path) and not local_path(path).exists():
        raise StoreError(f"cache {path} does not exist; create it with `subcache build ... --out {path}`")
    try:
        group = zarr.open_group(path, mode=mode)
    except Exception:  # noqa: BLE001 - a missing or unreadable zarr.json means "not a cache" for the user
        raise ForeignStoreError(f"{path} is not a subcache cache (no readable Zarr group)") from None
    cache = Cache(group, path)
    if cache.attrs.get("format") != FORMAT:
        raise ForeignStoreError(f"{path} is a Zarr group but not a subcache cache (attrs have no format "
                                f"{FORMAT!r})")
    if cache.attrs.get("format_version", 0) > FORMAT_VERSION:
        raise ForeignStoreError(f"{path} has cache format {cache.attrs['format_version']}; this subcache reads "
                                f"up to {FORMAT_VERSION}: upgrade subcache")
    if require_complete and cache.status != "complete":
        raise IncompleteStoreError(f"cache {path} is incomplete (status {cache.status}): rerun the same "
                                   f"`subcache build` command with --resume to finish it")
    return cache


def create_cache(path: str, attrs: dict, layout: dict[str, tuple[int, tuple[int, ...]]], chunk_len: dict[str, int],
                 *, flip_views: bool) -> Cache:
    """Create an empty store (status ``building``): per split (N, sample shape) and samples per chunk."""
    dtype = DTYPES[attrs["dtype"]]
    group = zarr.open_group(path, mode="w", attributes={**attrs, "status": "building"})
    for split, (n, shape) in layout.items():
        g = group.create_group(split)
        fault("store-created")
        names = ("x", "x_flip") if flip_views else ("x",)
        for name in names:
            g.create_array(name, shape=(n, *shape), chunks=(chunk_len[split], *shape), dtype=dtype,
                           compressors=[codec()], fill_value=0, config={"write_empty_chunks": True})
        for name in ("y", "id"):
            g.create_array(name, shape=(n,), chunks=(chunk_len[split],), dtype=np.int64,
                           compressors=[codec()], fill_value=0, config={"write_empty_chunks": True})
        g.create_array("key", shape=(n,), chunks=(chunk_len[split],), dtype=str, fill_value="",
                       config={"write_empty_chunks": True})  # variable-length UTF-8: source path or index
    return Cache(group, path)


def written_chunks(array: zarr.Array) -> set[int]:
    """Indices (along N) of the chunks present in the store. Only renamed, whole chunk files count."""
    from zarr.core.sync import sync

    async def collect() -> set[str]:
        return {key async for key in array.store.list_prefix(f"{array.path}/c/")}

    keys = sync(collect())
    return {int(k[len(array.path) + 3:].split("/")[0]) for k in keys if not k.endswith(".partial")}


def sweep_partials(path: str) -> int:
    """Remove the `.partial` temp files a killed writer leaves behind (local stores); returns how many."""
    if not is_local(path):
        return 0
    litter = list(local_path(path).rglob("*.partial"))
    for f in litter:
        f.unlink(missing_ok=True)
    return len(litter)


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
    p = local_path(path)
    if is_local(path) and p.is_dir() and not any(p.iterdir()):
        return
    raise StoreExistsError(f"--overwrite refuses to delete {path}: it is not a subcache store (only stores and "
                           f"empty folders are ever removed); choose another --out")


def remove(path: str) -> None:
    """Remove a store (or an empty folder); refuses anything else (see `check_removable`)."""
    check_removable(path)
    if is_local(path):
        p = local_path(path)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    else:
        zarr.open_group(path, mode="w")  # fsspec stores: overwrite in place


def check_writable(path: str, *, overwrite: bool, resume: bool) -> None:
    """Refuse an existing output without --overwrite/--resume, and an output we cannot write."""
    if exists(path) and not (overwrite or resume):
        raise StoreExistsError(f"output {path} exists; pass --resume to finish an interrupted build or "
                               f"--overwrite to replace it")
    if overwrite:
        check_removable(path)
    if is_local(path):
        parent = local_path(path).absolute().parent
        while not parent.exists():
            parent = parent.parent
        if not os.access(parent, os.W_OK):
            raise StoreError(f"cannot write {path}: {parent} is not writable")


def dir_bytes(path: str) -> int:
    if not is_local(path):
        return 0
    return sum(f.stat().st_size for f in local_path(path).rglob("*") if f.is_file())
