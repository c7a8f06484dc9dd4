"""Label sets, exactly: the messages users read, which ids and classes, what is stored (each test kills mutants
that `examples/mutation.sh labels` found surviving)."""
from __future__ import annotations

import hashlib
import shutil

import numpy as np
import pytest

import subcache
import subcache.labels as labels
from subcache.errors import DataError
from subcache.labels import (add_labels, check_identity, data_identity, freeze_labels, label_classes, label_sets,
                             read_label_file, read_labels)


def _csv(tmp_path, text, name="l.csv"):
    path = tmp_path / name
    path.write_bytes(text.encode())
    return path


def _refused(call, message):
    with pytest.raises(DataError) as e:
        call()
    assert str(e.value) == message
    return e


@pytest.fixture
def store(tmp_path, resnet_cache):
    return str(shutil.copytree(resnet_cache, tmp_path / "c.zarr"))


def _ids(store, split="train"):
    return [int(i) for i in subcache.open_cache(store).split(split).id[:]]


def _label_all(store, tmp_path, name, label, split="train"):
    f = _csv(tmp_path, "id,label\n" + "".join(f"{i},{label(i)}\n" for i in _ids(store, split)), f"{name}-{split}.csv")
    return add_labels(store, name, f, split=split)


# -- read_label_file ---------------------------------------------------------------------------------------------
def test_read_label_file_messages(tmp_path):
    missing = tmp_path / "nope.csv"
    _refused(lambda: read_label_file(missing), f"label file {missing} does not exist")
    bad = _csv(tmp_path, "id,label\n1,a\nx,b\n", "bad.csv")
    _refused(lambda: read_label_file(bad), f"{bad}: every id must be an integer (the cache's `id` column)")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,label\n1,caf\u00e9\n".encode("latin-1"))
    _refused(lambda: read_label_file(latin), f"{latin} is not a UTF-8 CSV text file with columns id,label")
    long_row = _csv(tmp_path, "id,label\n1,a,extra\n", "long.csv")
    _refused(lambda: read_label_file(long_row), f"{long_row}: a row has more fields than its header; every row is "
                                                "id,label")


def test_read_label_file_header_message_shows_the_first_80_characters(tmp_path):
    names = [f"column{i:02d}" for i in range(20)]
    f = _csv(tmp_path, ",".join(names) + "\n")
    _refused(lambda: read_label_file(f), f"{f} needs a header with columns id,label (at most 64 columns); it has "
                                         f"{str(names)[:80]}")
    widest = _csv(tmp_path, "id,label," + ",".join(f"c{i}" for i in range(62)) + "\n7,a" + ",x" * 62 + "\n", "w.csv")
    ids, names = read_label_file(widest)  # 64 columns: the most allowed
    assert ids.tolist() == [7] and names == ["a"]


def test_empty_labels_are_named_by_their_row(tmp_path):
    f = _csv(tmp_path, "id,label\n1,a\n2,  \n3,b\n4,\n")
    _refused(lambda: read_label_file(f), f"{f}: row 3 has an empty label; every row needs one")
    short = _csv(tmp_path, "id,label\n1,a\n2\n", "short.csv")  # a row without its label field
    _refused(lambda: read_label_file(short), f"{short}: row 3 has an empty label; every row needs one")


def test_read_label_file_keeps_quoted_line_breaks_and_int64_ids(tmp_path):
    f = _csv(tmp_path, 'id,label\r\n5,"two\r\nlines"\r\n-2, b \r\n')
    ids, names = read_label_file(f)
    assert ids.dtype == np.int64 and ids.tolist() == [5, -2]
    assert names == ["two\r\nlines", "b"]
    empty = _csv(tmp_path, "id,label\n", "empty.csv")
    ids, names = read_label_file(empty)
    assert ids.dtype == np.int64 and ids.tolist() == [] and names == []


# -- add_labels --------------------------------------------------------------------------------------------------
def test_add_labels_names_and_summary(store, tmp_path):
    ids = _ids(store)
    f = _csv(tmp_path, "id,label\n" + "".join(f"{i},{'xy'[i % 2]}\n" for i in ids))
    assert add_labels(store, "my_set-2", f) == {"name": "my_set-2", "split": "train", "items": len(ids),
                                                "classes": ["x", "y"]}
    for bad in ("a b", "a.b", "a/b", ""):
        _refused(lambda: add_labels(store, bad, f), f"label set name {bad!r} must be letters, digits, - or _")


