"""Batches of cached activations for training, never through a per-sample Dataset/collate.

* `DeviceLoader`: the split fits the memory budget → loaded once onto the device, shuffled with `randperm`,
  indexed there.
* `StreamLoader`: it does not → whole chunks read by a background thread (zarr's decompression releases the
  GIL) in shuffled order; each window of chunks staged through reused pinned buffers and copied on a side CUDA
  stream while the previous window trains, then shuffled and gathered on the device.
Every loader says whether its tensors are already past the model's frozen bridge (``bridged``: they are the input
of the first trainable block) or are the cache's activations; `bridge` gives the step that matches.

* `ImageLoader`: the reference path — images through the live frozen prefix, in the same order as
  `DeviceLoader` (used by the exactness tests and by `bench train` for the speed-up the cache buys).
"""
from __future__ import annotations

import collections
import os
import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterator, Protocol

import numpy as np
import torch

from .devices import memory_budget, resident_dtype  # noqa: F401 - re-exported: where they used to live
from .store import Cache, from_storage, read

Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]  # x, exact mirrored x or None, y


class Loader(Protocol):
    steps_per_epoch: int
    num_samples: int
    bridged: bool  # batches are already past the frozen bridge (the first trainable block's input)

    def epoch(self, epoch: int) -> Iterator[Batch]: ...


def bridge(loader: Loader, model) -> Callable[[torch.Tensor], torch.Tensor]:
    """What takes a batch of ``loader`` to the input of ``model``'s first trainable block: nothing when the loader
    is ``bridged``, else the model's frozen bridge."""
    return _unchanged if loader.bridged else model.frozen_part


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def epoch_generator(seed: int, epoch: int, device: torch.device | str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + epoch)


def batch_order(n: int, batch_size: int, seed: int, epoch: int,
                device: torch.device | str = "cpu") -> list[torch.Tensor]:
    """The shuffled batches of positions 0..n-1 for one epoch, drawn on ``device`` (a lone last sample is dropped:
    BatchNorm). Splitting is by known lengths: no host sync."""
    perm = torch.randperm(n, generator=epoch_generator(seed, epoch, device), device=device)
    batches = list(perm.split(batch_size))
    return batches[:-1] if len(batches) > 1 and len(batches[-1]) < 2 else batches


def split_nbytes(cache: Cache, split: str, count: int) -> int:
    s = cache.split(split)
    per = int(np.prod(s.x.shape[1:])) * s.x.dtype.itemsize * (2 if s.x_flip is not None else 1)
    return per * count


def read_rows(cache: Cache, split: str, indices: np.ndarray | None, flip: bool = False) -> torch.Tensor:
    """Rows of x (or x_flip) in storage dtype; whole split when ``indices`` is None."""
    s = cache.split(split)
    arr = s.x_flip if flip else s.x
    data = read(arr, slice(None)) if indices is None else read(arr, indices, orthogonal=True)
    return from_storage(data, cache.dtype)


