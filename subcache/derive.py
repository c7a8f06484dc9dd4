"""`build --from CACHE --layer L2`: a later-layer cache computed from an earlier one, no images touched.

The frozen blocks between the two layers run over the cached tensors (and over the exact mirrored views when the
source has them). Same ids, labels and splits; the same resumable, chunked pipeline as `build`.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .backbones import Backbone
from .build import (BuildResult, Job, capture_inputs, check_outputs, finish_all, join_views, open_or_create,
                    open_stores, out_paths, resolve_device, run_units, text_paths)
from .distributed import Dist, WriterLock
from .errors import BlockError, StoreError
from .store import DTYPES, Cache, chunk_length, from_storage, open_cache, read
from .task import backbone_for


@dataclass(frozen=True)
class DeriveConfig:
    source: str | os.PathLike  # a complete cache
    out: str | os.PathLike
    layers: tuple[str, ...]  # later blocks whose inputs to store
    dtype: str | None = None  # default: the source's dtype
    batch_size: int = 256
    chunk_mb: float = 1.0
    device: str = "auto"
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        text_paths(self, "source", "out")


def derive_cache(config: DeriveConfig, *, progress: bool = False, backbone: Backbone | None = None) -> BuildResult:
    """Write the input of each later block in ``config.layers`` by running frozen blocks over ``config.source``."""
    src = open_cache(config.source)
    backbone = backbone or backbone_for(src.backbone)
    src.check_backbone(backbone.identity())
    dtype = config.dtype or src.dtype
    if dtype not in DTYPES:
        raise StoreError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
    layers = sorted({backbone.resolve(layer) for layer in config.layers})
    if layers[0] <= src.layer:
        raise BlockError(f"--from cache {config.source} holds block {src.layer}'s input; a derived layer must come "
                         f"after it ({src.layer + 1} to {backbone.num_blocks})")
    paths = out_paths(config.out, layers)
    ranks = Dist.from_env()
    device = resolve_device(config.device, ranks.local_rank)
    backbone.to(device)
    with torch.inference_mode():
        probe = from_storage(read(src.split(src.splits[0]).x, slice(0, 1)), src.dtype).float().to(device)
        shapes = {layer: tuple(backbone.run_blocks(probe, src.layer, layer - 1).shape[1:]) for layer in layers}
    sizes = {s: len(src.split(s)) for s in src.splits}
    itemsize = np.dtype(DTYPES[dtype]).itemsize
    chunks = {layer: {s: chunk_length(shapes[layer], itemsize, n, config.chunk_mb) for s, n in sizes.items()}
              for layer in layers}

    def create() -> list[Cache]:
        check_outputs(config.out, paths, overwrite=config.overwrite, resume=config.resume)
        return [open_or_create(path, _attrs(src, config, backbone, layer, shapes[layer], dtype), sizes,
                               chunks[layer], resume=config.resume) for path, layer in zip(paths, layers)]

    jobs = {s: _job(src, s) for s in src.splits}
    with WriterLock(config.out, enabled=ranks.main):
        stores = open_stores(ranks, paths, create)
        start = time.perf_counter()
        done, skipped = run_units(stores, layers, jobs, chunks,
                                  lambda views: _forward(backbone, src.layer, layers, views, dtype, config.batch_size),
                                  device, progress and ranks.main, ranks)
        finish_all(ranks, stores)
    return BuildResult(paths, ranks.sum(done), time.perf_counter() - start, ranks.sum(skipped), layers)


def _attrs(src: Cache, config: DeriveConfig, backbone: Backbone, layer: int, shape: tuple[int, ...],
           dtype: str) -> dict:
    attrs = {k: v for k, v in src.attrs.items() if k not in ("status", "finished")}
    attrs.update({
        "layer": {"index": layer, "name": backbone.block_names[layer - 1], "num_blocks": backbone.num_blocks},
        "sample_shape": list(shape), "dtype": dtype,
        "build": {"derived_from": config.source, "source_layer": src.layer, "source_build": src.attrs.get("build"),
                  "dtype": dtype, "batch_size": config.batch_size, "chunk_mb": config.chunk_mb},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return attrs


def _job(src: Cache, split: str) -> Job:
    s = src.split(split)
    views = {"x": s.x, **({"x_flip": s.x_flip} if s.x_flip is not None else {})}

    def load(a: int, b: int) -> dict[str, torch.Tensor]:
        return {name: from_storage(read(arr, slice(a, b)), src.dtype) for name, arr in views.items()}

    return Job(len(s), load, read(s.y, slice(None)), read(s.id, slice(None)), src.read_keys(split))


@torch.inference_mode()
def _forward(backbone: Backbone, start: int, layers: list[int], views: dict[str, torch.Tensor], dtype: str,
             batch: int) -> dict[int, dict[str, np.ndarray]]:
    parts: dict[int, dict[str, list]] = {layer: {v: [] for v in views} for layer in layers}
    for view, x in views.items():
        for i in range(0, len(x), batch):
            for layer, kept in capture_inputs(backbone, x[i:i + batch].float(), start, layers, dtype).items():
                parts[layer][view].append(kept)
    return join_views(parts)
