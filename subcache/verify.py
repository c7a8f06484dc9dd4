"""`verify`: decode every stored chunk of a cache and list the damaged and the missing ones."""
from __future__ import annotations

import zarr

from .store import bad_chunk, has_checksums, open_cache, written_chunks


def split_arrays(group: zarr.Group) -> list[zarr.Array]:
    """Every array of a split: x, x_flip, x_scale, y, id, key and each label set (``labels/NAME``)."""
    return [a for _, a in sorted(group.members(max_depth=None), key=lambda m: m[0]) if isinstance(a, zarr.Array)]


def verify_cache(path: str) -> dict:
    """A JSON-ready report: ``ok`` is False when any chunk fails to decode (checksum or codec) or is missing.
    Works on incomplete stores too (missing chunks are then expected: see ``status``)."""
    cache = open_cache(path, require_complete=False)
    bad, missing, checked = [], [], 0
    for split in cache.splits:
        for arr in split_arrays(cache.group[split]):
            name = arr.path.split("/", 1)[1]
            on_disk = written_chunks(arr)
            length = (arr.shards or arr.chunks)[0]
            missing += [{"split": split, "array": name, "object": i} for i in
                        sorted(set(range(-(-arr.shape[0] // length))) - on_disk)]
            for i in range(-(-arr.shape[0] // arr.chunks[0])):
                checked += 1
                if i * arr.chunks[0] // length in on_disk and (why := bad_chunk(arr, i)) is not None:
                    bad.append({"split": split, "array": name, "chunk": i, "error": why})
    return {"path": path, "status": cache.status, "checksums": has_checksums(cache.split(cache.splits[0]).x),
            "chunks_checked": checked, "bad": bad, "missing": missing, "ok": not bad and not missing}
