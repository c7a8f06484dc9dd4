"""Offline uncertainty scoring over a cached pool and pool-based active learning (paper §4.2).

Each round retrains the tuned blocks from the pretrained weights on the labelled set, scores the unlabelled pool
from the cache (no images), and labels the most uncertain items — by default the smallest classification margin
(top-1 minus top-2 probability).
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from .backbones import Backbone, parse_block_spec
from .bank import ActivationBank, shared_bank
from .errors import ConfigError, DataError
from .evaluation import cached_logits, labels_for, open_task
from .labels import check_identity, data_identity, label_classes
from .plotting import describe_runs, new_figure, save_figure
from .progress import progress_bar
from .settings import require_same, upgraded_train
from .store import Cache, read
from .task import atomic_write, check_out_dir
from .batched import dealt, parse_batch_runs, train_runs
from .devices import resolve_device
from .distributed import Dist
from .train import TrainConfig, TrainData, TrainResult, check_train_config, open_for_training, train
from .tuned import TunedModel

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = ("margin", "entropy", "least-confidence")
STRATEGIES = (*METRICS, "random")


# -- scores --------------------------------------------------------------------------------------------------------
def uncertainty(logits: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(raw score, uncertainty) per row; higher uncertainty = more worth labelling.

    margin: top-1 minus top-2 probability (uncertainty = -margin); entropy: -Σ p log p; least-confidence:
    1 - max p."""
    probs = logits.float().softmax(-1)
    if metric == "margin":
        top = probs.topk(2, dim=-1).values if probs.shape[-1] > 1 else torch.cat([probs, 0 * probs], -1)
        score = top[:, 0] - top[:, 1]
        return score, -score
    if metric == "entropy":
        score = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        return score, score
    if metric == "least-confidence":
        score = 1 - probs.max(-1).values
        return score, score
    raise ConfigError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")


def most_uncertain(values: np.ndarray, candidates: np.ndarray, k: int) -> np.ndarray:
    """The ``k`` candidates (positions) with the highest uncertainty; ties go to the smaller position."""
    if k > len(candidates):
        raise DataError(f"asked for {k} items but only {len(candidates)} remain unlabelled")
    order = np.lexsort((candidates, -values[candidates]))
    return candidates[order[:k]]


@dataclass
class PoolScores:
    ids: np.ndarray  # (N,) the cache's ids
    keys: np.ndarray  # (N,) str: where each item came from (path under the ImageFolder root, else its index)
    classes: list[str]  # the task's class names, by index
    positions: np.ndarray  # (N,) positions in the split
    score: np.ndarray  # raw metric value
    uncertainty: np.ndarray  # higher = more uncertain
    pred: np.ndarray  # predicted class
    prob: np.ndarray  # its probability
    metric: str

    def top(self, k: int) -> np.ndarray:
        """Indices (into these arrays) of the k most uncertain items."""
        return np.lexsort((self.positions, -self.uncertainty))[:k]

    def save(self, path: str | os.PathLike) -> None:
        p = Path(path)
        if p.suffix not in (".npz", ".csv"):
            raise DataError(f"unknown output format {p.suffix!r}; use .csv or .npz")
        p.parent.mkdir(parents=True, exist_ok=True)
        cols = {"id": self.ids, "key": self.keys, "score": self.score, "pred": self.pred_names(),
                "pred_index": self.pred, "prob": self.prob}
        atomic_write(p, lambda tmp: _write_npz(tmp, cols) if p.suffix == ".npz" else _write_rows(tmp, cols))

    def pred_names(self) -> np.ndarray:
        """The predicted class of each item, by name."""
        return np.asarray(self.classes, dtype=str)[self.pred] if len(self.pred) else np.array([], dtype=str)


def _write_npz(path: str, cols: dict[str, np.ndarray]) -> None:
    with open(path, "wb") as f:  # a file object: np.savez would append .npz to the temp name
        np.savez(f, **cols)


