"""Extra label sets on one cache (`SPLIT/labels/NAME`): the same activations serve several tasks."""
from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import zarr

from .distributed import WriterLock, reading_lock
from .errors import DataError
from .faults import fault
from .store import Cache, compressors, open_cache, read


MAX_COLUMNS = 64  # a label file is id,label (and perhaps a few more columns)


def read_label_file(path: str | Path) -> tuple[np.ndarray, list[str]]:
    """A CSV with columns ``id,label`` (header required) → (ids, label strings)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"label file {p} does not exist")
    try:
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or len(reader.fieldnames) > MAX_COLUMNS or \
                    not {"id", "label"} <= set(reader.fieldnames):
                raise DataError(f"{p} needs a header with columns id,label (at most {MAX_COLUMNS} columns); it has "
                                f"{str(reader.fieldnames)[:80]}")
            rows = [_row(r, p) for r in reader]
        ids = np.array([int(r["id"]) for r in rows], dtype=np.int64)
    except DataError:
        raise
    except (UnicodeDecodeError, csv.Error):
        raise DataError(f"{p} is not a UTF-8 CSV text file with columns id,label") from None
    except (ValueError, TypeError):
        raise DataError(f"{p}: every id must be an integer (the cache's `id` column)") from None
    labels = [str(r["label"] or "").strip() for r in rows]
    if "" in labels:
        raise DataError(f"{p}: row {labels.index('') + 2} has an empty label; every row needs one")
    return ids, labels


def _row(row: dict, p: Path) -> dict:
    """Only the id and label of a CSV row; a row longer than the header is refused (it may be huge)."""
    if row.get(None):
        raise DataError(f"{p}: a row has more fields than its header; every "
                        f"row is id,label")
    return {"id": row["id"], "label": row["label"]}


def add_labels(cache_path: str | os.PathLike, name: str, file: str | os.PathLike, split: str = "train") -> dict:
    """Attach a label set to a split; every item of the split labelled once, by its id. Returns a summary."""
    if not name.replace("_", "").replace("-", "").isalnum():
        raise DataError(f"label set name {name!r} must be letters, digits, - or _")
    cache = open_cache(cache_path)
    s = cache.split(split)
    ids, labels = read_label_file(file)
    cache_ids = read(s.id, slice(None))
    position = {int(i): p for p, i in enumerate(cache_ids)}
    unknown = [int(i) for i in ids if int(i) not in position]
    if unknown:
        raise DataError(f"{file}: {len(unknown)} ids are not in split {split} of {cache_path} (e.g. {unknown[:3]})")
    if len(set(ids.tolist())) != len(ids):
        raise DataError(f"{file}: some ids appear more than once")
    if len(ids) != len(cache_ids):
        raise DataError(f"{file} labels {len(ids)} items; split {split} has {len(cache_ids)}: label every item")
    classes = _classes(cache, name, labels)
    index = {c: i for i, c in enumerate(classes)}
    values = np.empty(len(cache_ids), dtype=np.int64)
    values[[position[int(i)] for i in ids]] = [index[label] for label in labels]
    with WriterLock(cache.path, what="writer", wait=60):  # waits for readers taking a snapshot
        _write_set(cache, split, name, values, classes, s.chunk_len)
    return {"name": name, "split": split, "items": len(values), "classes": classes}


def _write_set(cache: Cache, split: str, name: str, values: np.ndarray, classes: list[str], chunk: int) -> None:
    """Created ``status: building``, marked ``complete`` only once every value is written (a kill in between
    leaves a set `read_labels` refuses)."""
    group = zarr.open_group(cache.path, mode="r+")
    target = group.require_group(f"{split}/labels")
    arr = target.create_array(name, shape=values.shape, chunks=(chunk,), dtype=np.int64, overwrite=True,
                              compressors=compressors("zstd", np.int64), dimension_names=("sample",),
                              attributes={"classes": classes, "status": "building"},
                              config={"write_empty_chunks": True})
    fault("labels-created")
    arr[:] = values
    arr.attrs.update({"status": "complete"})


def _classes(cache: Cache, name: str, labels: list[str]) -> list[str]:
    """Class list of the label set: the one other splits already use, extended by new labels (sorted)."""
    known: list[str] = []
    for split in cache.splits:
        group = cache.group[split]
        if "labels" in group and name in group["labels"]:
            known = list(group["labels"][name].attrs["classes"])
            break
    return known + sorted(set(labels) - set(known), key=_natural)


def _natural(label: str) -> tuple:
    """Numbers by value (ties such as 1 and 01 by their text, so the order never depends on hashing), then names."""
    return (0, int(label), label) if label.lstrip("-").isdigit() else (1, 0, label)


def label_sets(cache: Cache, split: str) -> list[str]:
    group = cache.group[split]
    return sorted(group["labels"].array_keys()) if "labels" in group else []


def freeze_labels(cache: Cache, name: str) -> None:
    """Read label set ``name`` of every split (values and class names) once, under a shared lock that ``labels add``
    waits for: from then on `read_labels` and `label_classes` on this ``cache`` answer from this one snapshot, so a
    run's labels, its head and its task record agree even if the set is rewritten meanwhile."""
    with reading_lock(cache.path):
        snapshot = {split: (_read_set(cache, split, name), label_classes(cache, split, name))
                    for split in cache.splits if name in label_sets(cache, split)}
    if not snapshot:
        _read_set(cache, cache.splits[0], name)  # the usual error: no such set
    cache.__dict__.setdefault("frozen_labels", {})[name] = snapshot


