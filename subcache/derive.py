"""`build --from CACHE --layer L2`: a later-layer cache computed from an earlier one, no images touched.

The frozen blocks between the two layers run over the cached tensors (and over the exact mirrored views when the
source has them). Same ids, labels and splits; the same resumable, chunked pipeline as `build`.
"""
from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass

import numpy as np
import torch

from .backbones import Backbone, backbone_for
from .devices import resolve_device
from .build import (BATCHING, BuildResult, Job, capture_inputs, check_outputs, join_views, open_or_create,
                    out_paths, text_paths, write_stores)
from .plan import Planner, calibration_len, check_storage, layout
from .distributed import Dist
from .errors import BlockError
from .store import Cache, from_storage, open_cache, read


@dataclass(frozen=True)
class DeriveConfig:
    source: str | os.PathLike  # a complete cache
    out: str | os.PathLike
    layers: tuple[str, ...]  # later blocks whose inputs to store
    dtype: str | None = None  # default: the source's dtype
    codec: str = "auto"
    shard_mb: float | None = None
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
    backbone = backbone or backbone_for(src.backbone, f"cache {src.path}")
    src.check_backbone(backbone.identity())
    dtype = config.dtype or src.dtype
    check_storage(dtype, config.codec, config.chunk_mb, config.shard_mb, config.batch_size)
    layers = sorted({backbone.resolve(layer) for layer in config.layers})
    if layers[0] <= src.layer:
        raise BlockError(f"--from cache {config.source} holds block {src.layer}'s input; a derived layer must come "
                         f"after it ({src.layer + 1} to {backbone.num_blocks})")
    paths = out_paths(config.out, layers)
    ranks = Dist.from_env()
    device = resolve_device(config.device, ranks.local_rank)
    backbone.to(device)
    shapes = derived_shapes(src, backbone, layers)
    sizes = {s: len(src.split(s)) for s in src.splits}
    layouts = {layer: layout(shapes[layer], dtype, sizes, config.chunk_mb, config.shard_mb) for layer in layers}
    jobs = {s: _job(src, s, config.batch_size) for s in src.splits}

    def first_items() -> dict[int, dict[str, np.ndarray]]:  # float32 activations: codec choice and int8 scales
        job = next(iter(jobs.values()))
        views = {"x": job.load(0, min(job.n, calibration_len(layouts, dtype)))["x"].to(device)}
        return _forward(backbone, src, layers, views, "float32", config.batch_size)

    def create() -> list[Cache]:
        check_outputs(config.out, paths, overwrite=config.overwrite, resume=config.resume)
        plans = Planner(first_items, dtype, config.codec, layouts)
        return [open_or_create(path, _attrs(src, config, backbone, layer, shapes[layer], dtype), layouts[layer],
                               resume=config.resume, plan=functools.partial(plans, layer))
                for path, layer in zip(paths, layers)]

    return write_stores(ranks, paths, layers, create, jobs, layouts,
                        lambda v, scales: _forward(backbone, src, layers, v, dtype, config.batch_size, scales),
                        device, progress, sources=[config.source])


def derived_shapes(src: Cache, backbone: Backbone, layers: list[int]) -> dict[int, tuple[int, ...]]:
    """Sample shape at each later layer, probed from the source's sample shape on the backbone's device."""
    return {layer: backbone.input_shape(layer, start=src.layer, start_shape=src.sample_shape) for layer in layers}


def _attrs(src: Cache, config: DeriveConfig, backbone: Backbone, layer: int, shape: tuple[int, ...],
           dtype: str) -> dict:
    attrs = {k: v for k, v in src.attrs.items() if k not in ("status", "finished")}
    attrs.update({
        "layer": {"index": layer, "name": backbone.block_names[layer - 1], "num_blocks": backbone.num_blocks},
        "sample_shape": list(shape), "dtype": dtype,
        "source": {"cache": src.identity(), "images": src.attrs.get("source")},
        "build": {"derived_from": config.source, "source_layer": src.layer, "source_build": src.attrs.get("build"),
                  "dtype": dtype, "batch_size": config.batch_size, "batching": BATCHING, "chunk_mb": config.chunk_mb,
                  "codec": config.codec, "shard_mb": config.shard_mb},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    })
    return attrs


def _job(src: Cache, split: str, batch: int) -> Job:
    s = src.split(split)
    views = {"x": s.x, **({"x_flip": s.x_flip} if s.x_flip is not None else {})}

    def load(a: int, b: int) -> dict[str, torch.Tensor]:
        return {name: from_storage(read(arr, slice(a, b)), src.dtype) for name, arr in views.items()}

    return Job(len(s), load, read(s.y, slice(None)), read(s.id, slice(None)), src.read_keys(split), batch=batch)


@torch.inference_mode()
def _forward(backbone: Backbone, src: Cache, layers: list[int], views: dict[str, torch.Tensor], dtype: str,
             batch: int, scales: dict | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Stored rows of the source (on the device; int8 dequantized there) → each layer's input, stored as dtype."""
    parts: dict[int, dict[str, list]] = {layer: {v: [] for v in views} for layer in layers}
    for view, x in views.items():
        for i in range(0, len(x), batch):
            h = src.decode(x[i:i + batch]).float()
            for layer, kept in capture_inputs(backbone, h, src.layer, layers, dtype, scales).items():
                parts[layer][view].append(kept)
    return join_views(parts)
