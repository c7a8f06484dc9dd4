"""One-line warnings when settings make a result mean little: an epoch of a handful of optimiser steps, a
profile whose best window is within noise (the seeds' spread) of the runner-up."""
from __future__ import annotations

import contextlib
import math

from .progress import warn

MIN_STEPS = 10  # optimiser steps per epoch below which an epoch is hardly training


def few_steps(examples: int, batch_size: int) -> str | None:
    """The warning for ``examples`` training examples at ``batch_size``, or None when an epoch has enough steps."""
    steps = max(1, math.ceil(examples / batch_size))
    if steps >= MIN_STEPS or examples < 1:
        return None
    batch = max(2, examples // MIN_STEPS)
    return (f"warning: {examples:,} training examples at batch {batch_size} make {steps} optimiser "
            f"step{'s' if steps > 1 else ''} per epoch; results may mean little: use --batch-size {batch} or less, "
            f"or more --examples")


_seen: set[str] | None = None  # inside `once()`: the warnings given so far


@contextlib.contextmanager
def once():
    """Within this block every warning `advise` is given is printed once, however many runs give it (a profile's
    runs); outside it, only the runs that show progress print theirs."""
    global _seen
    saved, _seen = _seen, set()
    try:
        yield
    finally:
        _seen = saved


def advise(text: str | None, loud: bool = False) -> None:
    """Print ``text`` (a warning, or None for nothing): once inside `once()`, else when ``loud``."""
    if text is None:
        return
    if _seen is not None:
        if text not in _seen:
            _seen.add(text)
            warn(text)
    elif loud:
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