def read_labels(cache: Cache, split: str, name: str) -> tuple[torch.Tensor, int]:
    """Labels of ``split`` from label set ``name`` and its number of classes (from `freeze_labels`' snapshot
    when one was taken)."""
    frozen = cache.__dict__.get("frozen_labels", {}).get(name, {})
    if split in frozen:
        return frozen[split][0], len(frozen[split][1])
    return _read_set(cache, split, name), len(label_classes(cache, split, name))


def _read_set(cache: Cache, split: str, name: str) -> torch.Tensor:
    available = label_sets(cache, split)
    if name not in available:
        raise DataError(f"cache {cache.path} has no label set {name!r} for split {split}; it has "
                        f"{', '.join(available) or 'none'} (add one with `subcache labels add`)")
    arr = cache.group[split]["labels"][name]
    if arr.attrs.get("status", "complete") != "complete":
        raise DataError(f"label set {name!r} of {cache.path} is incomplete (`labels add` was interrupted); rerun "
                        f"`subcache labels add {cache.path} --name {name} ...`")
    return torch.from_numpy(read(arr, slice(None)))


def label_classes(cache: Cache, split: str, name: str) -> list[str]:
    frozen = cache.__dict__.get("frozen_labels", {}).get(name, {})
    if split in frozen:
        return list(frozen[split][1])
    return list(cache.group[split]["labels"][name].attrs["classes"])


def data_identity(cache: Cache, name: str | None = None) -> dict:
    """What a run's saved state came from: the cache's identity (absolute path, sha256 of its attrs) and a sha256
    of the labels it trains and scores on (``y``, or label set ``name``, over every split that has them)."""
    h = hashlib.sha256()
    for split in cache.splits:
        if name is None or name in label_sets(cache, split):
            y = cache.read_y(split) if name is None else read_labels(cache, split, name)[0]
            h.update(split.encode() + y.numpy().tobytes())
    return {**cache.identity(), "labels": name, "labels_sha256": h.hexdigest()}


def check_identity(saved: dict | None, now: dict, where: str) -> None:
    """Refuse to resume saved state that came from another cache or other labels."""
    if saved != now:
        what = "labels" if saved and saved.get("path") == now["path"] and \
            saved.get("attrs_sha256") == now["attrs_sha256"] else "cache"
        raise DataError(f"{where} holds results from another {what} ({(saved or {}).get('path', 'unrecorded')}); "
                        f"use another --out for {now['path']}")
