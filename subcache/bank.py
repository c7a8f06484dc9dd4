"""In-memory derived caches: the activations at later blocks' inputs, computed once from a cache and shared by
every run of a profile / greedy search / active-learning loop.

A window starting at block 14 of a cache at block 9 would otherwise run the frozen blocks 9–13 at the start of
every run; the bank runs each frozen block once per split, block by block, and keeps the result on the device.
Only for runs without feature-space augmentation (augmentation applies at the cached layer). Activations are kept
in float32 when a few layers of every split fit the memory budget that way, else in the cache's 16-bit dtype
(consumers cast each batch to float32).
"""
from __future__ import annotations

import torch

from .backbones import Backbone
from .devices import memory_budget, resident_dtype, resolve_device
from .loader import read_rows, split_nbytes
from .store import Cache

LAYERS_KEPT = 4  # a bank typically holds the cached layer, a few later inputs and the neck's output

NECK = 10_000  # pseudo-layer index of the neck's output (the linear probe's features)


class ActivationBank:
    """Activations of a cache's splits at the input of any later block (or after the neck), memoised."""

    def __init__(self, cache: Cache, backbone: Backbone, device: torch.device, batch: int = 1024,
                 budget: int | None = None):
        self.cache, self.backbone, self.device, self.batch = cache, backbone, device, batch
        stored = getattr(torch, cache.dtype, torch.float32)
        float32 = sum(split_nbytes(cache, s, len(cache.split(s))) for s in cache.splits) * 4 // stored.itemsize
        self.dtype = resident_dtype(float32 * LAYERS_KEPT, stored, device, budget)
        self._acts: dict[tuple[str, int], torch.Tensor] = {}

    @torch.inference_mode()
    def at(self, split: str, layer: int) -> torch.Tensor:
        """(N, ...) in `dtype` on the device: the input of block ``layer`` (``NECK``: the neck's output)."""
        key = (split, layer)
        if key in self._acts:
            return self._acts[key]
        if layer == self.cache.layer:
            h = self.cache.decode(read_rows(self.cache, split, None).to(self.device)).to(self.dtype)
        elif layer == NECK:
            last = self.at(split, self.backbone.num_blocks)
            h = self._map(last, lambda x: self.backbone.neck(self.backbone.block(self.backbone.num_blocks)(x)))
        else:
            prev = self.at(split, layer - 1)
            h = self._map(prev, self.backbone.block(layer - 1))
        self._acts[key] = h
        return h

    def _map(self, x: torch.Tensor, fn) -> torch.Tensor:
        return torch.cat([fn(x[i:i + self.batch].float()).to(self.dtype) for i in range(0, len(x), self.batch)])

    def input_of(self, split: str, first_trainable: int) -> torch.Tensor:
        """What a model's `trainable_part` takes: the first tuned block's input, or the neck's output (probe)."""
        return self.at(split, NECK if first_trainable > self.backbone.num_blocks else first_trainable)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._acts.values())


def shared_bank(cache: Cache, backbone: Backbone, augment: str | None, device: str) -> ActivationBank | None:
    """A bank when runs can share frozen activations: no augmentation (a run's ``augment``), and the splits fit
    comfortably on ``device`` (a run's ``--device``)."""
    if augment not in ("none", "", None):
        return None
    device = resolve_device(device)
    need = sum(split_nbytes(cache, s, len(cache.split(s))) * 4 for s in cache.splits)  # stored dtype, a few layers
    return ActivationBank(cache, backbone, device) if need <= memory_budget(device) else None

