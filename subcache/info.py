"""`info`: what a cache holds, how it is chunked and compressed, and whether it is complete."""
from __future__ import annotations

import math

import numpy as np

from .integrity import split_arrays
from .inputs import recorded
from .store import dir_bytes, has_checksums, open_cache


def cache_info(path: str) -> dict:
    """A JSON-ready summary of a cache (works on incomplete stores too: status says so)."""
    cache = open_cache(path, require_complete=False)
    splits, raw = {}, 0
    for name in cache.splits:
        s = cache.split(name)
        arrays = {a.path.split("/")[-1]: a for a in (s.x, s.x_flip, s.x_scale, s.y, s.id) if a is not None}
        splits[name] = {k: {"shape": list(a.shape), "chunks": list(a.chunks), "dtype": str(a.dtype),
                            "shards": list(a.shards) if a.shards else None, "codec": a.attrs.get("codec")}
                        for k, a in arrays.items()}
        raw += sum(math.prod(a.shape) * 4 for k, a in arrays.items() if k.startswith("x"))  # float32 equivalent
        raw += sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for k, a in arrays.items() if k in ("y", "id"))
    on_disk = dir_bytes(path)
    first = cache.split(cache.splits[0])
    codecs = [c.to_dict() for c in first.x.metadata.codecs]
    return {
        "path": path, "status": cache.status, "backbone": cache.backbone, "layer": cache.attrs["layer"],
        "dtype": cache.dtype, "preprocess": recorded(cache.attrs["preprocess"], cache.attrs["data"]),
        "data": cache.attrs["data"], "classes": len(cache.classes), "class_names": list(cache.classes),
        "build": cache.attrs.get("build"), "splits": splits, "codecs": codecs, "bytes_on_disk": on_disk,
        "format_version": cache.attrs.get("format_version", 1), "checksums": all(has_checksums(a) for s in cache.splits
                                                                      for a in split_arrays(cache.group[s]).values()),
        "bytes_float32": raw, "compression_ratio": raw / on_disk if on_disk else None,
        "versions": cache.attrs.get("versions"), "created": cache.attrs.get("created"),
    }
