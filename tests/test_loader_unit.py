"""Loaders, exactly: which rows each epoch yields, with which labels, in how many batches; the staging ring's
buffer reuse (each test kills mutants that `examples/mutation.sh loader` found surviving)."""
from __future__ import annotations

import contextlib
import os
import queue
import threading
from types import SimpleNamespace

import numpy as np
import zarr
import zarr.storage
import pytest
import torch

from subcache.loader import (DeviceLoader, Stager, StreamLoader, _join, _put, _unchanged, batch_order, bridge,
                             epoch_generator, read_rows, split_nbytes)

CPU = torch.device("cpu")


def test_epoch_generator_and_batch_order():
    g = epoch_generator(3, 2)
    assert torch.equal(torch.rand(4, generator=g), torch.rand(4, generator=torch.Generator().manual_seed(3_000_011)))
    perm = torch.randperm(11, generator=torch.Generator().manual_seed(7 * 1_000_003 + 1))
    got = batch_order(11, 5, 7, 1)
    assert [b.tolist() for b in got] == [perm[:5].tolist(), perm[5:10].tolist()]  # a lone last sample is dropped
    assert [len(b) for b in batch_order(12, 5, 7, 1)] == [5, 5, 2]
    assert [len(b) for b in batch_order(6, 5, 7, 1)] == [5]  # a lone last sample after a single batch too
    assert [len(b) for b in batch_order(1, 5, 0, 0)] == [1] and [len(b) for b in batch_order(5, 5, 0, 0)] == [5]
    assert batch_order(11, 5, 7, 2)[0].tolist() != got[0].tolist()


def test_bridge_is_the_frozen_part_unless_bridged():
    model = SimpleNamespace(frozen_part=lambda x: x + 1)
    assert bridge(SimpleNamespace(bridged=True), model) is _unchanged and _unchanged(5) == 5
    assert bridge(SimpleNamespace(bridged=False), model) is model.frozen_part


def test_split_nbytes_and_read_rows(chunked_cache):
    s = chunked_cache.split("train")
    per = int(np.prod(s.x.shape[1:])) * 4
    assert split_nbytes(chunked_cache, "train", 10) == 10 * per
    x = chunked_cache.read_x("train")
    assert torch.equal(read_rows(chunked_cache, "train", None), x)
    assert torch.equal(read_rows(chunked_cache, "train", np.array([3, 40, 41])), x[[3, 40, 41]])


def test_device_loader_yields_its_rows_and_labels_in_the_seeded_order(chunked_cache):
    rows = np.array([5, 0, 17, 33, 34, 100, 101, 150, 2])
    labels = torch.arange(len(rows)) * 10
    loader = DeviceLoader.from_cache(chunked_cache, "train", rows, labels, 4, seed=3, device=CPU)
    x = chunked_cache.read_x("train")[torch.from_numpy(rows)]
    assert loader.num_samples == 9 and loader.steps_per_epoch == 2 and not loader.bridged
    for epoch in (0, 1):
        batches = list(loader.epoch(epoch))
        order = batch_order(9, 4, 3, epoch)
        assert len(batches) == 2
        for (bx, bf, by), idx in zip(batches, order):
            assert torch.equal(bx, x[idx]) and bf is None and torch.equal(by, labels[idx])
    decoded = DeviceLoader(x, labels, 4, 3, x_flip=-x, decode=lambda t: t * 2, bridged=True)
    bx, bf, _ = next(decoded.epoch(0))
    idx = batch_order(9, 4, 3, 0)[0]
    assert decoded.bridged and torch.equal(bx, x[idx] * 2) and torch.equal(bf, -x[idx] * 2)


