"""`train`: SubTuning from a cache — the selected blocks + a new linear head, never touching images.

Defaults follow the paper's Table 2: AdamW, lr 1e-3, weight decay 0.01, cosine annealing, batch 256, 10 epochs.
Without augmentation the frozen blocks between the cached layer and the first tuned block are run once over the
split (an in-memory derived cache), not every epoch.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from ._version import __version__
from .augment import apply as apply_augment, default_pad, parse_augment
from .backbones import Backbone, backbone_for, parse_block_spec
from .devices import autocast_dtype, compile_enabled, resolve_device
from .distributed import Dist, WriterLock
from .errors import BlockError, ConfigError, DataError, TrainingError
from .labels import freeze_labels, label_classes
from .evaluation import labels_for, scorer
from .devices import memory_budget, resident_dtype
from .loader import DeviceLoader, ImageLoader, Loader, StreamLoader, split_nbytes
from .advice import advise, few_steps
from .progress import epoch_line, progress_bar
from .pruning import PruneConfig, prune_tuned_blocks
from .pruning import shapes as pruned_shapes
from .config import TrainConfig, check_train_config
from .step import Step
from .store import Cache, open_cache
from .task import check_out_dir, check_task_out, save_task
from .tuned import TunedModel

if TYPE_CHECKING:
    from .bank import ActivationBank


@dataclass
class TrainResult:
    model: TunedModel
    test_accuracy: float | None
    train_accuracy: float
    train_seconds: float
    trainable_params: int
    samples_per_second: float
    blocks: tuple[int, ...]
    num_samples: int
    history: list[dict] = field(default_factory=list)
    loader: str = "memory"
    param_fraction: float = 1.0  # tuned-block parameters kept by pruning
    val_accuracy: float | None = None  # with validation monitoring: the chosen (best) epoch's
    best_epoch: int | None = None  # with validation monitoring: the epoch whose weights were kept

    def metrics(self) -> dict:
        chosen = {} if self.best_epoch is None else {"val_accuracy": self.val_accuracy, "best_epoch": self.best_epoch}
        return {**chosen, "test_accuracy": self.test_accuracy, "train_accuracy": self.train_accuracy,
                "train_seconds": round(self.train_seconds, 4), "trainable_params": self.trainable_params,
                "samples_per_second": round(self.samples_per_second, 1), "num_samples": self.num_samples,
                "blocks": list(self.blocks), "loader": self.loader, "param_fraction": self.param_fraction}


_ALONE: ContextVar[bool] = ContextVar("subcache_alone", default=False)


@contextlib.contextmanager
def alone() -> Iterator[None]:
    """Runs made inside train in this process alone, also under torchrun (no DDP): a profile deals whole runs to
    ranks instead."""
    token = _ALONE.set(True)
    try:
        yield
    finally:
        _ALONE.reset(token)


def this_process() -> Dist:
    """The ranks a run spans: torchrun's, or this process alone (on its own device) inside `alone`."""
    ranks = Dist.from_env()
    return Dist(0, 1, ranks.local_rank) if _ALONE.get() else ranks


@dataclass
class Clock:
    """Seconds this process spent in training epochs and in scoring, summed over runs: `bench profile` tells the
    rest of a profile's time (set-up: models, optimisers, loaders, probes, banks) from them."""

    steps: float = 0.0
    scoring: float = 0.0

    def timed(self, score: Callable[[], float] | None) -> Callable[[], float] | None:
        """``score``, adding the seconds of each call to `scoring`."""
        if score is None:
            return None

        def timed_score() -> float:
            t0 = time.perf_counter()
            try:
                return score()
            finally:
                self.scoring += time.perf_counter() - t0

        return timed_score


CLOCK = Clock()


