"""Finetuning profiles and greedy block selection, all from one cache (paper §2, the talk's greedy procedure).

(Not named `profile.py`: that would shadow the standard library's profiler.)
"""
from __future__ import annotations

import csv
import json
import math
import os
import statistics
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .backbones import Backbone
from .devices import resolve_device
from .bank import ActivationBank
from .batched import dealt, groups, parse_batch_runs, run_windows
from .distributed import Dist
from .errors import BlockError, ConfigError, DataError
from .evaluation import labels_for
from .labels import check_identity, data_identity
from .loader import memory_budget, split_nbytes
from .progress import progress_bar
from .settings import require_same, upgraded_train
from .store import Cache
from .task import atomic_write, check_out_dir
from .train import TrainConfig, TrainData, balanced_subset, check_train_config, open_for_training, train

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure


# -- windows -------------------------------------------------------------------------------------------------------
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


def shared_bank(cache: Cache, backbone: Backbone, config: TrainConfig) -> ActivationBank | None:
    """A bank when runs can share frozen activations: no augmentation, and the splits fit comfortably."""
    if config.augment not in ("none", "", None):
        return None
    device = resolve_device(config.device)
    need = sum(split_nbytes(cache, s, len(cache.split(s))) * 4 for s in cache.splits)  # stored dtype, a few layers
    return ActivationBank(cache, backbone, device) if need <= memory_budget(device) else None


# -- profile -------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProfileConfig:
    blocks: str | None = None  # range LOW-HIGH; default: the cached layer to the last block
    widths: tuple[int, ...] = (1,)
    seeds: int = 1  # runs per window (seeds 0..K-1): mean ± std
    probe: bool = True  # also the linear probe, the baseline line
    train: TrainConfig = field(default_factory=TrainConfig)
    val_fraction: float = 0.0  # > 0: carve a validation set from the training split and select on it
    halving: bool = False  # successive halving instead of training every window to the end
    eta: int = 3  # halving: keep the best 1/eta of the windows at each rung
    min_epochs: int = 1  # halving: epochs of the first rung (×eta per rung, up to train.epochs)
    prior: str | None = None  # halving: "rank" keeps rank's best 1/eta windows before the first rung
    batch_runs: str = "auto"  # auto | off | K: a window's seeds trained together as one batched model (`batched`)


FIELDS = ("blocks", "first", "width", "seed", "test_accuracy", "val_accuracy", "trainable_params", "seconds")


@dataclass
class ProfileResult:
    rows: list[dict]
    out: str | None = None

    def summary(self) -> list[dict]:
        """Mean ± std over seeds per window, sorted by width then first block."""
        groups: dict[tuple, list[dict]] = {}
        for r in self.rows:
            groups.setdefault((r["width"], r["first"], r["blocks"]), []).append(r)
        out = []
        for (width, first, blocks), rs in sorted(groups.items()):
            accs = [r["test_accuracy"] for r in rs]
            out.append({"blocks": blocks, "first": first, "width": width, "runs": len(rs),
                        "mean": statistics.fmean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                        "trainable_params": rs[0]["trainable_params"]})
            if all(r.get("val_accuracy") is not None for r in rs):
                out[-1]["val_mean"] = statistics.fmean(r["val_accuracy"] for r in rs)
        return out

    def best(self) -> dict | None:
        """The window a tool would pick: best mean validation accuracy when measured, else best test accuracy."""
        windows_only = [s for s in self.summary() if s["width"] > 0]
        return max(windows_only, key=lambda s: s.get("val_mean", s["mean"])) if windows_only else None


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
    rows = _load_rows(out, config.train, data_identity(cache, config.train.labels),
                      extra={"val_fraction": config.val_fraction})
    done = {(r["blocks"], r["seed"]) for r in rows}
    todo = [(w, win, seed) for w, win in plan for seed in range(config.seeds) if (spec_of(win), seed) not in done]
    bank, main = shared_bank(cache, backbone, config.train), Dist.from_env().main
    with progress_bar(progress and main, "runs/s", every=0) as bar:  # in logs: a line per run
        task = bar.add_task("profile", total=len(plan) * config.seeds, completed=len(plan) * config.seeds - len(todo))
        most = parse_batch_runs(config.batch_runs, resolve_device(config.train.device))
        def work(group: list[tuple]) -> list[dict]:
            configs = [replace(config.train, blocks=spec_of(win), seed=seed) for _, win, seed in group]
            return run_windows(cache, configs, backbone, bank, split, config.batch_runs)

        # a window's seeds, up to `most` as one batched model; under torchrun, dealt to ranks (rank 0 saves)
        for group, runs in dealt(groups(todo, lambda t: t[1], most), work):
            for (width, win, seed), run in zip(group, runs):
                row = {"blocks": spec_of(win), "first": win[0] if win else 0, "width": width, "seed": seed, **run}
                rows.append(row)
                if out and main:
                    _save(out, rows, config, cache)
                if on_run:
                    on_run(row)
                bar.advance(task, note=f"blocks {row['blocks']} seed {seed}: test accuracy "
                                       f"{row['test_accuracy']:.4f}")
    result = ProfileResult(rows, out)
    if out and main:
        plot_profile(result, Path(out) / "profile.png", cache, config)
    return result


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


