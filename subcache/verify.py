"""`verify`: decode every stored chunk of every array of a cache and list the damaged and the missing ones."""
from __future__ import annotations

from .integrity import split_arrays
from .store import bad_chunk, has_checksums, open_cache, written_chunks

MAX_LISTED = 1000  # missing objects listed per array (all are counted)


def verify_cache(path: str) -> dict:
    """A JSON-ready report: ``ok`` is False when any chunk fails to decode (checksum or codec) or is missing.
    Covers every array (x, x_flip, x_scale, y, id, key, label sets); opening the store already checked each array's
    shape, dtype and checksum codec against the store's record. Works on incomplete stores too (missing chunks
    are then expected: see ``status``)."""
    cache = open_cache(path, require_complete=False)
    bad, missing, checked, missing_count = [], [], 0, 0
    for split in cache.splits:
        for name, arr in split_arrays(cache.group[split]).items():
            on_disk, length, n_objects = _objects(arr)
            gone = _absent(n_objects, on_disk)
            missing += [{"split": split, "array": name, "object": i} for i in gone]
            missing_count += n_objects - len(on_disk)
            per, n_chunks = length // arr.chunks[0], -(-arr.shape[0] // arr.chunks[0])
            for obj in sorted(on_disk):  # decode only what is there: a recorded shape never sizes a loop
                for i in range(obj * per, min((obj + 1) * per, n_chunks)):
                    checked += 1
                    if (why := bad_chunk(arr, i)) is not None:
                        bad.append({"split": split, "array": name, "chunk": i, "error": why})
    return {"path": path, "status": cache.status, "checksums": has_checksums(cache.split(cache.splits[0]).x),
            "chunks_checked": checked, "bad": bad, "missing": missing,
            "missing_count": missing_count, "ok": not bad and not missing}


def _objects(arr) -> tuple[set[int], int, int]:
    """(objects on disk that the array's shape covers, samples per object, objects the shape needs)."""
    length = (arr.shards or arr.chunks)[0]
    n_objects = -(-arr.shape[0] // length)
    return {i for i in written_chunks(arr) if i < n_objects}, length, n_objects


def _absent(n_objects: int, on_disk: set[int]) -> list[int]:
    """The first MAX_LISTED object indices not on disk, without building the full range."""
    out, i = [], 0
    while i < n_objects and len(out) < MAX_LISTED:
        if i not in on_disk:
            out.append(i)
        i += 1
    return out