def _write_rows(path: str, cols: dict[str, np.ndarray]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        w.writerows(zip(*(c.tolist() for c in cols.values())))


def score_pool(cache: Cache | str | os.PathLike, task: str | os.PathLike, *, split: str = "train",
               metric: str = "margin", exclude: np.ndarray | None = None, device: str = "auto",
               backbone: Backbone | None = None, progress: bool = False) -> PoolScores:
    """Score every item of a cached split with a saved task (``exclude``: ids to leave out, e.g. labelled)."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    saved, cache, model, dev = open_task(task, cache, device, backbone)
    logits = cached_logits(model, cache, split, dev, progress=progress)
    ids = read(cache.split(split).id, slice(None))
    unknown = [] if exclude is None else np.setdiff1d(exclude, ids)
    if len(unknown):
        raise DataError(f"--exclude names {len(unknown)} ids that split {split} does not have (e.g. "
                        f"{unknown[:3].tolist()})")
    keep = np.ones(len(ids), bool) if exclude is None else ~np.isin(ids, exclude)
    score, unc = uncertainty(logits, metric)
    probs = logits.softmax(-1).max(-1)
    return PoolScores(ids[keep], cache.read_keys(split)[keep], list(saved.meta["classes"]), np.flatnonzero(keep),
                      score.numpy()[keep], unc.numpy()[keep],
                      probs.indices.numpy()[keep], probs.values.numpy()[keep], metric)


# -- active learning -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ALConfig:
    blocks: str = "none"
    budgets: tuple[int, ...] = (100, 500, 1000)  # labelled-set sizes after each round
    strategy: str = "margin"  # margin | entropy | least-confidence | random
    seeds: int = 1  # repetitions with different initial sets (and training seeds)
    oracle: str | None = None  # CSV id,label supplied by a person; None: labels come from the cache (simulation)
    batch_runs: str = "auto"  # auto | off | K: a round of K repeats as one batched model (not with an oracle)
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass
class ALResult:
    curve: list[dict]  # budget, accuracy, strategy, seed
    waiting: str | None = None  # path of to_label.csv when the run stopped for labels


def active_learning(cache: Cache | str | os.PathLike, config: ALConfig, *, out: str | os.PathLike,
                    backbone: Backbone | None = None, progress: bool = False) -> ALResult:
    """Pool-based AL rounds over the cached training split; state saved each round in ``out`` (resumable)."""
    _check(config)
    cache, backbone = open_for_training(cache, backbone)
    folder = check_out_dir(out)
    state = _load_state(folder, _config_dict(config, backbone), data_identity(cache, config.train.labels), backbone)
    pool = _pool(cache, config)
    # None with augmentation or when it would not fit
    bank = shared_bank(cache, backbone, config.train.augment, config.train.device)
    most = 1 if config.oracle else parse_batch_runs(config.batch_runs, resolve_device(config.train.device))
    ranks = Dist.from_env()
    with progress_bar(progress and ranks.main, "rounds/s", every=0) as bar:  # in logs: a line per round
        task = bar.add_task(f"active learning ({config.strategy})", total=config.seeds * len(config.budgets),
                            completed=sum(len(s["curve"]) for s in state["seeds"].values()))
        while group := _due(state, config, most * ranks.world):
            waiting = _rounds(cache, config, backbone, bank, pool, folder, state, group, most)
            if waiting:
                return ALResult(_curve(state, config), waiting)
            for seed in group:
                done = state["seeds"][str(seed)]["curve"][-1]
                bar.advance(task, note=f"seed {seed}, {done['budget']} labelled: test accuracy "
                                       f"{done['accuracy']:.4f}")
    curve = _curve(state, config)
    if ranks.main:
        _write_curve(folder, curve)
    return ALResult(curve)


def _pool(cache: Cache, config: ALConfig) -> tuple[torch.Tensor, list[str], np.ndarray]:
    """(true labels, class names, ids) of the pool, the training split; refuses a budget past the pool and a bad
    oracle file before any round runs."""
    truth, _ = labels_for(cache, config.train.train_split, config.train.labels)
    names = cache.classes if config.train.labels is None else label_classes(cache, config.train.train_split,
                                                                             config.train.labels)
    ids = read(cache.split(config.train.train_split).id, slice(None))
    if config.budgets[-1] > len(ids):
        raise DataError(f"budget {config.budgets[-1]} exceeds the pool ({len(ids)} items)")
    if config.oracle:
        _oracle_labels(config.oracle, ids, np.arange(0), truth, names)
    return truth, names, ids


def _due(state: dict, config: ALConfig, most: int) -> list[int]:
    """The seeds whose next round runs now: the first seed with rounds left and up to ``most`` - 1 later seeds due
    the same round (``most`` 1: seed after seed, each through all its rounds)."""
    done = {s: len(state["seeds"].get(str(s), {}).get("curve", ())) for s in range(config.seeds)}
    left = [(s, r) for s, r in done.items() if r < len(config.budgets)]
    return [s for s, r in left if r == left[0][1]][:most] if left else []


def _rounds(cache: Cache, config: ALConfig, backbone: Backbone, bank: ActivationBank | None, pool: tuple,
            folder: Path, state: dict, seeds: list[int], most: int) -> str | None:
    """One round of each seed's run (their labelled sets as large): draw the first labelled set, or train on the
    labelled set and add the next budget's items; saved at once (a killed run resumes here). Up to ``most`` seeds
    train as one batched model; under torchrun such groups are dealt to ranks (each trains and scores alone),
    every rank gets every seed's new state and rank 0 saves. Returns the file to fill in when the oracle has not
    labelled every item yet."""
    main, jobs = Dist.from_env().main, []
    for seed in seeds:
        labelled = _prepare(cache, config, pool, folder, state, seed, main)
        if isinstance(labelled, str):
            return labelled
        jobs.append((seed, TrainData(*labelled, bank=bank)))

    def work(group: list[tuple[int, TrainData]]) -> list[dict]:
        runs = [(replace(config.train, blocks=config.blocks, seed=seed), data) for seed, data in group]
        results = ([train(cache, *runs[0], backbone=backbone)] if len(runs) == 1 else
                   train_runs(cache, runs, backbone=backbone, batch_runs=len(runs)))
        return [_advanced(cache, config, bank, state["seeds"][str(seed)], seed, data.positions, result)
                for (seed, data), result in zip(group, results)]

    for group, runs in dealt([jobs[i:i + most] for i in range(0, len(jobs), most)], work):
        state["seeds"].update({str(seed): run for (seed, _), run in zip(group, runs)})
        if main:
            _save_state(folder, state)  # atomic: a killed run resumes at this round
    return None


def _prepare(cache: Cache, config: ALConfig, pool: tuple, folder: Path, state: dict, seed: int,
             main: bool) -> tuple[np.ndarray, torch.Tensor] | str:
    """A seed's labelled positions and labels for its next round (drawing the first set, saved at once by the main
    process), or the file to fill in when the oracle has not labelled every item yet."""
    (truth, names, ids), run = pool, state["seeds"].setdefault(str(seed), {"labelled": [], "curve": []})
    if not run["labelled"]:
        rng = np.random.default_rng(seed)
        run["labelled"] = np.sort(rng.choice(len(ids), config.budgets[0], replace=False)).tolist()
        if main:
            _save_state(folder, state)
    labelled, labels = np.asarray(run["labelled"]), truth
    if config.oracle:
        labels, missing = _oracle_labels(config.oracle, ids, labelled, truth, names)
        if len(missing):
            return _ask(folder, ids[missing], cache.read_keys(config.train.train_split)[missing], main)
    return labelled, labels


def _advanced(cache: Cache, config: ALConfig, bank: ActivationBank | None, run: dict, seed: int,
              labelled: np.ndarray, result: TrainResult) -> dict:
    """A seed's run after this round: its accuracy recorded, the next budget's items added (the most uncertain to
    its own model)."""
    r = len(run["curve"])
    run = {**run, "curve": [*run["curve"], {"budget": len(labelled), "accuracy": result.test_accuracy}]}
    if r + 1 < len(config.budgets):
        extra = config.budgets[r + 1] - len(labelled)
        run["labelled"] = np.sort(np.concatenate(
            [labelled, _select(result.model, cache, config, seed, r, labelled, extra, bank)])).tolist()
    return run


def _check(config: ALConfig) -> None:
    check_train_config(config.train)
    if config.strategy not in STRATEGIES:
        raise ConfigError(f"unknown strategy {config.strategy!r}; allowed: {', '.join(STRATEGIES)}")
    b = config.budgets
    if not b or b[0] < 2 or any(y <= x for x, y in zip(b, b[1:])):
        raise DataError(f"--budgets must be increasing labelled-set sizes starting at 2 or more, got "
                        f"{','.join(map(str, b))}")


def _select(model: TunedModel, cache: Cache, config: ALConfig, seed: int, round_: int, labelled: np.ndarray,
            k: int, bank: ActivationBank | None) -> np.ndarray:
    pool = np.setdiff1d(np.arange(len(cache.split(config.train.train_split))), labelled)
    if config.strategy == "random":
        rng = np.random.default_rng([seed, round_])
        return np.sort(rng.choice(pool, k, replace=False))
    logits = cached_logits(model, cache, config.train.train_split, bank=bank)
    values = uncertainty(logits, config.strategy)[1].numpy()
    return most_uncertain(values, pool, k)


def _oracle_labels(path: str, ids: np.ndarray, labelled: np.ndarray, truth: torch.Tensor,
                   classes: list[str]) -> tuple[torch.Tensor, np.ndarray]:
    """Labels supplied so far (CSV id,label; a label is a class name or index); positions still missing."""
    from .labels import read_label_file

    given = {}
    if Path(path).is_file():
        file_ids, values = read_label_file(path)
        given = _oracle_rows(path, file_ids, values, classes)
    labels = torch.full_like(truth, -1)
    have = np.array([int(ids[p]) in given for p in labelled], bool)
    for p in labelled[have]:
        labels[p] = given[int(ids[p])]
    return labels, labelled[~have]


def _oracle_rows(path: str, ids: np.ndarray, values: list[str], classes: list[str]) -> dict[int, int]:
    """id → class index from an oracle file (a class name or index per row); refuses unknown classes and
    conflicting rows."""
    given: dict[int, int] = {}
    for i, v in zip(ids.tolist(), values):
        index = classes.index(v) if v in classes else int(v) if v.lstrip("-").isdigit() else -1
        if not 0 <= index < len(classes):
            raise DataError(f"{path}: id {i} has label {v!r}; oracle labels must be class names "
                            f"({', '.join(classes[:5])}…) or indices 0..{len(classes) - 1}")
        if given.setdefault(i, index) != index:
            raise DataError(f"{path}: id {i} is labelled both {classes[given[i]]} and {v}; keep one row per id")
    return given


def _ask(folder: Path, ids: np.ndarray, keys: np.ndarray, write: bool = True) -> str:
    """to_label.csv: the items to label by id and source key; fill `label` with a class name or index."""
    path = folder / "to_label.csv"
    if not write:
        return str(path)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "key", "label"])
        w.writerows([[int(i), str(k), ""] for i, k in zip(ids, keys)])
    return str(path)


def _load_state(folder: Path, settings: dict, identity: dict, backbone: Backbone) -> dict:
    """The run saved in ``folder`` (refused if it has other settings or data), or a new one. An earlier version's
    record (blocks as spelt, ``precision: auto``) is read in today's terms and saved so from here on."""
    path = folder / "state.json"
    if not path.is_file():
        return {"config": settings, "identity": identity, "seeds": {}}
    state = json.loads(path.read_text())
    check_identity(state.get("identity"), identity, str(folder))
    saved = {**state["config"], "train": upgraded_train(state["config"]["train"])}
    if isinstance(saved.get("blocks"), str):
        saved["blocks"] = list(parse_block_spec(saved["blocks"], backbone))
    require_same(saved, settings, f"{folder} holds an active-learning run with other settings",
                 "use another --out or the same options")
    return {**state, "config": settings}