def test_add_labels_names_unknown_and_repeated_ids(store, tmp_path):
    ids = _ids(store)
    unknown = [10 ** 6 + k for k in range(5)]
    f = _csv(tmp_path, "id,label\n" + "".join(f"{i},a\n" for i in ids + unknown))
    _refused(lambda: add_labels(store, "s", f),
             f"{f}: 5 ids are not in split train of {store} (e.g. {unknown[:3]})")
    twice = _csv(tmp_path, "id,label\n" + "".join(f"{i},a\n" for i in ids + ids[:1]), "twice.csv")
    _refused(lambda: add_labels(store, "s", twice), f"{twice}: some ids appear more than once")
    some = _csv(tmp_path, "id,label\n" + "".join(f"{i},a\n" for i in ids[:-1]), "some.csv")
    _refused(lambda: add_labels(store, "s", some),
             f"{some} labels {len(ids) - 1} items; split train has {len(ids)}: label every item")


def test_add_labels_takes_the_writer_lock_and_waits_a_minute_for_readers(store, tmp_path, monkeypatch):
    seen = []
    real = labels.WriterLock

    def spy(path, **kw):
        seen.append((path, kw))
        return real(path, **kw)

    monkeypatch.setattr(labels, "WriterLock", spy)
    _label_all(store, tmp_path, "s", lambda i: "a")
    assert seen == [(subcache.open_cache(store).path, {"what": "writer", "wait": 60})]


def test_a_label_set_is_stored_in_split_chunks_and_verifies_when_all_zero(store, tmp_path):
    from subcache.verify import verify_cache

    _label_all(store, tmp_path, "one", lambda i: "a")  # every value 0: every chunk still written
    cache = subcache.open_cache(store)
    arr = cache.group["train/labels/one"]
    assert arr.chunks == (cache.split("train").chunk_len,) and arr.metadata.dimension_names == ("sample",)
    assert dict(arr.attrs) == {"classes": ["a"], "status": "complete"}
    report = verify_cache(store)
    assert report["ok"] and report["missing_count"] == 0, report


def test_a_label_set_killed_after_creation_stays_building(store, tmp_path, monkeypatch):
    monkeypatch.setattr(labels, "fault", lambda point: (_ for _ in ()).throw(KeyboardInterrupt(point)))
    with pytest.raises(KeyboardInterrupt, match="^labels-created$"):
        _label_all(store, tmp_path, "s", lambda i: "a")
    cache = subcache.open_cache(store)
    assert cache.group["train/labels/s"].attrs["status"] == "building"
    _refused(lambda: read_labels(cache, "train", "s"),
             f"label set 's' of {cache.path} is incomplete (`labels add` was interrupted); rerun "
             f"`subcache labels add {cache.path} --name s ...`")


def test_a_set_without_a_status_reads_as_complete(store, tmp_path):
    _label_all(store, tmp_path, "s", lambda i: "ab"[i % 2])
    import zarr

    del zarr.open_group(store, mode="r+")["train/labels/s"].attrs["status"]  # written before sets had a status
    values, count = read_labels(subcache.open_cache(store), "train", "s")
    assert count == 2 and values.tolist() == [i % 2 for i in _ids(store)]


# -- classes -----------------------------------------------------------------------------------------------------
def test_classes_sort_numbers_by_value_before_names(store, tmp_path):
    order = ["10", "9", "b", "-3", "X5", "2", "a", "01", "1"]
    summary = _label_all(store, tmp_path, "s", lambda i: order[i % len(order)])
    assert summary["classes"] == ["-3", "01", "1", "2", "9", "10", "X5", "a", "b"]


def test_another_split_extends_the_class_list_of_the_first(store, tmp_path):
    _label_all(store, tmp_path, "s", lambda i: "cb"[i % 2])
    summary = _label_all(store, tmp_path, "s", lambda i: "ab"[i % 2], split="test")
    assert summary["classes"] == ["b", "c", "a"]
    cache = subcache.open_cache(store)
    assert label_classes(cache, "test", "s") == ["b", "c", "a"]
    assert read_labels(cache, "test", "s")[0].tolist() == [[2, 0][i % 2] for i in _ids(store, "test")]


