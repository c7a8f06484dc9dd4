"""The talk's greedy block selection: repeatedly add (or drop) the block that helps most on validation, stop when
the gain is under epsilon."""
from __future__ import annotations

import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ..backbones import Backbone
from ..bank import shared_bank
from ..batched import train_runs
from ..errors import BlockError, ConfigError
from ..evaluation import labels_for
from ..plotting import describe_runs, new_figure, save_figure
from ..progress import progress_bar
from ..store import Cache
from ..task import atomic_write, check_out_dir
from ..train import TrainConfig, TrainData, balanced_subset, check_train_config, open_for_training, train
from .runs import write_csv
from .windows import parse_range, spec_of, validation_split

if TYPE_CHECKING:
    from matplotlib.figure import Figure


@dataclass
class GreedyResult:
    path: list[dict]  # one row per step: blocks, score, change
    blocks: tuple[int, ...]
    score: float
    test_accuracy: float | None = None


def greedy_search(score: Callable[[tuple[int, ...]], float], candidates: Sequence[int], *, epsilon: float = 0.01,
                  start: str = "empty", consecutive: bool = False, max_blocks: int | None = None,
                  on_step: Callable[[dict], None] | None = None) -> GreedyResult:
    """The talk's greedy selection over any scorer.

    ``empty``: repeatedly add the block that helps most; stop when the best gain is below ``epsilon``.
    ``full``: start from all candidates and repeatedly drop the block whose removal hurts least; stop when every
    removal costs ``epsilon`` or more. ``consecutive`` keeps the set a window.
    """
    if start not in ("empty", "full"):
        raise BlockError(f"--start must be empty or full, got {start!r}")
    current = () if start == "empty" else tuple(sorted(candidates))
    best = score(current)
    path = [{"step": 0, "blocks": spec_of(current), "score": best, "change": "start"}]
    if on_step:
        on_step(path[-1])
    while True:
        moves = _moves(current, candidates, start, consecutive, max_blocks)
        if not moves:
            break
        scored = [(score(m), m) for m in moves]
        value, move = max(scored, key=lambda t: (t[0], [-b for b in t[1]]))  # ties: the earlier blocks
        gain = value - best
        if (start == "empty" and gain < epsilon) or (start == "full" and gain <= -epsilon):
            break
        changed = sorted(set(move) ^ set(current))
        current, best = move, value
        path.append({"step": len(path), "blocks": spec_of(current), "score": best,
                     "change": ("+" if start == "empty" else "-") + ",".join(map(str, changed))})
        if on_step:
            on_step(path[-1])
    return GreedyResult(path, current, best)


def _moves(current: tuple[int, ...], candidates: Sequence[int], start: str, consecutive: bool,
           max_blocks: int | None) -> list[tuple[int, ...]]:
    if start == "empty":
        if max_blocks is not None and len(current) >= max_blocks:
            return []
        free = [b for b in candidates if b not in current]
        if consecutive and current:
            free = [b for b in free if b in (current[0] - 1, current[-1] + 1)]
        return [tuple(sorted((*current, b))) for b in free]
    if len(current) <= 1:
        return []
    drops = [b for b in current if not consecutive or b in (current[0], current[-1])]
    return [tuple(b2 for b2 in current if b2 != b) for b in drops]


@dataclass(frozen=True)
class GreedyConfig:
    blocks: str | None = None  # candidate range; default: the cached layer to the last block
    epsilon: float = 0.01
    start: str = "empty"
    consecutive: bool = False
    max_blocks: int | None = None
    folds: int = 0  # ≥ 2: choose by k-fold cross-validation on the training split; 0: by test accuracy
    train: TrainConfig = field(default_factory=TrainConfig)
    val_fraction: float = 0.0  # > 0: choose on a validation set carved from the training split
    batch_runs: str = "auto"  # auto | off | K: a candidate's folds trained together as one batched model


