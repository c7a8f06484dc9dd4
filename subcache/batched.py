"""Several runs as one: runs that share a window's shapes (a profile's seeds, rung members, AL repeats, a greedy
candidate's folds) train together as one batched model.

Each run is made as it would be alone (`Run.make`: its seeded head, its own training positions and labels, its
loader's batch order, its augmentation generator, its scorer over its own held-out positions); then the runs'
trainable weights and BatchNorm buffers are stacked along a new first axis and one `torch.func.functional_call`
under `torch.func.vmap` trains them all: convolutions of K weight sets become one grouped convolution, the frozen
tail one K-times-larger batch. Each run keeps its own optimiser state (AdamW is elementwise: one AdamW over
stacked weights is K AdamWs), its own batch order and augmentation draws, so each result equals the run done
alone to float tolerance. Frozen BatchNorms stay in eval mode; the tuned copies' statistics are per-run buffers,
updated inside vmap.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence, TypeVar

import numpy as np

import torch
import torch.nn.functional as F
from torch.func import functional_call, vmap

from .augment import apply as apply_augment
from .backbones import Backbone
from .distributed import Dist
from .devices import autocast, fused_adamw, resolve_device
from .errors import ConfigError
from .evaluation import labels_for, scorer
from .loader import DeviceLoader
from .store import Cache
from .train import (CLOCK, Run, TrainConfig, TrainData, TrainResult, Trainable, _epoch_row, alone, check_finite,
                    check_train_config, open_for_training, train)

if TYPE_CHECKING:
    from .bank import ActivationBank

T = TypeVar("T")
AUTO_RUNS = 8  # `--batch-runs auto` where batching pays: at most this many runs in one batched model
AUTO_DEVICES = ("cuda",)  # where `auto` batches: launch-bound GPUs; on the CPU (compute-bound) it did not pay


def parse_batch_runs(option: str | int, device: torch.device | None = None) -> int:
    """``auto`` | ``off`` | K → the most runs trained as one on ``device`` (1: each alone)."""
    text = str(option).strip().lower()
    if text == "auto":
        return AUTO_RUNS if device is not None and device.type in AUTO_DEVICES else 1
    if text == "off":
        return 1
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"--batch-runs must be auto, off or a whole number ≥ 1, got {option!r}")
    return int(text)


def groups(items: Sequence, key, most: int) -> list[list]:
    """``items`` in order, cut into groups of at most ``most`` neighbours with the same ``key``."""
    out: list[list] = []
    for item in items:
        if out and len(out[-1]) < most and key(out[-1][0]) == key(item):
            out[-1].append(item)
        else:
            out.append([item])
    return out


def batchable(config: TrainConfig) -> bool:
    """Runs of this config can be stacked: resident, unpruned, single-process."""
    return config.loader != "stream" and not config.prune


def train_many(cache: Cache | str, configs: Sequence[TrainConfig], data: TrainData = TrainData(), *,
               backbone: Backbone | None = None, batch_runs: str | int = "auto") -> list[TrainResult]:
    """`train` for each config (same blocks and data; seeds differ), up to ``batch_runs`` at a time as one batched
    model; results in the configs' order, each as the run alone would give it."""
    return train_runs(cache, [(c, data) for c in configs], backbone=backbone, batch_runs=batch_runs)


def train_runs(cache: Cache | str, jobs: Sequence[tuple[TrainConfig, TrainData]], *,
               backbone: Backbone | None = None, batch_runs: str | int = "auto") -> list[TrainResult]:
    """`train` for each (config, data) job, up to ``batch_runs`` neighbours at a time as one batched model where
    they share a window's shapes: the same settings but the seed, and the same number of training positions —
    each run its own positions, labels, held-out positions, batch order, draws and head. Results in the jobs'
    order, each as the run alone would give it (AL repeats, greedy's folds, a profile's seeds)."""
    for config, _ in jobs:
        check_train_config(config)
    most = parse_batch_runs(batch_runs, resolve_device(jobs[0][0].device)) if jobs else 1
    cache, backbone = open_for_training(cache, backbone)
    results = []
    for group in groups(list(jobs), _shape_key, most):
        if len(group) == 1 or not batchable(group[0][0]):
            results += [train(cache, c, d, backbone=backbone) for c, d in group]
            continue
        runs = [Run.make(cache, c, d, None, backbone) for c, d in group]
        if (not all(isinstance(r.loader, DeviceLoader) for r in runs) or runs[0].ranks.active
                or len({r.loader.num_samples for r in runs}) > 1):
            results += [r.result(*r.fit()) for r in runs]
            continue
        results += Stacked(runs).train()
    return results


def _shape_key(job: tuple[TrainConfig, TrainData]) -> tuple:
    """Jobs with equal keys can train as one batched model: same settings but the seed, as many positions."""
    config, data = job
    count = None if data.positions is None else len(data.positions)
    return (replace(config, seed=0), count, data.bank is None, data.val_positions is None,
            data.eval_positions is None)


def run_windows(cache: Cache, configs: list[TrainConfig], backbone: Backbone, bank: "ActivationBank | None",
                split: tuple[np.ndarray, np.ndarray] | None, batch_runs: str | int = "off") -> list[dict]:
    """A profile's rows for runs of one window (seeds differ), up to ``batch_runs`` of them as one batched model:
    test accuracy, and with a validation split also the validation accuracy (trained on its fit part)."""
    runs = train_many(cache, configs, TrainData(None if split is None else split[0], bank=bank), backbone=backbone,
                      batch_runs=batch_runs)
    rows = []
    for config, run in zip(configs, runs):
        rows.append({"test_accuracy": run.test_accuracy, "trainable_params": run.trainable_params,
                     "seconds": round(run.train_seconds, 3)})
        if split is not None:
            labels = labels_for(cache, config.train_split, config.labels)[0]
            device = next(run.model.head.parameters()).device
            score = scorer(run.model, cache, config.train_split, labels, split[1], bank, device)
            rows[-1]["val_accuracy"] = CLOCK.timed(score)()
    return rows


