"""`verify`: decode every stored chunk of a cache and list the damaged and the missing ones."""
from __future__ import annotations

from .store import bad_chunk, has_checksums, open_cache, written_chunks


def verify_cache(path: str) -> dict:
    """A JSON-ready report: ``ok`` is False when any chunk fails to decode (checksum or codec) or is missing.
    Works on incomplete stores too (missing chunks are then expected: see ``status``)."""
    cache = open_cache(path, require_complete=False)
    bad, missing, checked = [], [], 0
    for split in cache.splits:
        s = cache.split(split)
        for arr in (a for a in (s.x, s.x_flip, s.x_scale, s.y, s.id) if a is not None):
            name = arr.path.split("/")[-1]
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
