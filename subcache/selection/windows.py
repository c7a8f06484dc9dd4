"""Where selection looks: block ranges, the windows inside them, their spelling, and the validation split every
selection method shares (carved from the training split; the test split only reports)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..backbones import Backbone
from ..errors import BlockError, DataError
from ..evaluation import labels_for
from ..store import Cache
from ..train import TrainConfig, balanced_subset


def parse_range(spec: str | None, cache: Cache, backbone: Backbone) -> tuple[int, int]:
    """``8-16`` (or None: the cached layer to the last block) → (lo, hi), checked against the cache."""
    if spec is None:
        return cache.layer, backbone.num_blocks
    parts = spec.split("-")
    if len(parts) != 2 or not all(p.strip() for p in parts):
        raise BlockError(f"block range {spec!r} must be LOW-HIGH, e.g. {cache.layer}-{backbone.num_blocks}: --range "
                         f"bounds the windows tried (the set of blocks to tune, like 13,15, is train's --blocks)")
    lo, hi = (backbone.resolve(p) for p in parts)
    if hi < lo:
        raise BlockError(f"block range {spec!r} is reversed; write {hi}-{lo}")
    if lo < cache.layer:
        raise BlockError(f"block range {spec!r} starts before this cache's layer: the earliest block it can train "
                         f"is {cache.layer} ({cache.layer_name})")
    return lo, hi


def windows(lo: int, hi: int, width: int) -> list[tuple[int, ...]]:
    """Every run of ``width`` consecutive blocks inside [lo, hi]."""
    if width < 1:
        raise BlockError(f"window width must be at least 1, got {width}")
    if width > hi - lo + 1:
        raise BlockError(f"width {width} is larger than the range {lo}-{hi} ({hi - lo + 1} blocks)")
    return [tuple(range(s, s + width)) for s in range(lo, hi - width + 2)]


def spec_of(blocks: Sequence[int]) -> str:
    if not blocks:
        return "none"
    blocks = sorted(blocks)
    if blocks == list(range(blocks[0], blocks[-1] + 1)) and len(blocks) > 1:
        return f"{blocks[0]}-{blocks[-1]}"
    return ",".join(map(str, blocks))


def validation_split(cache: Cache, config: TrainConfig, fraction: float) -> tuple[np.ndarray, np.ndarray] | None:
    """(fit, validation) positions in the training split, or None when ``fraction`` is 0.

    The pool is the ``--limit`` subset drawn with seed 0 (all of the split without a limit); the validation set is
    a class-balanced ``fraction`` of the pool drawn with seed 1, the same for every run and seed, disjoint from fit.
    """
    if not fraction:
        return None
    if not 0 < fraction < 1:
        raise DataError(f"--val-fraction must be between 0 and 1 (e.g. 0.2), got {fraction}")
    labels = labels_for(cache, config.train_split, config.labels)[0].numpy()
    pool = balanced_subset(labels, config.limit, 0)
    pool = np.arange(len(labels)) if pool is None else pool
    count = round(fraction * len(pool))
    if count < 1 or len(pool) - count < 2:
        raise DataError(f"--val-fraction {fraction} of {len(pool)} training examples leaves {count} for validation "
                        f"and {len(pool) - count} for training; each needs at least 1 (training 2)")
    val = pool[balanced_subset(labels[pool], count, 1)]
    return np.setdiff1d(pool, val), val