def _config_dict(config: ALConfig, backbone: Backbone) -> dict:
    """The settings a resumed run must share, blocks resolved to indices (`layer4.0` resumes `8`)."""
    d = asdict(config)
    d["budgets"] = list(config.budgets)
    d["blocks"] = list(parse_block_spec(config.blocks, backbone))
    d.pop("seeds")  # more seeds extend a finished run
    d.pop("batch_runs")  # how runs are grouped does not change them
    return d


def _save_state(folder: Path, state: dict) -> None:
    tmp = folder / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    tmp.replace(folder / "state.json")


def _curve(state: dict, config: ALConfig) -> list[dict]:
    return [{"budget": c["budget"], "accuracy": c["accuracy"], "strategy": config.strategy, "seed": int(seed)}
            for seed, run in state["seeds"].items() for c in run["curve"]]


def _write_curve(folder: Path, curve: list[dict]) -> None:
    (folder / "curve.json").write_text(json.dumps(curve, indent=1))
    with open(folder / "curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=("budget", "accuracy", "strategy", "seed"))
        w.writeheader()
        w.writerows(curve)


def plot_curves(runs: dict[str, list[dict]], path: str | os.PathLike | None, title: str = "") -> "Figure":
    """Accuracy vs labelled budget (ticks at the budgets, log scale), one line per strategy, mean ± std over seeds
    (the paper's Figure 5 shape). Returns the figure (also written to ``path`` when given)."""
    from matplotlib.ticker import NullLocator

    fig, ax = new_figure(6.5, 4.2)
    for name, curve in runs.items():
        budgets = sorted({c["budget"] for c in curve})
        accs = [[c["accuracy"] for c in curve if c["budget"] == b] for b in budgets]
        m, s = np.array([np.mean(a) for a in accs]), np.array([np.std(a) for a in accs])
        ax.plot(budgets, m, marker="o", label=name)
        ax.fill_between(budgets, m - s, m + s, alpha=0.2)
    ax.set_xscale("log")
    ticks = sorted({c["budget"] for curve in runs.values() for c in curve})
    ax.set_xticks(ticks, [f"{b:,}" for b in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("labelled examples")
    ax.set_ylabel("test accuracy")
    ax.set_title(title or "Active learning", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def compare_strategies(cache: Cache | str | os.PathLike, config: ALConfig, strategies: tuple[str, ...], *,
                       out: str | os.PathLike, backbone: Backbone | None = None,
                       progress: bool = False) -> dict[str, ALResult]:
    """Run the same budgets with several strategies (``out/STRATEGY``) and plot them together (``out/al.png``)."""
    for s in strategies:
        _check(replace(config, strategy=s))  # every strategy checked before the first runs
    if not strategies:
        raise ConfigError("--strategy is empty; allowed: " + ", ".join(STRATEGIES))
    cache, backbone = open_for_training(cache, backbone)
    results = {s: active_learning(cache, replace(config, strategy=s), out=str(Path(out) / s), backbone=backbone,
                                  progress=progress) for s in strategies}
    if not any(r.waiting for r in results.values()) and Dist.from_env().main:
        tuned = "linear probe" if config.blocks == "none" else f"SubTuning blocks {config.blocks}"
        plot_curves({s: r.curve for s, r in results.items()}, Path(out) / "al.png",
                    f"Active learning: {tuned}, {cache.backbone['model']}\n"
                    f"{describe_runs(cache, config.train, config.seeds, examples=False)}")
    return results