def test_label_sets_and_the_missing_set_message(store, tmp_path):
    cache = subcache.open_cache(store)
    assert label_sets(cache, "train") == []
    _refused(lambda: read_labels(cache, "train", "s"),
             f"cache {cache.path} has no label set 's' for split train; it has none (add one with "
             "`subcache labels add`)")
    _label_all(store, tmp_path, "s", lambda i: "a")
    _label_all(store, tmp_path, "r", lambda i: "a")
    assert label_sets(cache, "train") == ["r", "s"] and label_sets(cache, "test") == []
    _refused(lambda: read_labels(cache, "train", "q"),
             f"cache {cache.path} has no label set 'q' for split train; it has r, s (add one with "
             "`subcache labels add`)")
    _refused(lambda: freeze_labels(cache, "q"),
             f"cache {cache.path} has no label set 'q' for split train; it has r, s (add one with "
             "`subcache labels add`)")


def test_freeze_labels_keeps_one_snapshot_under_the_readers_lock(store, tmp_path, monkeypatch):
    _label_all(store, tmp_path, "s", lambda i: "ab"[i % 2])
    locked = []
    real = labels.reading_lock
    monkeypatch.setattr(labels, "reading_lock", lambda path: (locked.append(path), real(path))[1])
    cache = subcache.open_cache(store)
    freeze_labels(cache, "s")
    assert locked == [cache.path]
    _label_all(store, tmp_path, "s", lambda i: "cde"[i % 3])  # rewritten after the snapshot
    values, count = read_labels(cache, "train", "s")
    assert count == 2 and values.tolist() == [i % 2 for i in _ids(store)]
    assert label_classes(cache, "train", "s") == ["a", "b"]
    fresh = subcache.open_cache(store)
    assert read_labels(fresh, "train", "s")[1] == 5 and label_classes(fresh, "train", "s") == list("abcde")


# -- identity ----------------------------------------------------------------------------------------------------
def test_data_identity_hashes_exactly_the_labels_trained_on(store, tmp_path):
    cache = subcache.open_cache(store)
    plain = data_identity(cache)
    want = hashlib.sha256()
    for split in cache.splits:
        want.update(split.encode() + cache.read_y(split).numpy().tobytes())
    assert plain == {**cache.identity(), "labels": None, "labels_sha256": want.hexdigest()}
    _label_all(store, tmp_path, "s", lambda i: "ab"[i % 2])  # the train split only
    named = data_identity(cache, "s")
    values = np.array([i % 2 for i in _ids(store)], dtype=np.int64)
    want = hashlib.sha256(b"train" + values.tobytes()).hexdigest()
    assert named == {**cache.identity(), "labels": "s", "labels_sha256": want}


def test_check_identity_names_what_differs():
    now = {"path": "/c.zarr", "attrs_sha256": "A", "labels": None, "labels_sha256": "L"}
    check_identity(dict(now), now, "t")
    _refused(lambda: check_identity(None, now, "out/t"),
             "out/t holds results from another cache (unrecorded); use another --out for /c.zarr")
    _refused(lambda: check_identity({**now, "labels_sha256": "M"}, now, "t"),
             "t holds results from another labels (/c.zarr); use another --out for /c.zarr")
    _refused(lambda: check_identity({**now, "attrs_sha256": "B"}, now, "t"),
             "t holds results from another cache (/c.zarr); use another --out for /c.zarr")
    _refused(lambda: check_identity({**now, "path": "/d.zarr"}, now, "t"),
             "t holds results from another cache (/d.zarr); use another --out for /c.zarr")
    _refused(lambda: check_identity({**now, "path": "/d.zarr", "attrs_sha256": "B"}, now, "t"),
             "t holds results from another cache (/d.zarr); use another --out for /c.zarr")
    _refused(lambda: check_identity({"labels": "s"}, now, "t"),
             "t holds results from another cache (unrecorded); use another --out for /c.zarr")


def test_a_label_file_is_read_as_utf8_whatever_the_locale(tmp_path):
    """Under LC_ALL=C (no UTF-8 mode) Python's default text encoding is ASCII: names such as `café` must still
    read."""
    import os
    import subprocess
    import sys

    f = tmp_path / "l.csv"
    f.write_text("id,label\n1,caf\u00e9\n2,na\u00efve\n", encoding="utf-8")
    code = "import sys; from subcache.labels import read_label_file; print(ascii(read_label_file(sys.argv[1])[1]))"
    env = {**os.environ, "LC_ALL": "C", "PYTHONUTF8": "0", "PYTHONIOENCODING": "ascii"}
    r = subprocess.run([sys.executable, "-c", code, str(f)], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == ascii(["caf\u00e9", "na\u00efve"])