@pytest.mark.parametrize("rows,batch,window", [(None, 16, 3), (np.arange(3, 190, 2), 10, 2), (np.array([1, 2, 40]), 2, 8)])
def test_stream_loader_yields_every_kept_row_once_with_its_label(chunked_cache, rows, batch, window):
    n = len(chunked_cache.split("train"))
    positions = np.arange(n) if rows is None else rows
    labels = torch.from_numpy(positions * 7)
    x = chunked_cache.read_x("train")
    loader = StreamLoader(chunked_cache, "train", rows, labels, batch, seed=1, device=CPU, window=window, depth=2,
                          staging=True)
    assert loader.num_samples == len(positions) and not loader.bridged
    for epoch in (0, 1):
        seen = []
        batches = list(loader.epoch(epoch))
        for bx, bf, by in batches:
            assert bf is None and 2 <= len(by) <= batch
            pos = (by // 7).numpy()
            assert torch.equal(bx, x[torch.from_numpy(pos)])
            seen += pos.tolist()
        assert len(batches) == loader.steps_per_epoch
        lone = len(positions) % batch == 1
        assert sorted(seen) == sorted(positions.tolist()) or (lone and len(seen) == len(positions) - 1)
        assert len(set(seen)) == len(seen)
    assert [len(b[2]) for b in loader.epoch(0)][:-1] == [batch] * (loader.steps_per_epoch - 1)


def test_stream_loader_chunks_and_orders(chunked_cache):
    rows = np.array([0, 1, 20, 47, 48])
    loader = StreamLoader(chunked_cache, "train", rows, torch.arange(5), 2, seed=4, device=CPU)
    assert [(a, b, keep.tolist()) for a, b, keep in loader.chunks] == [(0, 16, [0, 1]), (16, 32, [4]),
                                                                     (32, 48, [15]), (48, 64, [0])]
    assert loader.labels[[0, 1, 20, 47, 48]].tolist() == [0, 1, 2, 3, 4] and loader.labels[2].item() == -1
    assert loader.reading == 1 and loader.max_readers == min(8, os.cpu_count())  # grows up to the CPU count
    assert loader.steps_per_epoch == 2
    assert StreamLoader(chunked_cache, "train", rows[:4], torch.arange(4), 2, 4, CPU).steps_per_epoch == 2
    assert StreamLoader(chunked_cache, "train", rows[:3], torch.arange(3), 2, 4, CPU).steps_per_epoch == 1


def test_stream_loader_reads_flip_views_and_passes_reader_errors(chunked_cache, monkeypatch):
    loader = StreamLoader(chunked_cache, "train", None, torch.zeros(192, dtype=torch.long), 32, 0, CPU,
                          flip_views=True)
    broken = SimpleNamespace(x=chunked_cache.split("train").x, x_flip=None)
    monkeypatch.setattr(loader.cache, "split", lambda name: broken)
    with pytest.raises(Exception):
        list(loader.epoch(0))


def test_stager_reuses_its_ring_of_buffers_and_grows_with_headroom():
    stager = Stager(CPU, slots=2, staging=True)
    assert stager.staging and not stager.pin and stager.backend is torch.cpu and stager.stream is not None
    t = torch.arange(10, dtype=torch.float32)
    out, event = stager.upload(t)
    assert torch.equal(out, t) and event is not None and out.data_ptr() != t.data_ptr()
    assert stager.buffers[0].numel() == 40 + 10 and stager.allocations == 1 and stager.slot == 1
    stager.upload(t.clone())
    stager.upload(torch.arange(12, dtype=torch.float32))  # slot 0 again: 48 bytes fit in 50
    assert stager.allocations == 2 and stager.slot == 1
    stager.upload(torch.arange(14, dtype=torch.float32))  # slot 1: 56 > 50 bytes, grows
    assert stager.allocations == 3 and stager.buffers[1].numel() == 56 + 14
    assert stager.ready(out, None) is out and stager.ready(out, event) is out
    plain = Stager(CPU)
    assert not plain.staging and plain.stream is None and plain.upload(t) == (t, None)


def test_put_stops_when_asked_and_join_concatenates_fields():
    q = queue.Queue(maxsize=1)
    stop = threading.Event()
    assert _put(q, 1, stop) and q.get() == 1
    q.put(0)
    threading.Timer(0.2, stop.set).start()
    assert not _put(q, 2, stop)  # full until stopped
    assert not _put(queue.Queue(), 3, stop)
    a, b = [torch.ones(2), None, torch.zeros(2)], [torch.ones(1) * 2, None, torch.ones(1)]
    x, xf, y = _join([a, b])
    assert x.tolist() == [1, 1, 2] and xf is None and y.tolist() == [0, 0, 1]
    x, xf, y = _join([b])  # a window of one chunk (the epoch's last)
    assert x.tolist() == [2] and xf is None and y.tolist() == [1]


def test_stager_slots_go_round_in_order_and_an_exact_fit_is_reused():
    stager = Stager(CPU, slots=3, staging=True)
    slots = []
    for _ in range(4):
        stager.upload(torch.zeros(40, dtype=torch.uint8))
        slots.append(stager.slot)
    assert slots == [1, 2, 0, 1] and stager.allocations == 3
    stager = Stager(CPU, slots=1, staging=True)
    stager.upload(torch.zeros(40, dtype=torch.uint8))  # a 50-byte buffer
    stager.upload(torch.zeros(50, dtype=torch.uint8))
    assert stager.allocations == 1 and stager.buffers[0].numel() == 50


def test_an_upload_never_aliases_the_buffer_it_is_staged_through():
    stager = Stager(CPU, slots=1, staging=True)
    first, _ = stager.upload(torch.ones(8))
    stager.upload(torch.zeros(8))  # the same buffer, refilled
    assert first.tolist() == [1.0] * 8


class _SpyBackend:
    """torch.cpu's stand-in streams and events, logging what a Stager asks of them (on CUDA: torch.cuda's)."""

    def __init__(self):
        self.log, self.active, self.events = [], None, 0

    def stream(self, s):
        @contextlib.contextmanager
        def on():
            self.active = s
            yield
            self.active = None
        return on()

    def Event(self):  # noqa: N802 - the name torch.cuda uses
        spy, n = self, self.events
        self.events += 1
        return SimpleNamespace(n=n, record=lambda stream: spy.log.append(("record", n, stream, spy.active)),
                               synchronize=lambda: spy.log.append(("sync", n)))

    def current_stream(self, device):
        self.log.append(("current", device))
        return SimpleNamespace(wait_event=lambda event: self.log.append(("wait", event.n)))


def test_the_staged_copy_is_fenced_and_a_buffer_waits_for_its_last_copy(monkeypatch):
    """The ring's CUDA logic, on the CPU: each copy records an event on the side stream (inside it), `ready` makes
    the current stream wait for that event, and a slot's buffer is refilled only after its last copy's event."""
    stager = Stager(CPU, slots=2, staging=True)
    spy = _SpyBackend()
    stager.backend, stager.stream = spy, "side"
    copies = []
    real_copy = torch.Tensor.copy_
    monkeypatch.setattr(torch.Tensor, "copy_", lambda t, src: copies.append(len(spy.log)) or real_copy(t, src))
    a, ea = stager.upload(torch.ones(4))
    b, eb = stager.upload(torch.ones(4) * 2)
    assert spy.log == [("record", 0, "side", "side"), ("record", 1, "side", "side")] and spy.active is None
    assert stager.events == [ea, eb] and (ea.n, eb.n) == (0, 1)
    assert stager.ready(a, ea) is a and spy.log[-2:] == [("current", CPU), ("wait", 0)]
    spy.log.clear()
    c, _ = stager.upload(torch.ones(4) * 3)  # slot 0 again: waits for copy 0 before refilling its buffer
    assert spy.log[0] == ("sync", 0) and copies[-1] == 1 and spy.log[1] == ("record", 2, "side", "side")
    assert a.tolist() == [1.0] * 4 and b.tolist() == [2.0] * 4 and c.tolist() == [3.0] * 4


def test_staged_stream_loader_gives_the_same_batches_as_the_unstaged_one(chunked_cache):
    """`staging=True` (the GPU's pinned ring, streams and events; torch.cpu's stand-ins here) changes no batch."""
    y = chunked_cache.read_y("train")
    made = [StreamLoader(chunked_cache, "train", np.arange(1, 150, 3), y[1:150:3], 8, seed=2, device=CPU, window=2,
                         depth=1, staging=staging) for staging in (False, True)]
    assert [s.staging for s in made[1].stagers] == [True] * 3 and made[0].stagers[0].stream is None
    for epoch in (0, 1):
        plain, staged = (list(loader.epoch(epoch)) for loader in made)
        assert len(plain) == len(staged) == made[0].steps_per_epoch
        for (x1, f1, y1), (x2, f2, y2) in zip(plain, staged):
            assert torch.equal(x1, x2) and torch.equal(y1, y2) and f1 is None and f2 is None


class _FakeSplit:
    """A split in memory (zarr arrays, 4-row chunks): bfloat16 rows stored as their uint16 bits, and mirrored views."""

    def __init__(self, n=22):
        bits = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3).to(torch.bfloat16).view(torch.uint16).numpy()
        self.x, self.x_flip = (zarr.create_array(zarr.storage.MemoryStore(), shape=bits.shape, chunks=(4, 3),
                                                 dtype="uint16") for _ in range(2))
        self.x[:] = bits
        self.x_flip[:] = bits[:, ::-1]
        self.chunk_len = 4

    def __len__(self):
        return self.x.shape[0]