def balanced_subset(y: np.ndarray, limit: int | None, seed: int) -> np.ndarray | None:
    """Sorted positions of a seeded, class-balanced subset of ``limit`` items (None: all)."""
    if limit is None:
        return None
    if limit <= 0:
        raise DataError(f"--examples must be at least 1 training example, got {limit}")
    if limit >= len(y):
        return None
    rng = np.random.default_rng(seed)
    by_class = [rng.permutation(np.flatnonzero(y == c)) for c in np.unique(y)]
    chosen, quota = [], limit
    for i, members in enumerate(sorted(by_class, key=len)):  # small classes first, leftovers flow onward
        take = min(len(members), quota // (len(by_class) - i))
        chosen.append(members[:take])
        quota -= take
    return np.sort(np.concatenate(chosen))


def check_blocks(tuned: tuple[int, ...], cache: Cache) -> None:
    early = [b for b in tuned if b < cache.layer]
    if early:
        raise BlockError(f"block {early[0]} comes before this cache's layer: the earliest block this cache can "
                         f"train is {cache.layer} ({cache.layer_name}); rebuild with --layer {early[0]}")


def open_for_training(cache: Cache | str | os.PathLike, backbone: Backbone | None) -> tuple[Cache, Backbone]:
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if backbone is None:
        backbone = backbone_for(cache.backbone, f"cache {cache.path}")
    cache.check_backbone(backbone.identity())
    return cache, backbone


def make_loader(cache: Cache, config: TrainConfig, model: TunedModel, indices: np.ndarray | None,
                labels: torch.Tensor, device: torch.device, augments: tuple[str, ...]) -> Loader:
    """The training loader: resident or streamed; past the frozen bridge (run once) when nothing varies per epoch."""
    flip_views = "flip" in augments and cache.split(config.train_split).x_flip is not None
    mode = config.loader
    if mode not in ("auto", "memory", "stream"):
        raise ConfigError(f"unknown loader {mode!r}; allowed: auto, memory, stream")
    if mode == "auto":
        fits = split_nbytes(cache, config.train_split, len(labels)) * 2 <= memory_budget(device)
        mode = "memory" if fits else "stream"
    if mode == "stream":
        return StreamLoader(cache, config.train_split, indices, labels, config.batch_size, config.seed, device,
                            flip_views)
    loader = DeviceLoader.from_cache(cache, config.train_split, indices, labels, config.batch_size, config.seed,
                                     device, flip_views)
    if augments or model.start == model.first_trainable:
        return loader
    x = loader.decode(loader.x)  # from_cache always sets the cache's decode (int8 → float32; others unchanged)
    keep = resident_dtype(x.numel() * 4 * 2, loader.x.dtype, device)  # the cache's 16-bit if fp32 won't fit
    loader.x, loader.decode, loader.bridged = run_frozen(model, x, keep), None, True  # the bridge once, not per epoch
    return loader


@torch.inference_mode()
def run_frozen(model: TunedModel, x: torch.Tensor, dtype: torch.dtype = torch.float32,
               batch: int = 1024) -> torch.Tensor:
    return torch.cat([model.frozen_part(x[i:i + batch].float()).to(dtype) for i in range(0, len(x), batch)])


def fit(model: TunedModel, loader: Loader, config: TrainConfig, device: torch.device) -> tuple[list[dict], float]:
    """The training loop of a bare model and loader (no augmentation, scoring or saving): `Run.fit`. Returns
    per-epoch history and seconds spent training."""
    return Run(config, device, model, loader, Step(model, config, device, loader)).fit()


@dataclass
class Run:
    """One training run, its parts as plain fields: made by `Run.make` (or by hand, as `fit` does), trained by
    `fit`, reported by `result`."""

    config: TrainConfig
    device: torch.device
    model: TunedModel
    loader: Loader
    step: Step
    score: Callable[[], float] | None = None  # accuracy on the test split (or held-out positions)
    saver: Callable[..., str] | None = None  # saves the task to --out (returns the folder)
    augments: tuple[str, ...] = ()
    pad: int = 1  # crop padding
    ranks: Dist = field(default_factory=Dist)
    param_fraction: float = 1.0
    monitor: "Best | None" = None  # validation monitoring (`TrainData.val_positions`): keeps the best epoch

    @classmethod
    def make(cls, cache: Cache, config: TrainConfig, data: "TrainData", out: str | None = None,
             backbone: Backbone | None = None) -> "Run":
        """Everything a run needs, before its first step: model (head seeded), loader, step, scorer, saver."""
        cache, backbone = open_for_training(cache, backbone)
        ranks = this_process()
        device = resolve_device(config.device, ranks.local_rank)
        autocast_dtype(config.precision)  # an unknown precision fails before any work
        compile_enabled(config.compile, device)
        tuned = parse_block_spec(config.blocks, backbone)
        check_blocks(tuned, cache)
        augments = parse_augment(config.augment)
        if config.labels is not None:
            freeze_labels(cache, config.labels)  # one snapshot: labels, head size and the record's classes agree
        labels, num_classes = labels_for(cache, config.train_split, config.labels)
        labels = labels if data.labels is None else data.labels
        positions = data.positions
        positions = balanced_subset(labels.numpy(), config.limit, config.seed) if positions is None else positions
        model, param_fraction = new_model(cache, backbone, tuned, num_classes, config, device)
        loader, forward = _training_loader(cache, config, model, positions, labels, device, augments, ranks,
                                           data.bank)
        monitor = None if data.val_positions is None else Best(model, scorer(
            model, cache, config.train_split, labels, data.val_positions, data.bank, device))
        return cls(config, device, model, loader, Step(model, config, device, loader, forward),
                   CLOCK.timed(_scorer(model, cache, config, labels, data, device)),
                   partial(_save, out, cache, backbone, model, config) if out else None,
                   augments, default_pad(cache.sample_shape), ranks, param_fraction, monitor)

    def fit(self, progress: bool | str = False, on_epoch: Callable[[dict], None] | None = None
            ) -> tuple[list[dict], float]:
        """The epoch loop: train an epoch; stop on non-finite weights (saving the last good ones when there is a
        saver); monitor validation and score every ``eval_every`` epochs. Returns per-epoch history and seconds
        spent training. ``progress``: True, or the run's name to start each epoch line with."""
        gen = torch.Generator(device=self.device).manual_seed(self.config.seed)  # augmentation draws, on the device
        good, history, seconds = self.last_good(), [], 0.0
        name = f"{progress} " if isinstance(progress, str) else ""
        with progress_bar(progress, "steps/s", every=None) as bar:  # in logs: a line per epoch
            task = bar.add_task("training", total=self.config.epochs * self.loader.steps_per_epoch)
            for epoch in range(self.config.epochs):
                try:
                    row, took = self.epoch(epoch, gen, lambda: bar.advance(task))
                except TrainingError as exc:
                    raise self.stopped(exc, good) from None
                good, seconds = self.last_good(), seconds + took
                CLOCK.steps += took
                row["seconds"] = round(seconds, 3)
                if self.monitor is not None:
                    self.monitor(row)
                if self.score is not None and self.config.eval_every and (epoch + 1) % self.config.eval_every == 0:
                    row["test_accuracy"] = self.score()
                history.append(row)
                if on_epoch:
                    on_epoch(row)
                # the rate over all epochs so far: steady, where one short epoch's is noise
                rate = (epoch + 1) * self.loader.num_samples / max(seconds, 1e-9)
                bar.line(name + epoch_line(row, self.config.epochs, rate))
        return history, seconds

    def epoch(self, epoch: int, gen: torch.Generator, advance: Callable[[], None]) -> tuple[dict, float]:
        """One epoch's steps: (its history row, seconds). Raises `TrainingError` on a non-finite loss or weights."""
        self.model.train()
        t0 = time.perf_counter()
        sums = torch.zeros(2, device=self.device, dtype=torch.float64)  # loss sum, correct: exact past 2**24
        seen = 0
        for x, x_flip, y in self.loader.epoch(epoch):
            x = apply_augment(x.float(), self.augments, gen, None if x_flip is None else x_flip.float(), self.pad)
            sums += self.step(x, y)
            seen += len(y)
            advance()
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        took = time.perf_counter() - t0
        row = _epoch_row(epoch, sums, seen, 0.0, self.config.lr)
        check_finite(self.model, epoch + 1, self.config.lr)
        return row, took

    def last_good(self) -> dict | None:
        """A copy of the task's weights to fall back on (only kept when there is a saver to write them)."""
        return None if self.saver is None else {k: v.clone() for k, v in self.model.task_state().items()}

    def stopped(self, exc: TrainingError, good: dict | None) -> TrainingError:
        """The error to raise when training failed: with a saver, the last good weights are saved (incomplete)."""
        if self.saver is None or good is None:
            return exc
        self.model.load_state_dict(good, strict=False)
        out = self.saver(metrics={}, complete=False, stopped=str(exc))
        return TrainingError(f"{exc}; the last good weights are in {out} (marked incomplete)")

    def result(self, history: list[dict], seconds: float) -> TrainResult:
        """The run's result, with the best epoch's weights under validation monitoring: scored on rank 0 (every
        rank gets the score)."""
        if self.monitor is not None:
            self.monitor.restore()
        chosen = history[-1] if self.monitor is None else history[self.monitor.epoch - 1]
        test_acc = self.ranks.broadcast(self.score() if self.score is not None and self.ranks.main else None)
        samples = self.loader.num_samples * self.ranks.world
        return TrainResult(self.model, test_acc, chosen["train_accuracy"], seconds,
                           self.model.trainable_params(), self.config.epochs * samples / max(seconds, 1e-9),
                           self.model.tuned, samples, history,
                           type(self.loader).__name__.removesuffix("Loader").lower(), self.param_fraction,
                           chosen.get("val_accuracy"), None if self.monitor is None else self.monitor.epoch)


class Best:
    """Validation monitoring (`train --val-fraction`): each epoch's ``val_accuracy`` goes into its history row;
    the best epoch's weights (the first of equals) are restored at the end."""

    def __init__(self, model: TunedModel, score: Callable[[], float]):
        self.model, self.score, self.best, self.epoch, self.state = model, score, -1.0, 0, {}

    def __call__(self, row: dict) -> None:
        row["val_accuracy"] = self.score()
        if row["val_accuracy"] > self.best:
            self.best, self.epoch = row["val_accuracy"], row["epoch"]
            self.state = {k: v.clone() for k, v in self.model.task_state().items()}

    def restore(self) -> None:
        self.model.load_state_dict(self.state, strict=False)


def _epoch_row(epoch: int, sums: torch.Tensor, seen: int, seconds: float, lr: float) -> dict:
    """An epoch's history row (one host sync); a non-finite mean loss stops training."""
    loss_sum, correct = sums.tolist()
    mean_loss = loss_sum / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise TrainingError(f"the training loss became {mean_loss} in epoch {epoch + 1}; lower --lr (now {lr})")
    return {"epoch": epoch + 1, "loss": mean_loss, "train_accuracy": int(correct) / max(seen, 1),
            "seconds": round(seconds, 3)}


@dataclass(frozen=True)
class TrainData:
    """What one run trains and is scored on, where that is not the config's own choice (profiles, greedy
    selection, active learning). The default is the config's: its training split (``limit``'s subset) and test
    split, the cache's labels, activations read from the cache."""

    positions: np.ndarray | None = None  # training-split positions to train on (None: ``config.limit``'s subset)
    labels: torch.Tensor | None = None  # the whole training split's labels (None: y, or ``config.labels``)
    eval_positions: np.ndarray | None = None  # score on these training-split positions, not the test split
    val_positions: np.ndarray | None = None  # monitor on these training-split positions; keep the best epoch
    bank: "ActivationBank | None" = None  # frozen-block activations shared between runs (used without augment)


def train(cache: Cache | str | os.PathLike, config: TrainConfig = TrainConfig(), data: TrainData = TrainData(), *,
          out: str | os.PathLike | None = None, backbone: Backbone | None = None, progress: bool | str = False,
          on_epoch: Callable[[dict], None] | None = None, overwrite: bool = False) -> TrainResult:
    """Train ``config.blocks`` + a new head from a cache on ``data``; score on its test split (or
    ``data.eval_positions``; with ``data.val_positions``, keep the epoch best on them); ``progress``: True, or the
    run's name to start each epoch line with; save the task to ``out``, checked writable first and locked
    (``OUT.lock``) while this run owns it: one writer per task folder. A complete task already in ``out`` needs
    ``overwrite``."""
    check_train_config(config)
    out = None if out is None else os.fspath(out)
    run = lambda: _train(cache, config, data, out, backbone, progress, on_epoch)  # noqa: E731
    if out is None or not this_process().main:
        return run()
    check_out_dir(out)
    with WriterLock(out, what="train"):
        check_task_out(out, overwrite=overwrite)
        return run()


def _train(cache: Cache | str, config: TrainConfig, data: TrainData = TrainData(), out: str | None = None,
           backbone: Backbone | None = None, progress: bool | str = False,
           on_epoch: Callable[[dict], None] | None = None) -> TrainResult:
    """`train` once its options are checked and ``out`` is locked: make the run, fit it, score it, save it."""
    run = Run.make(cache, config, data, out, backbone)
    advise(few_steps(run.loader.num_samples * run.ranks.world, config.batch_size),
           loud=bool(progress) and run.ranks.main)
    history, seconds = run.fit(progress if run.ranks.main else False, on_epoch)
    result = run.result(history, seconds)
    if run.saver and run.ranks.main:
        run.saver(metrics=result.metrics(), complete=True, history=history, world_size=run.ranks.world)
    run.ranks.barrier()
    return result


def new_model(cache: Cache, backbone: Backbone, tuned: tuple[int, ...], num_classes: int, config: TrainConfig,
              device: torch.device) -> tuple[TunedModel, float]:
    """The run's model on the device (its head seeded by ``config.seed``), channel-pruned when ``config.prune``
    asks; and the fraction of tuned-block parameters kept."""
    backbone.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the head's init is part of the run's identity
        model = TunedModel(backbone, cache.layer, tuned, num_classes, cache.sample_shape,
                           config.siamese).to(device)
    if not config.prune:
        return model, 1.0
    return model, prune_tuned_blocks(model, cache.sample_shape,
                                     PruneConfig(config.prune, config.prune_norm, config.prune_scope))


def check_finite(model: TunedModel, epoch: int, lr: float) -> None:
    """Refuse weights that stopped being finite (a loss can be finite the step before the weights blow up)."""
    state = [v for v in model.task_state().values() if v.is_floating_point()]
    if not torch.stack([torch.isfinite(v).all() for v in state]).all():
        raise TrainingError(f"the weights stopped being finite in epoch {epoch}; lower --lr (now {lr})")


def _training_loader(cache: Cache, config: TrainConfig, model: TunedModel, indices: np.ndarray | None,
                     labels: torch.Tensor, device: torch.device, augments: tuple[str, ...], ranks: Dist,
                     bank: "ActivationBank | None") -> tuple[Loader, torch.nn.Module | None]:
    """(loader, DDP-wrapped trainable part under torchrun or None)."""
    if ranks.active:  # DDP: a static, equal-sized shard of the training positions per rank
        from torch.nn.parallel import DistributedDataParallel

        positions = np.arange(len(labels)) if indices is None else indices
        shard = np.sort(positions[ranks.rank::ranks.world][:len(positions) // ranks.world])
        local = replace(config, batch_size=max(2, config.batch_size // ranks.world), seed=config.seed + ranks.rank)
        loader = make_loader(cache, local, model, shard, labels[torch.from_numpy(shard)], device, augments)
        return loader, DistributedDataParallel(Trainable(model),
                                               device_ids=[device.index] if device.type == "cuda" else None)
    subset = labels if indices is None else labels[torch.from_numpy(indices)]
    if bank is not None and not augments:
        x = bank.input_of(config.train_split, model.first_trainable)
        x = x if indices is None else x[torch.from_numpy(indices).to(device)]
        return DeviceLoader(x, subset.to(device), config.batch_size, config.seed, bridged=True), None
    return make_loader(cache, config, model, indices, subset, device, augments), None


class Trainable(torch.nn.Module):
    """A model's trainable part as a module (the loader's `bridge` runs before it, without grads): what DDP wraps,
    and what batched runs call functionally."""

    def __init__(self, model: TunedModel):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.trainable_part(x)


def _scorer(model: TunedModel, cache: Cache, config: TrainConfig, train_labels: torch.Tensor, data: TrainData,
            device: torch.device) -> Callable[[], float] | None:
    """How this run is scored: held-out training positions, or the test split (None when there is none)."""
    if data.eval_positions is not None:
        return scorer(model, cache, config.train_split, train_labels, data.eval_positions, data.bank, device)
    if config.test_split not in cache.splits:
        return None
    labels = labels_for(cache, config.test_split, config.labels)[0]
    return scorer(model, cache, config.test_split, labels, None, data.bank, device)


def _save(out: str, cache: Cache, backbone: Backbone, model: TunedModel, config: TrainConfig, **meta) -> str:
    """Save the task to ``out`` (returned) with its record (see `task_record`)."""
    save_task(out, model, task_record(cache, backbone, model, config, **meta))
    return out


def task_record(cache: Cache, backbone: Backbone, model: TunedModel, config: TrainConfig, metrics: dict, *,
                complete: bool, **extra) -> dict:
    import zarr

    from .inputs import recorded

    return {
        "complete": complete,
        "backbone": cache.backbone,
        "cache": cache.path, "cache_layer": cache.layer, "cache_layer_name": cache.layer_name,
        "sample_shape": cache.attrs["sample_shape"],
        "preprocess": recorded(cache.attrs["preprocess"], cache.attrs.get("data")),
        "blocks": list(model.tuned), "block_names": [backbone.block_names[i - 1] for i in model.tuned],
        "classes": cache.classes if config.labels is None else label_classes(cache, config.train_split, config.labels),
        "labels": config.labels, "siamese": config.siamese,
        "pruned_shapes": pruned_shapes(model) if config.prune else None,
        "config": asdict(config), "metrics": metrics,
        "versions": {"subcache": __version__, "torch": torch.__version__, "zarr": zarr.__version__},
        **extra,
    }


def train_reference(source, backbone: Backbone, layer: int, config: TrainConfig, num_classes: int,
                    device: str = "cpu", round_to: torch.dtype | None = None) -> tuple[TunedModel, list[dict], float]:
    """The same run done the slow way: every batch's images go through the live frozen prefix.

    Same head init, batch order and optimiser as `train` with augmentation off, so the two must agree to float
    tolerance (`round_to` rounds the live activations like a float16 cache would). Used by the exactness tests
    and by `bench train`.
    """
    dev = resolve_device(device)
    tuned = parse_block_spec(config.blocks, backbone)
    labels = torch.from_numpy(source.labels)
    indices = balanced_subset(source.labels, config.limit, config.seed)
    subset = labels if indices is None else labels[torch.from_numpy(indices)]
    backbone.to(dev)
    shape = backbone.input_shape(layer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = TunedModel(backbone, layer, tuned, num_classes, shape, config.siamese).to(dev)
    loader = ImageLoader(source, backbone, layer, indices, subset, config.batch_size, config.seed, dev, round_to)
    history, seconds = fit(model, loader, config, dev)
    return model, history, seconds
