"""Batches of cached activations for training, never through a per-sample Dataset/collate.

* `DeviceLoader`: the split fits the memory budget → loaded once onto the device, shuffled with `randperm`,
  indexed there.
* `StreamLoader`: it does not → whole chunks read by a background thread (zarr's decompression releases the
  GIL) in shuffled order, shuffled again within a window of chunks, pinned and copied non-blocking to the GPU.
* `ImageLoader`: the reference path — images through the live frozen prefix, in the same order as
  `DeviceLoader` (used by the exactness tests and by `bench train` for the speed-up the cache buys).
"""
from __future__ import annotations

import os
import queue
import threading
from typing import Iterator, Protocol

import numpy as np
import torch

from .store import Cache, from_storage, read

Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]  # x, exact mirrored x or None, y


class Loader(Protocol):
    steps_per_epoch: int
    num_samples: int

    def epoch(self, epoch: int) -> Iterator[Batch]: ...


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch)


def batch_order(n: int, batch_size: int, seed: int, epoch: int) -> list[torch.Tensor]:
    """The shuffled batches of positions 0..n-1 for one epoch (a lone last sample is dropped: BatchNorm)."""
    perm = torch.randperm(n, generator=epoch_generator(seed, epoch))
    batches = list(perm.split(batch_size))
    return batches[:-1] if len(batches) > 1 and len(batches[-1]) < 2 else batches


def memory_budget(device: torch.device) -> int:
    """Bytes a resident split may take: half the free GPU memory, or a quarter of the host's RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


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
                 x_flip: torch.Tensor | None = None, decode=None):
        self.x, self.y, self.x_flip = x, y, x_flip
        self.decode = decode  # int8 caches: codes stay resident, each batch dequantized here
        self.batch_size, self.seed = batch_size, seed
        self.num_samples = len(y)
        self.steps_per_epoch = len(batch_order(self.num_samples, batch_size, seed, 0))

    @classmethod
    def from_cache(cls, cache: Cache, split: str, indices: np.ndarray | None, labels: torch.Tensor,
                   batch_size: int, seed: int, device: torch.device, flip_views: bool = False) -> "DeviceLoader":
        x = read_rows(cache, split, indices).to(device)
        x_flip = read_rows(cache, split, indices, flip=True).to(device) if flip_views else None
        return cls(x, labels.to(device), batch_size, seed, x_flip, cache.decode)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        for idx in batch_order(self.num_samples, self.batch_size, self.seed, epoch):
            idx = idx.to(self.x.device, non_blocking=True)
            x, x_flip = self.x[idx], None if self.x_flip is None else self.x_flip[idx]
            if self.decode is not None:
                x, x_flip = self.decode(x), None if x_flip is None else self.decode(x_flip)
            yield x, x_flip, self.y[idx]


class StreamLoader:
    """Streams whole chunks: shuffled chunk order, then shuffled within a window of ``window`` chunks."""

    def __init__(self, cache: Cache, split: str, indices: np.ndarray | None, labels: torch.Tensor, batch_size: int,
                 seed: int, device: torch.device, flip_views: bool = False, window: int = 8, depth: int = 4):
        self.cache, self.split, self.device = cache, split, device
        self.batch_size, self.seed, self.window, self.depth = batch_size, seed, window, depth
        self.flip_views = flip_views
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

    def _read(self, order: list[int], q: queue.Queue) -> None:
        split = self.cache.split(self.split)
        try:
            for c in order:
                a, b, keep = self.chunks[c]
                x = from_storage(read(split.x, slice(a, b))[keep], self.cache.dtype)
                xf = from_storage(read(split.x_flip, slice(a, b))[keep], self.cache.dtype) if self.flip_views else None
                q.put((x, xf, self.labels[a:b][torch.from_numpy(keep)]))
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            q.put(exc)
        q.put(None)

    def _to_device(self, t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    def epoch(self, epoch: int) -> Iterator[Batch]:
        gen = epoch_generator(self.seed, epoch)
        order = torch.randperm(len(self.chunks), generator=gen).tolist()
        q: queue.Queue = queue.Queue(maxsize=self.depth)
        threading.Thread(target=self._read, args=(order, q), daemon=True).start()
        pending: list[Batch] = []
        done = False
        while not done:
            while len(pending) < self.window and not done:
                item = q.get()
                if isinstance(item, BaseException):
                    raise item
                done = item is None
                if item is not None:
                    pending.append(item)
            if not pending:
                break
            x = torch.cat([p[0] for p in pending])
            xf = torch.cat([p[1] for p in pending]) if self.flip_views else None
            y = torch.cat([p[2] for p in pending])
            perm = torch.randperm(len(y), generator=gen)
            cut = len(y) if done else len(y) // self.batch_size * self.batch_size
            for idx in perm[:cut].split(self.batch_size):
                if len(idx) >= 2:
                    xi, xfi = (self._to_device(v) for v in (x[idx], None if xf is None else xf[idx]))
                    yield (self.cache.decode(xi), None if xfi is None else self.cache.decode(xfi),
                           self._to_device(y[idx]))
            rest = perm[cut:]
            pending = [(x[rest], None if xf is None else xf[rest], y[rest])] if len(rest) else []


class ImageLoader:
    """Reference path: images → normalise → live frozen prefix → activations, in `DeviceLoader`'s order."""

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
        for idx in batch_order(self.num_samples, self.batch_size, self.seed, epoch):
            # a standard-layout copy: the live prefix may hand back channels_last, and a different memory layout
            # picks a different conv kernel (float-level differences that Adam then amplifies)
            yield self.activations(idx).contiguous().clone(), None, self.y[idx.to(self.device)]