class DeviceLoader:
    """Tensors resident on the device; each epoch is a device-side gather along a seeded permutation."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int,
                 x_flip: torch.Tensor | None = None, decode=None, bridged: bool = False):
        self.x, self.y, self.x_flip, self.bridged = x, y, x_flip, bridged
        self.decode = decode  # int8 caches: codes stay resident, each batch dequantized here
        self.batch_size, self.seed = batch_size, seed
        self.num_samples = len(y)
        self.steps_per_epoch = len(batch_order(self.num_samples, batch_size, seed, 0))

    @classmethod
    def from_cache(cls, cache: Cache, split: str, indices: np.ndarray | None, labels: torch.Tensor,
                   batch_size: int, seed: int, device: torch.device, flip_views: bool = False) -> "DeviceLoader":
        x = read_rows(cache, split, indices).to(device)
        x_flip = read_rows(cache, split, indices, flip=True).to(device) if flip_views else None
        return cls(x, labels.to(device), batch_size, seed, x_flip, decode=cache.decode)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for idx in batch_order(self.num_samples, self.batch_size, self.seed, epoch, self.x.device):
            x, x_flip = self.x[idx], None if self.x_flip is None else self.x_flip[idx]
            if self.decode is not None:
                x, x_flip = self.decode(x), None if x_flip is None else self.decode(x_flip)
            yield x, x_flip, self.y[idx]


class Stager:
    """Host → device copies through a ring of reused host buffers: pinned, copied on a side stream and fenced with
    events on CUDA. Off the GPU it passes tensors through, unless ``staging=True`` (the tests): then plain buffers and
    torch.cpu's stand-in streams and events (no-ops, copies are synchronous) run the same code the GPU runs.

    `upload` returns the device tensor and an event; `ready` makes the current stream wait for that event. A buffer
    is reused only after the copy that last read it has finished (its event), normally long done.
    """

    def __init__(self, device: torch.device, slots: int = 2, staging: bool | None = None):
        self.device = device
        self.staging = device.type == "cuda" if staging is None else staging  # off the GPU only when asked (tests)
        self.pin = device.type == "cuda"
        self.backend = torch.get_device_module(device)  # torch.cuda, or torch.cpu: device-agnostic stand-ins
        self.stream = self.backend.Stream(device) if self.staging else None
        self.buffers: list[torch.Tensor | None] = [None] * slots  # flat uint8 host buffers
        self.events: list[torch.cuda.Event | None] = [None] * slots
        self.slot, self.allocations = 0, 0

    def _buffer(self, nbytes: int) -> tuple[int, torch.Tensor]:
        i, self.slot = self.slot, (self.slot + 1) % len(self.buffers)
        if self.events[i] is not None:
            self.events[i].synchronize()  # the copy that last read this buffer (a window ago) is done
        if self.buffers[i] is None or self.buffers[i].numel() < nbytes:  # grow with headroom: windows vary a little
            self.buffers[i] = torch.empty(nbytes + nbytes // 4, dtype=torch.uint8, pin_memory=self.pin)
            self.allocations += 1
        return i, self.buffers[i]

    def upload(self, t: torch.Tensor) -> tuple[torch.Tensor, "torch.cuda.Event | None"]:
        """Copy a host tensor to the device via the next staging buffer (asynchronously on CUDA)."""
        if not self.staging:  # a CPU run by default: the reader's tensor is already where it is needed
            return t.to(self.device), None
        nbytes = t.numel() * t.element_size()
        i, buffer = self._buffer(nbytes)
        host = buffer[:nbytes].view(t.dtype).view(t.shape)
        host.copy_(t)
        with self.backend.stream(self.stream):
            out = host.to(self.device, non_blocking=True, copy=True)  # copy: on the CPU ``host`` is the buffer
            event = self.backend.Event()
            event.record(self.stream)
        self.events[i] = event
        return out, event

    def ready(self, t: torch.Tensor, event: "torch.cuda.Event | None") -> torch.Tensor:
        """``t`` usable on the current stream: wait for its copy (a device-side wait, no host sync)."""
        if event is not None:
            current = self.backend.current_stream(self.device)
            current.wait_event(event)
            if t.is_cuda:  # the caching allocator's bookkeeping; no such thing for CPU tensors
                t.record_stream(current)  # allocated on the side stream, used on this one
        return t


class StreamLoader:
    """Streams whole chunks: shuffled chunk order, then shuffled within a window of ``window`` chunks.

    Read-ahead: a background thread has ``readers`` threads read and decompress chunks at once (handed over in
    order), joins each window and starts its copy to the device (through reused staging buffers: pinned and
    copied on a side CUDA stream), keeping up to ``depth`` windows ready ahead of the step; batches are gathered
    on the device along a permutation drawn there. ``readers`` None: one, doubled for the next epoch (up to
    `max_readers`) whenever the step had to wait for a window this epoch — enough readers that it does not.
    Each epoch's seconds of waiting (after its first window) are in ``waits``.
    """

    bridged = False  # the cache's activations

    def __init__(self, cache: Cache, split: str, indices: np.ndarray | None, labels: torch.Tensor, batch_size: int,
                 seed: int, device: torch.device, flip_views: bool = False, window: int = 8, depth: int = 2,
                 staging: bool | None = None, readers: int | None = None):
        self.cache, self.split, self.device = cache, split, device
        # chunks read and decoded at once: fixed, or (None) grown while the step waits — on 2 CPU cores more
        # readers did not read faster in steady state, and their Python work competes for the GIL
        self.readers, self.reading = readers, readers or 1
        self.max_readers = min(8, os.cpu_count() or 1)
        self.batch_size, self.seed, self.window, self.depth = batch_size, seed, window, depth
        self.flip_views, self.waits = flip_views, []
        n, clen = len(cache.split(split)), cache.split(split).chunk_len
        positions = np.arange(n) if indices is None else np.asarray(indices)
        self.labels = torch.full((n,), -1, dtype=torch.long)
        self.labels[torch.from_numpy(positions)] = labels.cpu()
        chunk_of = positions // clen
        self.chunks = [(c * clen, min(n, (c + 1) * clen), positions[chunk_of == c] - c * clen)
                       for c in np.unique(chunk_of)]
        self.num_samples = len(positions)
        full, rest = divmod(self.num_samples, batch_size)
        self.steps_per_epoch = full + (rest >= 2)
        # x, x_flip, y: reused across epochs; a slot is refilled only once its last copy is done
        self.stagers = [Stager(device, slots=depth + 2, staging=staging) for _ in range(3)]

    def _chunk(self, split, c: int) -> tuple:
        """One chunk's kept rows (x, x_flip or None, y) on the host; no copy when every row is kept."""
        a, b, keep = self.chunks[c]
        rows = slice(None) if np.array_equal(keep, np.arange(b - a)) else keep  # every row once, in order

        def load(arr):
            return from_storage(read(arr, slice(a, b))[rows], self.cache.dtype)

        y = self.labels[a:b] if isinstance(rows, slice) else self.labels[a:b][torch.from_numpy(keep)]
        return load(split.x), load(split.x_flip) if self.flip_views else None, y

    def _decoded(self, order: list[int], pool: ThreadPoolExecutor) -> Iterator[tuple]:
        """The chunks of ``order``, in order, ``reading`` of them read and decoded at once."""
        split = self.cache.split(self.split)  # opened once: opening the arrays costs more than a chunk
        ahead: collections.deque = collections.deque()
        for c in order:
            ahead.append(pool.submit(self._chunk, split, c))
            if len(ahead) > self.reading:
                yield ahead.popleft().result()
        while ahead:
            yield ahead.popleft().result()

    def _read(self, order: list[int], q: queue.Queue, stop: threading.Event) -> None:
        """Windows of the chunks in ``order`` onto ``q``, joined and their copies to the device started; ends early,
        its pool with it, once the consumer sets ``stop``."""
        pool = ThreadPoolExecutor(self.reading)
        try:
            pending = []
            for chunk in self._decoded(order, pool):
                pending.append(chunk)
                if len(pending) == self.window:
                    if not _put(q, self._upload(_join(pending)), stop):
                        return
                    pending = []
            if pending and not _put(q, self._upload(_join(pending)), stop):
                return
            _put(q, None, stop)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            _put(q, exc, stop)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _upload(self, window: list) -> list:
        """Start a window's host → device copy; [(tensor, event) or None] per field."""
        return [None if t is None else stager.upload(t) for stager, t in zip(self.stagers, window)]

    def _windows(self, q: queue.Queue, waited: list[float]) -> Iterator[list]:
        """The staged windows from the reader, ready on this stream; adds the seconds spent waiting for them,
        after the first, to ``waited``."""
        first = True
        while True:
            t0 = time.perf_counter()
            item = q.get()
            if not first:
                waited[0] += time.perf_counter() - t0
            first = False
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield [None if u is None else stager.ready(*u) for stager, u in zip(self.stagers, item)]

    def epoch(self, epoch: int) -> Iterator[Batch]:
        order = torch.randperm(len(self.chunks), generator=epoch_generator(self.seed, epoch)).tolist()  # for the reader
        gen = epoch_generator(self.seed, epoch, self.device)  # in-window shuffles, on the device
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()  # set when this epoch ends, early too (an error, a closed generator)
        threading.Thread(target=self._read, args=(order, q, stop), daemon=True).start()
        waited, t0 = [0.0], time.perf_counter()
        try:
            yield from self._batches(self._windows(q, waited), gen)
        finally:
            stop.set()
        self.waits.append(waited[0])
        if self.readers is None and waited[0] > 0.02 * (time.perf_counter() - t0):  # the step waited: read more
            self.reading = min(self.max_readers, 2 * self.reading)

    def _batches(self, windows: Iterator[list], gen: torch.Generator) -> Iterator[Batch]:
        """Batches of staged windows: each window shuffled on the device, its remainder carried into the next (the
        next window is asked for only once this one's full batches are out)."""
        rest: list = [None, None, None]
        for current in windows:
            x, xf, y = [c if r is None else torch.cat([r, c]) for r, c in zip(rest, current)]
            perm = torch.randperm(len(y), generator=gen, device=self.device)
            cut = len(y) // self.batch_size * self.batch_size
            for idx in perm[:cut].split(self.batch_size):
                yield self._batch(x, xf, y, idx)
            rest = [None if t is None else t[perm[cut:]] for t in (x, xf, y)]
        if rest[2] is not None and len(rest[2]) >= 2:  # the epoch's short last batch
            yield self._batch(*rest, torch.arange(len(rest[2]), device=self.device))

    def _batch(self, x: torch.Tensor, xf: torch.Tensor | None, y: torch.Tensor, idx: torch.Tensor) -> Batch:
        return self.cache.decode(x[idx]), None if xf is None else self.cache.decode(xf[idx]), y[idx]