def run_window(cache: Cache, config: TrainConfig, backbone: Backbone, bank: ActivationBank | None,
               split: tuple[np.ndarray, np.ndarray] | None) -> dict:
    """One run: its test accuracy, and with a validation split also its validation accuracy (trained on fit)."""
    return run_windows(cache, [config], backbone, bank, split)[0]


def _load_rows(out: str | None, train_config: TrainConfig, identity: dict | None = None,
               name: str = "profile.json", extra: dict | None = None) -> list[dict]:
    """Finished runs of an earlier (interrupted) profile in ``out`` — refused if they were trained otherwise or
    (given ``identity``) on another cache or labels. ``extra``: further config fields that must match (absent from
    older files: read as 0.0)."""
    if not (out and (Path(out) / name).is_file()):
        return []
    saved = json.loads((Path(out) / name).read_text())
    if identity is not None:
        check_identity(saved.get("identity"), identity, out)
    before = {k: v for k, v in upgraded_train(saved["config"]["train"]).items() if k not in ("blocks", "seed")}
    now = {k: v for k, v in asdict(train_config).items() if k not in ("blocks", "seed")}
    before.update({k: saved["config"].get(k, 0.0) for k in extra or {}})
    now.update(extra or {})
    require_same(before, now, f"{out} holds a profile trained with other settings",
                 "use another --out or the same options")
    return list(saved["runs"])


def _save(out: str, rows: list[dict], config: ProfileConfig, cache: Cache) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"cache": cache.path, "identity": data_identity(cache, config.train.labels),
            "backbone": cache.backbone, "layer": cache.layer,
            "config": {**asdict(config), "train": asdict(config.train)}, "runs": rows}
    tmp = folder / "profile.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / "profile.json")  # atomic: a killed profile keeps every finished run
    atomic_write(folder / "profile.csv", lambda tmp: _write_csv(tmp, FIELDS, rows))


