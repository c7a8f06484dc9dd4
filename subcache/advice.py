"""One-line warnings when settings make a result mean little: an epoch of a handful of optimiser steps, a
profile whose best window is within noise (the seeds' spread) of the runner-up."""
from __future__ import annotations

import math

from .progress import warn

MIN_STEPS = 10  # optimiser steps per epoch below which an epoch is hardly training


def few_steps(examples: int, batch_size: int, epochs: int) -> str | None:
    """The warning for ``examples`` training examples at ``batch_size``, or None when an epoch has enough steps."""
    steps = max(1, math.ceil(examples / batch_size))
    if steps >= MIN_STEPS or examples < 1:
        return None
    batch = max(2, examples // MIN_STEPS)
    return (f"warning: {examples:,} training examples at batch {batch_size} make {steps} optimiser "
            f"step{'s' if steps > 1 else ''} per epoch ({steps * epochs} in all); results may mean little: use "
            f"--batch-size {batch} or less, or more --examples")


def training_examples(cache, config, val_fraction: float = 0.0) -> int:
    """How many examples a run of ``config`` on ``cache`` trains on (the --examples subset, less validation)."""
    n = len(cache.split(config.train_split))
    n = min(n, config.limit) if config.limit else n
    return n - round(val_fraction * n)


def warn_few_steps(cache, config, val_fraction: float = 0.0) -> None:
    text = few_steps(training_examples(cache, config, val_fraction), config.batch_size, config.epochs)
    if text:
        warn(text)


def within_noise(summary: list[dict], best: dict | None) -> str | None:
    """The warning when the best window's mean (validation when measured) is within the larger of the two
    seeds' standard deviations of the runner-up's; None with one seed (no spread to judge by) or no rival."""
    if best is None or best.get("runs", 1) < 2:
        return None
    key = "val_mean" if "val_mean" in best else "mean"
    rivals = [s for s in summary if s["width"] > 0 and s["blocks"] != best["blocks"] and key in s]
    if not rivals:
        return None
    second = max(rivals, key=lambda s: s[key])
    noise = max(best["std"], second["std"])
    if best[key] - second[key] > noise:
        return None
    what = "validation" if key == "val_mean" else "test"
    return (f"warning: the best window {best['blocks']} ({what} {best[key]:.4f}) is within noise of the runner-up "
            f"{second['blocks']} ({second[key]:.4f}; seeds' std up to {noise:.4f}): the pick is not settled — "
            f"more --repeats, --examples or --epochs")