@pytest.fixture(scope="module")
def bf16_flip_cache():
    split = _FakeSplit()
    return SimpleNamespace(dtype="bfloat16", split=lambda name: {"train": split}[name], decode=lambda x: x.float() * 2)


def _rows(n=22):
    x = torch.arange(n * 3, dtype=torch.float32).reshape(n, 3).to(torch.bfloat16)
    return x, x.flip(1)


def test_bfloat16_rows_and_their_mirrored_views_are_read_and_sized(bf16_flip_cache):
    x, xf = _rows()
    assert split_nbytes(bf16_flip_cache, "train", 5) == 5 * 3 * 2 * 2  # bf16 items, the mirrored view counted
    got, flipped = read_rows(bf16_flip_cache, "train", np.array([4, 0])), read_rows(bf16_flip_cache, "train", None, True)
    assert got.dtype == torch.bfloat16 and torch.equal(got, x[[4, 0]]) and torch.equal(flipped, xf)
    loader = DeviceLoader.from_cache(bf16_flip_cache, "train", np.array([1, 2, 3]), torch.tensor([7, 8, 9]), 3, 0,
                                     CPU, flip_views=True)
    bx, bf, by = next(loader.epoch(0))
    pos = (by - 6).tolist()
    assert torch.equal(bx, x[pos].float() * 2) and torch.equal(bf, xf[pos].float() * 2)