def _write_csv(path: str, fields: Sequence[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


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


# -- successive halving --------------------------------------------------------------------------------------------
HALVING_FIELDS = ("rung", "epochs", "blocks", "first", "width", "seed", "val_accuracy", "test_accuracy",
                  "trainable_params", "seconds", "flops")
DEFAULT_VAL_FRACTION = 0.2  # halving always selects on validation; this much when --val-fraction is not given


@dataclass
class HalvingResult:
    rows: list[dict]  # every run: rung, epochs, window, seed, validation/test accuracy, training FLOPs
    rungs: list[dict]  # per rung: epochs, windows trained, windows kept
    best: dict  # the window picked: blocks, val_accuracy, test_accuracy (means over seeds at the last rung)
    train_flops: float  # training compute spent: Σ epochs × fit samples × window FLOPs per sample
    full_flops: float  # the same for a full profile of every window with the same settings
    out: str | None = None

    @property
    def compute_fraction(self) -> float:
        return self.train_flops / self.full_flops

    def to_dict(self) -> dict:
        return {"best": self.best, "rungs": self.rungs, "compute_fraction": self.compute_fraction,
                "train_flops": self.train_flops, "full_profile_flops": self.full_flops, "runs": len(self.rows),
                "out": self.out}


def rung_epochs(min_epochs: int, epochs: int, eta: int, survivors: int) -> int:
    """Epochs of the next rung: ×eta, capped at the final epochs; a lone survivor goes straight to the end."""
    return epochs if survivors == 1 else min(epochs, min_epochs * eta)


def halving_profile(cache: Cache | str, config: ProfileConfig, *, out: str | None = None,
                    backbone: Backbone | None = None, progress: bool = False,
                    on_run: Callable[[dict], None] | None = None) -> HalvingResult:
    """Successive halving over the windows: train all briefly, keep the best 1/eta on validation, train those
    eta× longer (from scratch: the cosine schedule depends on the length), … until the survivors reach
    ``train.epochs``. Resumable through ``out`` (``halving.json``): finished runs are read back and skipped."""
    cache, backbone = open_for_training(cache, backbone)
    if config.eta < 2 or config.min_epochs < 1:
        raise BlockError(f"--eta must be at least 2 and --min-epochs at least 1, got {config.eta}, "
                         f"{config.min_epochs}")
    lo, hi = parse_range(config.blocks, cache, backbone)
    wins = [win for w in sorted(set(config.widths)) for win in windows(lo, hi, w)]
    fraction = config.val_fraction or DEFAULT_VAL_FRACTION
    rows = _load_rows(out, config.train, data_identity(cache, config.train.labels), "halving.json",
                      extra={"val_fraction": fraction, "eta": config.eta, "min_epochs": config.min_epochs})
    runner = _Rungs(cache, backbone, replace(config, val_fraction=fraction), rows, out, on_run)
    survivors = _prior(cache, config, backbone, wins) if config.prior else wins
    epochs, rungs = min(config.min_epochs, config.train.epochs), []
    with progress_bar(progress, "runs/s") as bar:
        task = bar.add_task("halving", total=None)
        while True:
            for win in survivors:  # a window's seeds: up to --batch-runs of them as one batched model
                bar.advance(task, runner.run(len(rungs), epochs, win, range(config.seeds)))
            ranked = _rung_ranking(rows, len(rungs), survivors)
            keep = ranked[:max(1, math.ceil(len(ranked) / config.eta))]
            last = epochs >= config.train.epochs
            rungs.append({"rung": len(rungs), "epochs": epochs, "windows": [spec_of(w) for w in survivors],
                          "kept": [spec_of(ranked[0])] if last else [spec_of(w) for w in keep]})
            if last:
                break
            epochs, survivors = rung_epochs(epochs, config.train.epochs, config.eta, len(keep)), keep
    n_fit = len(runner.split[0])
    full = sum(config.seeds * config.train.epochs * n_fit * runner.flops(w) for w in wins)
    result = HalvingResult(rows, rungs, _best(rows, len(rungs) - 1, ranked[0]),
                           sum(r["flops"] for r in rows if _in_rungs(r, rungs)), full, out)
    if out:
        _save_halving(out, rows, runner.config, cache, result)
    return result


class _Rungs:
    """Runs of a halving: trains a (rung, window, seed) unless a saved run has it; saves after each."""

    def __init__(self, cache: Cache, backbone: Backbone, config: ProfileConfig, rows: list[dict], out: str | None,
                 on_run: Callable[[dict], None] | None):
        self.cache, self.backbone, self.config, self.rows, self.out, self.on_run = (cache, backbone, config, rows,
                                                                                   out, on_run)
        self.split = validation_split(cache, config.train, config.val_fraction)
        self.bank = shared_bank(cache, backbone, config.train)
        self._flops: dict[tuple[int, ...], int] = {}

    def flops(self, win: tuple[int, ...]) -> int:
        """Training FLOPs per sample from the cache (bench's accounting: 3× tuned blocks + 2× the rest)."""
        from .bench import training_flops

        if win not in self._flops:
            self._flops[win] = training_flops(self.backbone, win)[1]
        return self._flops[win]

    def run(self, rung: int, epochs: int, win: tuple[int, ...], seeds: Sequence[int]) -> int:
        """Train (rung, window, seed) for the seeds no saved run has; how many were trained."""
        todo = [seed for seed in seeds if _find(self.rows, rung, win, seed) is None]
        configs = [replace(self.config.train, blocks=spec_of(win), seed=seed, epochs=epochs) for seed in todo]
        for seed, run in zip(todo, run_windows(self.cache, configs, self.backbone, self.bank, self.split,
                                               self.config.batch_runs)):
            row = {"rung": rung, "epochs": epochs, "blocks": spec_of(win), "first": win[0], "width": len(win),
                   "seed": seed, "flops": epochs * len(self.split[0]) * self.flops(win), **run}
            self.rows.append(row)
            if self.out:
                _save_halving(self.out, self.rows, self.config, self.cache)
            if self.on_run:
                self.on_run(row)
        return len(todo)


def _find(rows: list[dict], rung: int, win: tuple[int, ...], seed: int) -> dict | None:
    return next((r for r in rows if (r["rung"], r["blocks"], r["seed"]) == (rung, spec_of(win), seed)), None)


def _in_rungs(row: dict, rungs: list[dict]) -> bool:
    """Whether a saved run belongs to this halving's schedule (a resumed file may hold no others, but be safe)."""
    return row["rung"] < len(rungs) and row["blocks"] in rungs[row["rung"]]["windows"]


def _rung_ranking(rows: list[dict], rung: int, survivors: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Survivors best first by mean validation accuracy over seeds; ties: the earlier, narrower window."""
    def val(win: tuple[int, ...]) -> float:
        return statistics.fmean(r["val_accuracy"] for r in rows if (r["rung"], r["blocks"]) == (rung, spec_of(win)))

    return sorted(survivors, key=lambda w: (-val(w), len(w), w[0]))


def _best(rows: list[dict], rung: int, win: tuple[int, ...]) -> dict:
    runs = [r for r in rows if (r["rung"], r["blocks"]) == (rung, spec_of(win))]
    return {"blocks": spec_of(win), "width": len(win), "epochs": runs[0]["epochs"],
            "val_accuracy": statistics.fmean(r["val_accuracy"] for r in runs),
            "test_accuracy": statistics.fmean(r["test_accuracy"] for r in runs)}


def _prior(cache: Cache, config: ProfileConfig, backbone: Backbone,
           wins: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """`--prior rank`: the best 1/eta of the windows by rank's score, before any training."""
    if config.prior != "rank":
        raise BlockError(f"--prior must be rank, got {config.prior!r}")
    from .rank import RankConfig, rank_windows

    ranking = rank_windows(cache, RankConfig(blocks=config.blocks, widths=config.widths, train=config.train,
                                             val_fraction=config.val_fraction or DEFAULT_VAL_FRACTION),
                           backbone=backbone).ranking
    order = [tuple(r["window"]) for r in ranking]
    return sorted(order[:max(1, math.ceil(len(order) / config.eta))], key=wins.index)


def _save_halving(out: str, rows: list[dict], config: ProfileConfig, cache: Cache,
                  result: HalvingResult | None = None) -> None:
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"cache": cache.path, "identity": data_identity(cache, config.train.labels), "backbone": cache.backbone,
            "layer": cache.layer, "config": {**asdict(config), "train": asdict(config.train)}, "runs": rows,
            **({**result.to_dict(), "complete": True} if result else {"complete": False})}
    tmp = folder / "halving.json.tmp"
    tmp.write_text(json.dumps(meta, indent=1))
    tmp.replace(folder / "halving.json")  # atomic: a killed run keeps every finished run
    with open(folder / "halving.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=HALVING_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# -- greedy ----------------------------------------------------------------------------------------------------------
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
    bank = shared_bank(cache, backbone, config.train)
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
                    memo[blocks] = statistics.fmean(
                        train(cache, cfg, TrainData(fit_idx, eval_positions=val_idx, bank=bank),
                              backbone=backbone).test_accuracy for fit_idx, val_idx in folds)
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
        {"cache": cache.path, "config": {**asdict(config), "train": asdict(config.train)}, "path": result.path,
         "blocks": list(result.blocks), "score": result.score, "test_accuracy": result.test_accuracy}, indent=1))
    atomic_write(folder / "greedy.csv", lambda tmp: _write_csv(tmp, ("step", "blocks", "change", "score"),
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

