"""A store's storage plan, decided before it is created: options checked, samples per chunk and shard per split,
and — from the first items, measured once — the codec (``--codec auto``) and int8's per-channel scales."""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from .errors import ConfigError
from .store import CODECS, DTYPES, Layout, channel_axis, choose_codec, chunk_length, quantize_scale, to_storage

CALIBRATION = 1024  # int8 scales: max |x| per channel over the first this-many items of the first split


def check_storage(dtype: str, codec: str, chunk_mb: float, shard_mb: float | None, batch_size: int = 1) -> None:
    if batch_size <= 0:
        raise ConfigError(f"--batch-size must be positive, got {batch_size}")
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    if codec not in CODECS:
        raise ConfigError(f"unknown codec {codec!r}; allowed: {', '.join(CODECS)}")
    if chunk_mb <= 0:
        raise ConfigError(f"--chunk-mb must be positive, got {chunk_mb}")
    if shard_mb is not None and shard_mb < chunk_mb:
        raise ConfigError(f"--shard-mb must be at least --chunk-mb ({chunk_mb}), got {shard_mb}")


def layout(shape: tuple[int, ...], dtype: str, sizes: dict[str, int], chunk_mb: float,
           shard_mb: float | None) -> Layout:
    """Samples per chunk (and per shard with ``shard_mb``) for each split of one store."""
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    chunks = {s: chunk_length(shape, itemsize, n, chunk_mb) for s, n in sizes.items()}
    shards = {s: None if shard_mb is None else max(chunks[s], chunk_length(shape, itemsize, n, shard_mb))
              for s, n in sizes.items()}
    return Layout(sizes, chunks, shards, shape)


def calibration_len(layouts: dict[int, Layout], dtype: str, batch: int | None = None) -> int:
    """Items measured before a store is created: the first chunk of every layer (the codec's sample), and at least
    CALIBRATION for int8 (its scales). With ``batch`` (not for int8, whose scales depend on the count), rounded up
    to whole forward batches, so the build can keep what was measured (`Planner.reuse`)."""
    first = max(next(iter(lay.chunk_len.values())) for lay in layouts.values())
    if dtype == "int8":
        return max(first, CALIBRATION)
    return -(-first // batch) * batch if batch else first


class Planner:
    """Measures the first items once (only when a store is created) and plans each layer's storage from them: the
    codec chosen on the first chunk, and int8 scales (max |x| per channel / 127). Stored once, so a resumed or
    multi-rank build reuses them and stays bit-identical."""

    def __init__(self, first_items: Callable[[], dict[int, dict[str, np.ndarray]]], dtype: str, codec: str,
                 layouts: dict[int, Layout]):
        self.first_items, self.dtype, self.codec, self.layouts = first_items, dtype, codec, layouts
        self.acts: dict[int, dict[str, np.ndarray]] | None = None

    def __call__(self, layer: int) -> dict:
        if self.dtype != "int8" and self.codec != "auto":
            return {"codec": self.codec}
        if self.acts is None:
            self.acts = self.first_items()
        t = torch.from_numpy(self.acts[layer]["x"])
        scale = None
        if self.dtype == "int8":
            scale = quantize_scale(t.abs().amax(dim=[d for d in range(t.dim()) if d != channel_axis(t.dim())]))
        first = to_storage(t[:next(iter(self.layouts[layer].chunk_len.values()))], self.dtype, scale)
        codec, measured = choose_codec(first, self.codec)
        return {"codec": codec, "codec_measured": measured, "scale": None if scale is None else scale.numpy()}

    def reuse(self, a: int, b: int) -> dict[int, dict[str, np.ndarray]] | None:
        """Items [a, b) (a forward batch) of the first split as stored, when the measurement computed them — in the
        build's own batches, from item 0: the same float32 activations rounded the same way. Not for int8 (its
        codes are computed on the build's device). The measurement is let go at the first batch it lacks."""
        if self.acts is None or self.dtype == "int8" or b > len(next(iter(self.acts.values()))["x"]):
            self.acts = None
            return None
        return {layer: {"x": to_storage(torch.from_numpy(v["x"][a:b]), self.dtype)} for layer, v in self.acts.items()}