def _put(q: queue.Queue, item, stop: threading.Event) -> bool:
    """Put ``item`` on ``q`` unless ``stop`` is set first; whether it was put."""
    while not stop.is_set():
        try:
            q.put(item, timeout=0.05)
            return True
        except queue.Full:
            pass
    return False


def _join(items: list) -> list:
    return [None if items[0][k] is None else torch.cat([it[k] for it in items]) for k in range(3)]


class ImageLoader:
    """Reference path: images → normalise → live frozen prefix → activations, in `DeviceLoader`'s order."""

    bridged = False  # activations at the cached layer

    def __init__(self, source, backbone, layer: int, indices: np.ndarray | None, labels: torch.Tensor,
                 batch_size: int, seed: int, device: torch.device, round_to: torch.dtype | None = None):
        self.source, self.backbone, self.layer = source, backbone, layer
        self.positions = np.arange(len(source)) if indices is None else np.asarray(indices)
        self.y = labels.to(device)
        self.batch_size, self.seed, self.device, self.round_to = batch_size, seed, device, round_to
        self.num_samples = len(self.positions)
        self.steps_per_epoch = len(batch_order(self.num_samples, batch_size, seed, 0))

    @torch.inference_mode()
    def activations(self, idx: torch.Tensor) -> torch.Tensor:
        from .data import to_input

        images = self.source.take(self.positions[idx.numpy()], self.backbone.preprocess).to(self.device)
        h = self.backbone.prefix(to_input(images, self.backbone.preprocess), self.layer)
        return h.to(self.round_to) if self.round_to is not None else h

    def epoch(self, epoch: int) -> Iterator[Batch]:
        batches = batch_order(self.num_samples, self.batch_size, self.seed, epoch, self.device)
        host = torch.cat(batches).cpu().split([len(b) for b in batches])  # one transfer: images are read on the host
        for idx, at in zip(host, batches):
            # a standard-layout copy: the live prefix may hand back channels_last, and a different memory layout
            # picks a different conv kernel (float-level differences that Adam then amplifies)
            yield self.activations(idx).contiguous().clone(), None, self.y[at]
