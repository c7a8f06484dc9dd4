"""The finetuning profile (paper §2): train every window of each width in a range from one cache, mean ± std over
seeds, resumable (``profile.json``), plotted; `--halving` hands over to successive halving."""
from __future__ import annotations

import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from ..backbones import Backbone
from ..bank import shared_bank
from ..batched import dealt, groups, parse_batch_runs, run_windows
from ..devices import resolve_device
from ..distributed import Dist
from ..errors import BlockError
from ..labels import data_identity
from ..plotting import describe_runs, new_figure, save_figure
from ..progress import progress_bar
from ..store import Cache
from ..task import check_out_dir
from ..train import check_train_config, open_for_training
from .halving import halving_profile
from .runs import FIELDS, ProfileConfig, ProfileResult, load_rows, save_runs
from .windows import parse_range, spec_of, validation_split, windows

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def profile_blocks(cache: Cache | str | os.PathLike, config: ProfileConfig = ProfileConfig(), *,
                   out: str | os.PathLike | None = None, backbone: Backbone | None = None, progress: bool = False,
                   on_run: Callable[[dict], None] | None = None) -> ProfileResult:
    """Train every window of each width in the range (and the probe) from one cache. Resumable through ``out``:
    finished runs are read back from ``profile.json`` and skipped."""
    check_train_config(config.train)
    cache, backbone = open_for_training(cache, backbone)
    lo, hi = parse_range(config.blocks, cache, backbone)
    if config.seeds < 1:
        raise BlockError(f"--seeds must be at least 1, got {config.seeds}")
    if config.halving:
        return halving_profile(cache, config, out=out, backbone=backbone, progress=progress, on_run=on_run)
    split = validation_split(cache, config.train, config.val_fraction)
    plan = [(w, win) for w in sorted(set(config.widths)) for win in windows(lo, hi, w)]
    if config.probe:
        plan.insert(0, (0, ()))
    if out:
        check_out_dir(out)
    rows = load_rows(out, config.train, data_identity(cache, config.train.labels),
                      extra={"val_fraction": config.val_fraction})
    done = {(r["blocks"], r["seed"]) for r in rows}
    todo = [(w, win, seed) for w, win in plan for seed in range(config.seeds) if (spec_of(win), seed) not in done]
    main = Dist.from_env().main
    with progress_bar(progress and main, "runs/s", every=0) as bar:  # in logs: a line per run
        task = bar.add_task("profile", total=len(plan) * config.seeds, completed=len(plan) * config.seeds - len(todo))
        for row in _run_all(cache, config, backbone, split, todo):
            rows.append(row)
            if out and main:
                save_profile(out, rows, config, cache)
            if on_run:
                on_run(row)
            bar.advance(task, note=f"blocks {row['blocks']} seed {row['seed']}: test accuracy "
                                   f"{row['test_accuracy']:.4f}")
    result = ProfileResult(rows, out)
    if out and main:
        plot_profile(result, Path(out) / "profile.png", cache, config)
    return result


def _run_all(cache: Cache, config: ProfileConfig, backbone: Backbone, split, todo: list[tuple]) -> Iterator[dict]:
    """The rows of the (width, window, seed) runs to do, in order: a window's seeds, up to ``--batch-runs`` of
    them, as one batched model; under torchrun, groups dealt to ranks (every rank yields every row)."""
    bank = shared_bank(cache, backbone, config.train.augment, config.train.device)
    most = parse_batch_runs(config.batch_runs, resolve_device(config.train.device))

    def work(group: list[tuple]) -> list[dict]:
        configs = [replace(config.train, blocks=spec_of(win), seed=seed) for _, win, seed in group]
        return run_windows(cache, configs, backbone, bank, split, config.batch_runs)

    for group, runs in dealt(groups(todo, lambda t: t[1], most), work):
        for (width, win, seed), run in zip(group, runs):
            yield {"blocks": spec_of(win), "first": win[0] if win else 0, "width": width, "seed": seed, **run}


def save_profile(out: str, rows: list[dict], config: ProfileConfig, cache: Cache) -> None:
    meta = {"cache": cache.path, "identity": data_identity(cache, config.train.labels),
            "backbone": cache.backbone, "layer": cache.layer,
            "config": asdict(config), "runs": rows}
    save_runs(out, "profile", meta, FIELDS, rows)


def plot_profile(result: ProfileResult, path: str | os.PathLike | None, cache: Cache,
                 config: ProfileConfig = ProfileConfig()) -> "Figure":
    """Accuracy vs first block of the window, one line per width with mean ± std bands, the probe as a line with
    its own band, the best window starred. Returns the figure (also written to ``path`` when given)."""
    from matplotlib.ticker import MaxNLocator

    summary = result.summary()
    fig, ax = new_figure(7, 4.4)
    for width in sorted({s["width"] for s in summary if s["width"] > 0}):
        pts = [s for s in summary if s["width"] == width]
        x = np.array([p["first"] for p in pts])
        m, sd = np.array([p["mean"] for p in pts]), np.array([p["std"] for p in pts])
        ax.plot(x, m, marker="o", label=f"{width} block{'s' if width > 1 else ''}")
        ax.fill_between(x, m - sd, m + sd, alpha=0.2)
    probe = [s for s in summary if s["width"] == 0]
    if probe:
        m, sd = probe[0]["mean"], probe[0]["std"]
        ax.axhline(m, color="gray", linestyle="--", label="linear probe (± std)", gid="probe")
        ax.axhspan(m - sd, m + sd, color="gray", alpha=0.15, gid="probe-band")
    best = result.best()
    if best:
        ax.plot([best["first"]], [best["mean"]], marker="*", markersize=16, linestyle="none", color="crimson",
                label=f"best: blocks {best['blocks']} ({best['mean']:.3f})", gid="best-window", zorder=5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("first block of the tuned window")
    ax.set_ylabel(f"test accuracy (mean ± std over {config.seeds} seed{'s' if config.seeds > 1 else ''})")
    ax.set_title(f"Finetuning profile: {cache.backbone['model']}, cache at block {cache.layer}\n"
                 f"{describe_runs(cache, config.train, config.seeds)}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