@pytest.mark.parametrize("staging", [False, True])
def test_stream_loader_streams_bfloat16_rows_with_their_mirrored_views(bf16_flip_cache, staging):
    x, xf = _rows()
    rows = np.array([0, 1, 2, 3, 5, 9, 10, 11, 17, 20, 21])
    loader = StreamLoader(bf16_flip_cache, "train", rows, torch.from_numpy(rows), 3, seed=5, device=CPU, window=2,
                          flip_views=True, staging=staging)
    seen = []
    for bx, bf, by in loader.epoch(1):
        assert torch.equal(bx, x[by].float() * 2) and torch.equal(bf, xf[by].float() * 2)
        seen += by.tolist()
    assert sorted(seen) == rows.tolist()


def test_a_chunk_whose_rows_are_all_kept_is_not_copied(bf16_flip_cache):
    loader = StreamLoader(bf16_flip_cache, "train", np.array([0, 1, 2, 3, 5]), torch.arange(5), 2, 0, CPU)
    split = bf16_flip_cache.split("train")
    x, xf, y = loader._chunk(split, 0)  # rows 0..3: all kept — the labels are a view, the rows read as they are
    assert xf is None and y.data_ptr() == loader.labels.data_ptr() and y.tolist() == [0, 1, 2, 3]
    x, _, y = loader._chunk(split, 1)  # only row 5 of 4..7
    assert y.tolist() == [4] and torch.equal(x, _rows()[0][[5]])
    later = StreamLoader(bf16_flip_cache, "train", np.arange(8, 12), torch.arange(4), 2, 0, CPU)
    _, _, y = later._chunk(split, 0)  # rows 8..11, the whole third chunk
    assert y.data_ptr() == later.labels[8:].data_ptr() and y.tolist() == [0, 1, 2, 3]


def test_readers_decode_that_many_chunks_ahead_of_the_one_handed_over(bf16_flip_cache, monkeypatch):
    import subcache.loader as loader_mod

    loader = StreamLoader(bf16_flip_cache, "train", None, torch.arange(22), 4, 0, CPU, readers=3)
    submitted, handed = [], []

    class Pool:
        def submit(self, fn, split, c):
            submitted.append(c)
            return SimpleNamespace(result=lambda: c)

    for c in loader._decoded([4, 0, 3, 1, 5, 2], Pool()):
        handed.append((c, len(submitted)))
    assert handed == [(4, 4), (0, 5), (3, 6), (1, 6), (5, 6), (2, 6)]  # 3 more in flight while one is handed over
    sizes = []
    real = loader_mod.ThreadPoolExecutor
    monkeypatch.setattr(loader_mod, "ThreadPoolExecutor", lambda n: sizes.append(n) or real(n))
    assert sum(len(b[2]) for b in loader.epoch(0)) == 22 and sizes == [3]