def greedy_select(cache: Cache | str | os.PathLike, config: GreedyConfig = GreedyConfig(), *,
                  out: str | os.PathLike | None = None, backbone: Backbone | None = None,
                  progress: bool = False) -> GreedyResult:
    """Greedy block selection on a cache; the test split scores the final choice (or every step when folds=0)."""
    check_train_config(config.train)
    if not math.isfinite(config.epsilon):
        raise ConfigError(f"--epsilon must be a finite number, got {config.epsilon}")
    cache, backbone = open_for_training(cache, backbone)
    lo, hi = parse_range(config.blocks, cache, backbone)
    if config.folds == 1 or config.folds < 0:
        raise BlockError(f"--folds must be 0 (choose by test accuracy) or at least 2, got {config.folds}")
    if out:
        check_out_dir(out)
    if config.folds and config.val_fraction:
        raise ConfigError("--folds and --val-fraction both choose on held-out training data; give one of them")
    bank = shared_bank(cache, backbone, config.train.augment, config.train.device)
    tcfg = config.train
    memo: dict[tuple[int, ...], float] = {}
    split = validation_split(cache, tcfg, config.val_fraction)
    folds = _folds(cache, tcfg, config.folds) if config.folds else None if split is None else [split]

    with progress_bar(progress, "runs/s", every=0) as bar:  # in logs: a line per run
        task = bar.add_task("greedy run", total=None)

        def score(blocks: tuple[int, ...]) -> float:
            if blocks not in memo:
                cfg = replace(tcfg, blocks=spec_of(blocks))
                if folds is None:
                    memo[blocks] = train(cache, cfg, TrainData(bank=bank), backbone=backbone).test_accuracy
                else:
                    jobs = [(cfg, TrainData(fit, eval_positions=held_out, bank=bank)) for fit, held_out in folds]
                    memo[blocks] = statistics.fmean(r.test_accuracy for r in train_runs(
                        cache, jobs, backbone=backbone, batch_runs=config.batch_runs))
                bar.advance(task, note=f"blocks {spec_of(blocks)}: score {memo[blocks]:.4f}")
            return memo[blocks]

        result = greedy_search(score, list(range(lo, hi + 1)), epsilon=config.epsilon, start=config.start,
                               consecutive=config.consecutive, max_blocks=config.max_blocks)
    final = train(cache, replace(tcfg, blocks=spec_of(result.blocks)),
                  TrainData(None if split is None else split[0], bank=bank), backbone=backbone)
    result.test_accuracy = final.test_accuracy
    if out:
        _save_greedy(out, result, config, cache)
    return result


def _folds(cache: Cache, config: TrainConfig, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """k stratified-by-shuffle folds over the (limited) training subset: (fit positions, held-out positions)."""
    labels = labels_for(cache, config.train_split, config.labels)[0].numpy()
    pool = balanced_subset(labels, config.limit, config.seed)
    pool = np.arange(len(labels)) if pool is None else pool
    if k > len(pool):
        raise ConfigError(f"--folds {k} is more than the {len(pool)} training examples; use at most {len(pool)}")
    pool = np.random.default_rng(config.seed).permutation(pool)
    parts = np.array_split(pool, k)
    return [(np.sort(np.concatenate(parts[:i] + parts[i + 1:])), np.sort(parts[i])) for i in range(k)]


def _save_greedy(out: str, result: GreedyResult, config: GreedyConfig, cache: Cache) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "greedy.json").write_text(json.dumps(
        {"cache": cache.path, "config": asdict(config), "path": result.path,
         "blocks": list(result.blocks), "score": result.score, "test_accuracy": result.test_accuracy}, indent=1))
    atomic_write(folder / "greedy.csv", lambda tmp: write_csv(tmp, ("step", "blocks", "change", "score"),
                                                              result.path))
    plot_greedy(result, folder / "greedy.png", cache, config)


def plot_greedy(result: GreedyResult, path: str | os.PathLike | None, cache: Cache,
                config: GreedyConfig = GreedyConfig()) -> "Figure":
    """Score after each greedy step (x: steps 0, 1, 2 …), each point labelled with the chosen blocks."""
    fig, ax = new_figure(6, 3.8)
    ax.plot([p["step"] for p in result.path], [p["score"] for p in result.path], marker="o")
    for p in result.path:
        ax.annotate(p["blocks"], (p["step"], p["score"]), textcoords="offset points", xytext=(0, 6), fontsize=8,
                    ha="center")
    ax.set_xticks(range(len(result.path)))
    ax.margins(y=0.15)  # room for the labels above the points
    ax.set_xlabel("greedy step (blocks chosen so far)")
    ax.set_ylabel("validation accuracy" if config.val_fraction else
                  f"{config.folds}-fold validation accuracy" if config.folds else "test accuracy")
    ax.set_title(f"Greedy selection (ε = {config.epsilon}): {cache.backbone['model']}\n"
                 f"{describe_runs(cache, config.train)}", fontsize=10)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)
