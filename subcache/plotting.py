"""Figures on their own Agg canvas (matplotlib's object API, leaving the caller's backend and pyplot alone), and the
title line that says what was run. Shared by selection and active learning."""
from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from .store import Cache

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from .train import TrainConfig


def new_figure(width: float, height: float) -> tuple["Figure", "Axes"]:
    """A figure on its own Agg canvas: matplotlib's object API, leaving the caller's backend and pyplot alone."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def save_figure(fig: "Figure", path: str | os.PathLike | None) -> "Figure":
    fig.tight_layout()
    if path is not None:
        fig.savefig(path)
    return fig


def describe_runs(cache: Cache, config: TrainConfig, seeds: int | None = None, examples: bool = True) -> str:
    """A title's second line: ``quadrants.npz, 1,000 training examples, 10 epochs, 3 seeds``."""
    n = len(cache.split(config.train_split))
    parts = [Path(str(cache.attrs["data"])).name]
    if examples:
        parts.append(f"{n if config.limit is None else min(config.limit, n):,} training examples")
    parts.append(f"{config.epochs} epoch{'s' if config.epochs > 1 else ''}")
    parts.append(f"seed {config.seed}" if seeds is None else f"{seeds} seed{'s' if seeds > 1 else ''}")
    return ", ".join(parts)