def test_waits_count_the_time_spent_waiting_for_every_window_but_the_first(bf16_flip_cache, monkeypatch):
    import subcache.loader as loader_mod

    loader = StreamLoader(bf16_flip_cache, "train", None, torch.arange(22), 4, 0, CPU)
    ticks = iter([0.0, 10.0, 13.0, 20.0, 24.0, 100.0, 200.0])
    monkeypatch.setattr(loader_mod, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    q = queue.Queue()
    for item in ([(torch.ones(1), None), None, (torch.zeros(1), None)], [None, None, None], None):
        q.put(item)
    waited = [0.0]
    got = list(loader._windows(q, waited))
    assert len(got) == 2 and got[0][0].tolist() == [1.0] and got[0][1] is None and got[1] == [None, None, None]
    assert waited == [7.0]  # (13 - 10) + (24 - 20): the wait for the first window is the epoch's start-up
    q.put(ValueError("reader failed"))
    with pytest.raises(ValueError, match="reader failed"):
        list(loader._windows(q, [0.0]))


@pytest.mark.parametrize("readers, waited, grown", [(None, 5.0, [2, 4, 4]), (None, 2.0, [1, 1, 1]),
                                                    (2, 5.0, [2, 2, 2])])
def test_readers_double_after_an_epoch_that_waited_up_to_the_cap(bf16_flip_cache, monkeypatch, readers, waited,
                                                                   grown):
    """An epoch of 100 s that waited more than 2 % of it (2 s) for its windows: twice the readers next epoch."""
    import subcache.loader as loader_mod

    loader = StreamLoader(bf16_flip_cache, "train", None, torch.arange(22), 4, 0, CPU, readers=readers)
    loader.max_readers = 4
    ticks = iter([1000.0, 1100.0] * 3)  # each epoch's start and end
    monkeypatch.setattr(loader_mod, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))

    def windows(q, box):
        box[0] += waited
        return iter([])

    loader._windows = windows
    seen = []
    for epoch in range(3):
        assert list(loader.epoch(epoch)) == []
        seen.append(loader.reading)
    assert seen == grown and loader.waits == [waited] * 3


def test_stream_loader_shuffles_within_windows_of_eight_chunks_by_default(chunked_cache):
    y = chunked_cache.read_y("train")
    default, eight, two = (StreamLoader(chunked_cache, "train", None, y, 16, 3, CPU, **kw) for kw in
                           ({}, {"window": 8}, {"window": 2}))
    batches = [[b[2].tolist() for b in loader.epoch(0)] for loader in (default, eight, two)]
    assert batches[0] == batches[1] != batches[2]


def test_image_loader_reads_only_its_rows_in_the_device_loaders_order():
    from subcache.backbones import Preprocess
    from subcache.loader import ImageLoader

    pre = Preprocess(image_size=2, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0), interpolation="bilinear", crop_pct=1.0)
    images = torch.arange(20, dtype=torch.uint8).view(20, 1, 1, 1).expand(20, 3, 2, 2).contiguous()
    source = SimpleNamespace(take=lambda pos, p: images[torch.from_numpy(np.asarray(pos))], __len__=lambda: 20)
    backbone = SimpleNamespace(preprocess=pre, prefix=lambda x, layer: x[:, :1, 0, 0] * 255 + layer * 1000)
    rows = np.array([3, 7, 11, 12, 19])
    loader = ImageLoader(source, backbone, 2, rows, torch.tensor([30, 70, 110, 120, 190]), 2, seed=4, device=CPU)
    assert loader.num_samples == 5 and loader.steps_per_epoch == 2 and not loader.bridged
    for (x, xf, y), idx in zip(loader.epoch(1), batch_order(5, 2, 4, 1)):
        assert xf is None and torch.equal(y, torch.tensor([30, 70, 110, 120, 190])[idx])
        assert torch.allclose(x.flatten(), torch.from_numpy(rows[idx.numpy()]).float() + 2000)


def test_device_loader_decodes_without_mirrored_views(bf16_flip_cache):
    loader = DeviceLoader.from_cache(bf16_flip_cache, "train", np.array([1, 2, 3]), torch.tensor([7, 8, 9]), 3, 0, CPU)
    bx, bf, by = next(loader.epoch(0))
    assert bf is None and torch.equal(bx, _rows()[0][(by - 6).tolist()].float() * 2)


def test_image_loader_without_indices_takes_every_image():
    from subcache.loader import ImageLoader

    class Source:
        def __len__(self):
            return 7

    loader = ImageLoader(Source(), None, 2, None, torch.arange(7), 3, seed=0, device=CPU)
    assert loader.positions.tolist() == list(range(7)) and loader.num_samples == 7 and loader.steps_per_epoch == 2


def test_the_stream_reader_is_a_daemon_thread(bf16_flip_cache, monkeypatch):
    started = []

    class Thread(threading.Thread):
        def start(self):
            started.append(self)
            super().start()

    monkeypatch.setattr(threading, "Thread", Thread)
    loader = StreamLoader(bf16_flip_cache, "train", None, torch.arange(22), 4, 0, CPU)
    list(loader.epoch(0))
    readers = [t for t in started if t.name.endswith("(_read)")]
    assert len(readers) == 1 and readers[0].daemon  # an interrupted run never waits on its reader to exit
