"""`profile --halving`: successive halving over the windows, on a validation split, with its compute counted."""
from __future__ import annotations

import math
import os
import statistics
from dataclasses import asdict, dataclass, replace
from typing import Callable

from ..backbones import Backbone
from ..bank import shared_bank
from ..batched import dealt, groups, parse_batch_runs, run_windows
from ..devices import resolve_device
from ..distributed import Dist
from ..errors import BlockError
from ..labels import data_identity
from ..progress import progress_bar
from ..store import Cache
from ..train import open_for_training
from .flops import training_flops
from .rank import RankConfig, rank_windows
from .runs import ProfileConfig, load_rows, save_runs
from .windows import parse_range, spec_of, validation_split, windows


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


def planned_runs(windows: int, epochs: int, config: ProfileConfig) -> int:
    """How many runs a halving from ``windows`` windows at ``epochs`` epochs makes (its rungs' sizes × seeds)."""
    total = 0
    while True:
        total += windows * config.seeds
        if epochs >= config.train.epochs:
            return total
        windows = max(1, math.ceil(windows / config.eta))
        epochs = rung_epochs(epochs, config.train.epochs, config.eta, windows)


def run_note(row: dict) -> str:
    """``rung 1 (3 epochs) blocks 13-14 seed 0: val 0.8125 test 0.8010``: a halving run's progress line."""
    def acc(key: str) -> str:
        return "–" if row.get(key) is None else f"{row[key]:.4f}"

    return (f"rung {row['rung']} ({row['epochs']} epochs) blocks {row['blocks']} seed {row['seed']}: "
            f"val {acc('val_accuracy')} test {acc('test_accuracy')}")


def halving_profile(cache: Cache | str, config: ProfileConfig, *, out: str | os.PathLike | None = None,
                    backbone: Backbone | None = None, progress: bool = False,
                    on_run: Callable[[dict], None] | None = None) -> HalvingResult:
    """Successive halving over the windows: train all briefly, keep the best 1/eta on validation, train those
    eta× longer (from scratch: the cosine schedule depends on the length), … until the survivors reach
    ``train.epochs``. Resumable through ``out`` (``halving.json``): finished runs are read back and skipped."""
    cache, backbone = open_for_training(cache, backbone)
    out = os.fspath(out) if out else None  # a str in the result (a Path would not serialise into halving.json)
    if config.eta < 2 or config.min_epochs < 1:
        raise BlockError(f"--eta must be at least 2 and --min-epochs at least 1, got {config.eta}, "
                         f"{config.min_epochs}")
    lo, hi = parse_range(config.blocks, cache, backbone)
    wins = [win for w in sorted(set(config.widths)) for win in windows(lo, hi, w)]
    fraction = config.val_fraction or DEFAULT_VAL_FRACTION
    rows = load_rows(out, config.train, data_identity(cache, config.train.labels), "halving.json",
                      extra={"val_fraction": fraction, "eta": config.eta, "min_epochs": config.min_epochs,
                             "blocks": config.blocks, "widths": list(config.widths), "prior": config.prior})
    runner = _Rungs(cache, backbone, replace(config, val_fraction=fraction), rows, out, on_run)
    survivors = _prior(cache, config, backbone, wins) if config.prior else wins
    epochs, rungs = min(config.min_epochs, config.train.epochs), []
    with progress_bar(progress and runner.main, "runs/s", every=0) as bar:  # in logs: a line per run
        task = bar.add_task("halving", total=planned_runs(len(survivors), epochs, config))
        while True:
            runner.rung(len(rungs), epochs, survivors, lambda note: bar.advance(task, note=note))
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
    if out and runner.main:
        _save_halving(out, rows, runner.config, cache, result)
    return result


class _Rungs:
    """Runs of a halving: trains a rung's (window, seed) runs that no saved run has, saving after each; under
    torchrun the runs are dealt to ranks (each trains whole runs alone), every rank gets every row, rank 0 saves."""

    def __init__(self, cache: Cache, backbone: Backbone, config: ProfileConfig, rows: list[dict], out: str | None,
                 on_run: Callable[[dict], None] | None):
        self.cache, self.backbone, self.config, self.rows, self.out, self.on_run = (cache, backbone, config, rows,
                                                                                   out, on_run)
        self.main = Dist.from_env().main
        self.split = validation_split(cache, config.train, config.val_fraction)
        self.bank = shared_bank(cache, backbone, config.train.augment, config.train.device)
        self._flops: dict[tuple[int, ...], int] = {}

    def flops(self, win: tuple[int, ...]) -> int:
        """Training FLOPs per sample from the cache (bench's accounting: 3× tuned blocks + 2× the rest)."""
        if win not in self._flops:
            self._flops[win] = training_flops(self.backbone, win)[1]
        return self._flops[win]

    def rung(self, rung: int, epochs: int, survivors: list[tuple[int, ...]], advance: Callable[[str], None]) -> None:
        """Train the rung's (window, seed) runs that no saved run has: a window's seeds, up to ``--batch-runs`` of
        them, as one batched model; ``advance`` gets a note per run (saved runs first)."""
        seeds = range(self.config.seeds)
        saved = {(win, seed): _find(self.rows, rung, win, seed) for win in survivors for seed in seeds}
        for row in filter(None, saved.values()):
            advance(run_note(row) + " (saved)")
        todo = [run for run, row in saved.items() if row is None]
        most = parse_batch_runs(self.config.batch_runs, resolve_device(self.config.train.device))

        def work(group: list[tuple]) -> list[dict]:
            configs = [replace(self.config.train, blocks=spec_of(win), seed=seed, epochs=epochs)
                       for win, seed in group]
            return run_windows(self.cache, configs, self.backbone, self.bank, self.split, self.config.batch_runs)

        for group, runs in dealt(groups(todo, lambda t: t[0], most), work):
            for (win, seed), run in zip(group, runs):
                self._add({"rung": rung, "epochs": epochs, "blocks": spec_of(win), "first": win[0],
                           "width": len(win), "seed": seed, "flops": epochs * len(self.split[0]) * self.flops(win),
                           **run})
                advance(run_note(self.rows[-1]))

    def _add(self, row: dict) -> None:
        self.rows.append(row)
        if self.out and self.main:
            _save_halving(self.out, self.rows, self.config, self.cache)
        if self.on_run:
            self.on_run(row)


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
    ranking = rank_windows(cache, RankConfig(blocks=config.blocks, widths=config.widths, train=config.train,
                                             val_fraction=config.val_fraction or DEFAULT_VAL_FRACTION),
                           backbone=backbone).ranking
    order = [tuple(r["window"]) for r in ranking]
    return sorted(order[:max(1, math.ceil(len(order) / config.eta))], key=wins.index)


def _save_halving(out: str, rows: list[dict], config: ProfileConfig, cache: Cache,
                  result: HalvingResult | None = None) -> None:
    meta = {"cache": cache.path, "identity": data_identity(cache, config.train.labels), "backbone": cache.backbone,
            "layer": cache.layer, "config": asdict(config),
            **({**result.to_dict(), "complete": True} if result else {"complete": False}),
            "runs": rows}  # every run's row (to_dict's "runs" is their count): what a rerun reads back
    save_runs(out, "halving", meta, HALVING_FIELDS, rows)