def dealt(items: Sequence, work: Callable[[Any], T]) -> Iterator[tuple[Any, T]]:
    """(item, ``work(item)``) for every item, in order. Under torchrun the items are dealt to ranks in rounds of
    one item per rank, each rank working alone (no DDP), and every rank receives the whole round's results."""
    ranks = Dist.from_env()
    if not ranks.active:
        yield from ((item, work(item)) for item in items)
        return
    for start in range(0, len(items), ranks.world):
        round_ = items[start:start + ranks.world]
        with alone():
            try:
                mine = work(round_[ranks.rank]) if ranks.rank < len(round_) else None
            except Exception as exc:  # noqa: BLE001 - raised on every rank below: none waits on a failed rank
                mine = exc
        results: list = [None] * ranks.world
        torch.distributed.all_gather_object(results, mine)
        failed = next((r for r in results if isinstance(r, Exception)), None)
        if failed is not None:
            raise failed
        yield from zip(round_, results)


class Stacked:
    """K runs of one window as one model: stacked weights, buffers and one AdamW; each run's own batches."""

    def __init__(self, runs: list[Run]):
        self.runs, self.config, self.device = runs, runs[0].config, runs[0].device
        self.model = runs[0].model
        self.trainable = Trainable(self.model)  # functional_call's module: names are "model.<name>"
        names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        buffers = [n for n, _ in self.model.named_buffers() if not n.startswith("backbone.")]
        self.params = {n: torch.stack([r.model.get_parameter(n).detach() for r in runs]).requires_grad_()
                       for n in names}
        self.buffers = {n: torch.stack([r.model.get_buffer(n) for r in runs]) for n in buffers}
        self.opt = fused_adamw(list(self.params.values()), self.config.lr, self.config.weight_decay, self.device,
                               self.config.fused)
        steps = self.config.epochs * runs[0].loader.steps_per_epoch
        self.sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=max(1, steps))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(K, B, ...) batches → (K, B, classes): the frozen bridge over all K at once, then each run's weights."""
        if not self.runs[0].loader.bridged:
            with torch.no_grad():
                x = self.model.frozen_part(x.flatten(0, 1)).unflatten(0, x.shape[:2])

        def one(params: dict, buffers: dict, h: torch.Tensor) -> torch.Tensor:
            state = {f"model.{k}": v for d in (params, buffers) for k, v in d.items()}
            return functional_call(self.trainable, state, (h,), strict=False)

        with autocast(self.device, self.config.precision):
            return vmap(one)(self.params, self.buffers, x)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One optimiser step of every run: (K, 2) = (loss × batch, correct) per run, on the device."""
        logits = self.logits(x).float()
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(y.shape).mean(1)
        self.opt.zero_grad(set_to_none=True)
        losses.sum().backward()  # run k's weights get run k's gradient: the runs share nothing trainable
        self.opt.step()
        self.sched.step()
        return torch.stack([losses.detach() * y.shape[1], (logits.argmax(-1) == y).sum(1).float()], dim=1)

    def epoch(self, epoch: int, gens: list[torch.Generator]) -> tuple[torch.Tensor, int, float]:
        """One epoch of every run, each along its own batch order with its own draws: (sums (K, 2), seen, s)."""
        self.model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(len(self.runs), 2, device=self.device, dtype=torch.float64)
        seen = 0
        for batches in zip(*(r.loader.epoch(epoch) for r in self.runs)):
            x = torch.stack([apply_augment(x.float(), r.augments, g, None if xf is None else xf.float(), r.pad)
                             for (x, xf, _), r, g in zip(batches, self.runs, gens)])
            y = torch.stack([b[2] for b in batches])
            sums += self.step(x, y)
            seen += y.shape[1]
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return sums, seen, time.perf_counter() - t0

    def train(self) -> list[TrainResult]:
        """Every run's epochs (each run's model holds its own weights after each), then each run's result."""
        gens = [torch.Generator(device=self.device).manual_seed(r.config.seed) for r in self.runs]
        histories: list[list[dict]] = [[] for _ in self.runs]
        seconds, every = 0.0, self.config.eval_every
        for epoch in range(self.config.epochs):
            sums, seen, took = self.epoch(epoch, gens)
            seconds += took
            CLOCK.steps += took
            self.unstack()
            for run, history, run_sums in zip(self.runs, histories, sums):
                history.append(_epoch_row(epoch, run_sums, seen, seconds, self.config.lr))
                check_finite(run.model, epoch + 1, self.config.lr)
                if run.monitor is not None:  # validation monitoring: each run keeps its own best epoch
                    run.monitor(history[-1])
                if run.score is not None and every and (epoch + 1) % every == 0:
                    history[-1]["test_accuracy"] = run.score()
        share = seconds / len(self.runs)  # each run's part of the batched time
        return [run.result(history, share) for run, history in zip(self.runs, histories)]

    @torch.no_grad()
    def unstack(self) -> None:
        """Copy each run's slice of the stacked weights and buffers into its own model."""
        for k, run in enumerate(self.runs):
            for n, p in self.params.items():
                run.model.get_parameter(n).copy_(p[k])
            for n, b in self.buffers.items():
                run.model.get_buffer(n).copy_(b[k])
