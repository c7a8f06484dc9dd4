"""`train`: SubTuning from a cache — the selected blocks + a new linear head, never touching images.

Defaults follow the paper's Table 2: AdamW, lr 1e-3, weight decay 0.01, cosine annealing, batch 256, 10 epochs.
Without augmentation the frozen blocks between the cached layer and the first tuned block are run once over the
split (an in-memory derived cache), not every epoch.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch
import torch.nn.functional as F

from ._version import __version__
from .augment import apply as apply_augment, default_pad, parse_augment
from .backbones import Backbone, backbone_for, parse_block_spec
from .devices import autocast_dtype, fused_adamw_supported, resolve_device
from .distributed import Dist, WriterLock
from .errors import BlockError, ConfigError, DataError, TrainingError
from .labels import label_classes, read_labels
from .loader import (DeviceLoader, ImageLoader, Loader, StreamLoader, memory_budget, read_rows, resident_dtype,
                     split_nbytes)
from .progress import epoch_line, progress_bar
from .pruning import PruneConfig, prune_tuned_blocks
from .pruning import shapes as pruned_shapes
from .store import Cache, from_storage, open_cache, read
from .task import check_out_dir, save_task
from .tuned import TunedModel

if TYPE_CHECKING:
    from .bank import ActivationBank


@dataclass(frozen=True)
class TrainConfig:
    """One SubTuning run. One field per `subcache train` option."""

    blocks: str = "none"  # `13`, `13-14`, `13,15`, `layer3.5`, or `none` (linear probe)
    epochs: int = 10
    lr: float = 1e-3
    weight_decay: float = 0.01
    batch_size: int = 256
    augment: str = "none"  # flip, crop, flip,crop or none — in feature space, on the device
    seed: int = 0
    limit: int | None = None  # seeded class-balanced subset of the training split (the low-data regime)
    eval_every: int = 0  # evaluate on the test split every k epochs (0: only at the end)
    device: str = "auto"  # auto | cpu | cuda
    loader: str = "auto"  # auto | memory | stream: stream when the split exceeds the memory budget
    precision: str = "auto"  # fp32 | bf16 (autocast over the trainable part) | auto: bf16 on CUDA, fp32 elsewhere
    channels_last: bool | None = None  # 4-D activations and weights in channels_last (None: on CUDA only)
    fused: bool | None = None  # fused AdamW kernel (None: on CUDA only; True on a device without one is an error)
    labels: str | None = None  # an extra label set of the cache (labels/NAME) instead of y
    siamese: bool = False  # head sees original + tuned features (paper §5.1)
    prune: float = 0.0  # channel-prune this fraction of the tuned blocks' inner channels before training (§5.2)
    prune_norm: str = "l1"  # l1 | l2 magnitude importance
    prune_scope: str = "local"  # local (per layer) | global (ranked across the tuned blocks)
    train_split: str = "train"
    test_split: str = "test"


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

    def metrics(self) -> dict:
        return {"test_accuracy": self.test_accuracy, "train_accuracy": self.train_accuracy,
                "train_seconds": round(self.train_seconds, 4), "trainable_params": self.trainable_params,
                "samples_per_second": round(self.samples_per_second, 1), "num_samples": self.num_samples,
                "blocks": list(self.blocks), "loader": self.loader, "param_fraction": self.param_fraction}


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


def check_blocks(tuned: tuple[int, ...], cache: Cache, backbone: Backbone) -> None:
    early = [b for b in tuned if b < cache.layer]
    if early:
        raise BlockError(f"block {early[0]} comes before this cache's layer: the earliest block this cache can "
                         f"train is {cache.layer} ({cache.layer_name}); rebuild with --layer {early[0]}")


def labels_for(cache: Cache, split: str, name: str | None) -> tuple[torch.Tensor, int]:
    """Labels of a split (y, or labels/NAME) and the number of classes."""
    y, n = (cache.read_y(split), len(cache.classes)) if name is None else read_labels(cache, split, name)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n):
        raise DataError(f"cache {cache.path} split {split} has labels outside 0..{n - 1} (found {int(y.min())}.."
                        f"{int(y.max())}); rebuild it or fix the label set")
    return y, n


def open_for_training(cache: Cache | str | os.PathLike, backbone: Backbone | None) -> tuple[Cache, Backbone]:
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    if backbone is None:
        backbone = backbone_for(cache.backbone)
    cache.check_backbone(backbone.identity())
    return cache, backbone


def make_loader(cache: Cache, config: TrainConfig, model: TunedModel, indices: np.ndarray | None,
                labels: torch.Tensor, device: torch.device, augments: tuple[str, ...]) -> tuple[Loader, bool]:
    """The training loader, and whether its tensors are already past the frozen bridge (precomputed)."""
    flip_views = "flip" in augments and cache.split(config.train_split).x_flip is not None
    count = len(labels)
    mode = config.loader
    if mode not in ("auto", "memory", "stream"):
        raise ConfigError(f"unknown loader {mode!r}; allowed: auto, memory, stream")
    if mode == "auto":
        mode = "memory" if split_nbytes(cache, config.train_split, count) * 2 <= memory_budget(device) else "stream"
    if mode == "stream":
        return StreamLoader(cache, config.train_split, indices, labels, config.batch_size, config.seed, device,
                            flip_views), False
    loader = DeviceLoader.from_cache(cache, config.train_split, indices, labels, config.batch_size, config.seed,
                                     device, flip_views)
    if augments or model.start == model.first_trainable:
        return loader, False
    x = loader.x if loader.decode is None else loader.decode(loader.x)
    keep = resident_dtype(x.numel() * 4 * 2, loader.x.dtype, device)  # the cache's 16-bit if fp32 won't fit
    loader.x, loader.decode = run_frozen(model, x, keep), None  # frozen bridge once, not every epoch
    return loader, True


@torch.inference_mode()
def run_frozen(model: TunedModel, x: torch.Tensor, dtype: torch.dtype = torch.float32,
               batch: int = 1024) -> torch.Tensor:
    return torch.cat([model.frozen_part(x[i:i + batch].float()).to(dtype) for i in range(0, len(x), batch)])


@torch.inference_mode()
def cached_logits(model: TunedModel, cache: Cache, split: str, device: torch.device | None = None,
                  batch: int = 1024, progress: bool = False) -> torch.Tensor:
    """float32 logits (N, classes) on the CPU for every item of a cached split, read by whole chunks, in eval mode
    (tuned BatchNorms use their running statistics)."""
    device = device or next(model.head.parameters()).device
    was_training = model.training
    model.eval()
    s = cache.split(split)
    step = max(batch // s.chunk_len, 1) * s.chunk_len  # whole chunks per read
    out = []
    with progress_bar(progress) as bar:
        task = bar.add_task(f"inference on {split}", total=len(s))
        for a in range(0, len(s), step):
            x = cache.decode(from_storage(read(s.x, slice(a, a + step)), cache.dtype).to(device))
            out += [model(x[i:i + batch].float()).float().cpu() for i in range(0, len(x), batch)]
            bar.advance(task, len(x))
    model.train(was_training)
    return torch.cat(out)


def evaluate(model: TunedModel, cache: Cache, split: str = "test", labels: torch.Tensor | None = None,
             device: torch.device | None = None, batch: int = 1024, progress: bool = False) -> float:
    """Top-1 accuracy of ``model`` on a cached split."""
    y = cache.read_y(split) if labels is None else labels
    return (cached_logits(model, cache, split, device, batch, progress).argmax(1) == y).sum().item() / len(y)


def fit(model: TunedModel, loader: Loader, config: TrainConfig, device: torch.device, *, precomputed: bool,
        augments: tuple[str, ...] = (), pad: int = 1, on_epoch: Callable[[dict], None] | None = None,
        progress: bool = False, forward: Callable[[torch.Tensor], torch.Tensor] | None = None
        ) -> tuple[list[dict], float]:
    """The training loop. Returns per-epoch history and seconds spent training (evaluation excluded).
    ``forward`` replaces the model's own (a DDP wrapper under torchrun)."""
    opt = optimizer(model, config, device)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, config.epochs * loader.steps_per_epoch))
    step = training_forward(model, config, device, precomputed, forward)
    gen = torch.Generator(device=device).manual_seed(config.seed)  # augmentation draws, on the device
    history, seconds = [], 0.0
    with progress_bar(progress, "steps/s", every=None) as bar:  # in logs: a line per epoch
        task = bar.add_task("training", total=config.epochs * loader.steps_per_epoch)
        for epoch in range(config.epochs):
            model.train()
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for x, x_flip, y in loader.epoch(epoch):
                x = apply_augment(x.float(), augments, gen, None if x_flip is None else x_flip.float(), pad)
                logits = step(x)
                loss = F.cross_entropy(logits.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                bar.advance(task)
            if device.type == "cuda":
                torch.cuda.synchronize()
            epoch_seconds = time.perf_counter() - t0
            seconds += epoch_seconds
            mean_loss = loss_sum.item() / max(seen, 1)  # one host sync per epoch
            if not math.isfinite(mean_loss):
                raise TrainingError(f"the training loss became {mean_loss} in epoch {epoch + 1}; lower --lr "
                                    f"(now {config.lr})")
            row = {"epoch": epoch + 1, "loss": mean_loss, "train_accuracy": correct.item() / max(seen, 1),
                   "seconds": round(seconds, 3)}
            history.append(row)
            if on_epoch:
                on_epoch(row)
            bar.line(epoch_line(row, config.epochs, seen / max(epoch_seconds, 1e-9)))
    return history, seconds


def check_train_config(config: TrainConfig) -> None:
    """Refuse option values training cannot use, before any work."""
    if config.epochs <= 0 or config.batch_size <= 1:
        raise ConfigError("--epochs must be ≥ 1 and --batch-size ≥ 2 (BatchNorm needs two samples)")
    if not (math.isfinite(config.lr) and config.lr > 0):
        raise ConfigError(f"--lr must be a finite positive number, got {config.lr}")
    if not (math.isfinite(config.weight_decay) and config.weight_decay >= 0):
        raise ConfigError(f"--weight-decay must be a finite number ≥ 0, got {config.weight_decay}")
    if config.seed < 0:
        raise ConfigError(f"--seed must be ≥ 0, got {config.seed}")
    if not str(config.blocks).strip():
        raise ConfigError("--blocks is empty; give blocks (e.g. 13-14) or `none` for a linear probe")


def optimizer(model: TunedModel, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; the fused kernel on CUDA by default, or where ``config.fused`` asks."""
    fused = device.type == "cuda" if config.fused is None else config.fused
    if fused and not fused_adamw_supported(device):
        raise ConfigError(f"--fused: this torch ({torch.__version__}) has no fused AdamW for {device.type}; "
                          f"use --no-fused")
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=fused or None)


def training_forward(model: TunedModel, config: TrainConfig, device: torch.device, precomputed: bool,
                     forward: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[torch.Tensor], torch.Tensor]:
    """One training forward: the frozen bridge in float32 without grads (unless precomputed), then the trainable
    part under bf16 autocast when ``config.precision`` asks, in channels_last when ``config.channels_last`` asks.
    A given ``forward`` (DDP) runs whole under autocast."""
    amp = autocast_dtype(config.precision, device)
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    if channels_last:
        trainable_channels_last(model)

    def run(x: torch.Tensor) -> torch.Tensor:
        if forward is None and not precomputed:
            with torch.no_grad():
                x = model.frozen_part(x)
        if channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            return (forward or model.trainable_part)(x)

    return run


def trainable_channels_last(model: TunedModel) -> None:
    """Tuned copies, the frozen blocks after them and the head in channels_last (convolutions run fastest so with
    bf16 on GPUs). The frozen prefix and bridge keep their layout: live activations stay bit-equal to cached ones."""
    for i in range(model.first_trainable, model.backbone.num_blocks + 1):
        model.block(i).to(memory_format=torch.channels_last)
    model.head.to(memory_format=torch.channels_last)


def train(cache: Cache | str | os.PathLike, config: TrainConfig = TrainConfig(), *,
          out: str | os.PathLike | None = None, **kw) -> TrainResult:
    """Train ``config.blocks`` + a new head from a cache (see `_train`). ``out`` is checked writable first and
    locked (``OUT.lock``) while this run owns it: one writer per task folder."""
    check_train_config(config)
    out = None if out is None else os.fspath(out)
    if out is None or not Dist.from_env().main:
        return _train(cache, config, out=out, **kw)
    check_out_dir(out)
    with WriterLock(out, what="train"):
        return _train(cache, config, out=out, **kw)


def _train(cache: Cache | str, config: TrainConfig = TrainConfig(), *, out: str | None = None,
           backbone: Backbone | None = None, progress: bool = False,
           on_epoch: Callable[[dict], None] | None = None, bank: "ActivationBank | None" = None,
           train_indices: np.ndarray | None = None, eval_indices: np.ndarray | None = None,
           labels_override: torch.Tensor | None = None) -> TrainResult:
    """Train ``config.blocks`` + a new head from a cache; evaluate on its test split; save the task to ``out``.

    ``bank`` shares frozen-block activations between runs (profiles, greedy, active learning; augmentation off).
    ``train_indices`` replaces the ``limit`` subset with explicit positions in the training split;
    ``eval_indices`` scores on those positions of the *training* split instead of the test split (k-fold CV).
    ``labels_override`` supplies the training split's labels (e.g. from a person, in active learning).
    """
    cache, backbone = open_for_training(cache, backbone)
    ranks = Dist.from_env()
    device = resolve_device(config.device, ranks.local_rank)
    autocast_dtype(config.precision, device)  # an unknown precision fails before any work
    tuned = parse_block_spec(config.blocks, backbone)
    check_blocks(tuned, cache, backbone)
    augments = parse_augment(config.augment)
    labels, num_classes = labels_for(cache, config.train_split, config.labels)
    labels = labels if labels_override is None else labels_override
    indices = balanced_subset(labels.numpy(), config.limit, config.seed) if train_indices is None else train_indices

    model, param_fraction = _new_model(cache, backbone, tuned, num_classes, config, device)
    loader, precomputed, step = _training_loader(cache, config, model, indices, labels, device, augments, ranks,
                                                 bank)
    score = _scorer(model, cache, config, labels, bank, eval_indices, device)

    def epoch_hook(row: dict) -> None:
        if score is not None and config.eval_every and row["epoch"] % config.eval_every == 0:
            row["test_accuracy"] = score()
        if on_epoch:
            on_epoch(row)

    def save_incomplete(why: str) -> str:
        save_task(out, model, _meta(cache, backbone, model, config, {}, complete=False, stopped=why))
        return str(out)

    history, seconds = _fit_keeping_good(model, config, epoch_hook, out and save_incomplete, loader=loader,
                                         device=device, precomputed=precomputed, augments=augments,
                                         pad=default_pad(cache.sample_shape), progress=progress and ranks.main,
                                         forward=step)
    test_acc = ranks.broadcast(score() if score is not None and ranks.main else None)
    samples = loader.num_samples * ranks.world
    result = TrainResult(model, test_acc, history[-1]["train_accuracy"], seconds, model.trainable_params(),
                         config.epochs * samples / max(seconds, 1e-9), tuned, samples,
                         history, type(loader).__name__.removesuffix("Loader").lower(), param_fraction)
    if out and ranks.main:
        save_task(out, model, _meta(cache, backbone, model, config, result.metrics(), complete=True,
                                    history=history, world_size=ranks.world))
    ranks.barrier()
    return result


def _new_model(cache: Cache, backbone: Backbone, tuned: tuple[int, ...], num_classes: int, config: TrainConfig,
               device: torch.device) -> tuple[TunedModel, float]:
    """The run's model, its head initialised from ``config.seed``, channel-pruned when asked: (model, fraction of
    the tuned blocks' parameters kept)."""
    backbone.to(device)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # the head's init is part of the run's identity
        model = TunedModel(backbone, cache.layer, tuned, num_classes, cache.sample_shape, config.siamese).to(device)
    if not config.prune:
        return model, 1.0
    return model, prune_tuned_blocks(model, cache.sample_shape,
                                     PruneConfig(config.prune, config.prune_norm, config.prune_scope))


def _fit_keeping_good(model: TunedModel, config: TrainConfig, on_epoch: Callable[[dict], None],
                      save_incomplete: Callable[[str], str] | None, **fit_kw) -> tuple[list[dict], float]:
    """`fit`, keeping the weights after every epoch whose weights are finite. When training stops being finite,
    those weights are put back and ``save_incomplete(reason)`` saves them (marked incomplete; it returns where)
    before the error goes on."""
    last_good = {k: v.clone() for k, v in model.task_state().items()}

    def keep_good(row: dict) -> None:
        check_finite(model, row["epoch"], config.lr)
        last_good.update({k: v.clone() for k, v in model.task_state().items()})
        on_epoch(row)

    try:
        return fit(model, config=config, on_epoch=keep_good, **fit_kw)
    except TrainingError as exc:
        if save_incomplete is None:
            raise
        model.load_state_dict(last_good, strict=False)
        where = save_incomplete(str(exc))
        raise TrainingError(f"{exc}; the last good weights are in {where} (marked incomplete)") from None


def check_finite(model: TunedModel, epoch: int, lr: float) -> None:
    """Refuse weights that stopped being finite (a loss can be finite the step before the weights blow up)."""
    state = [v for v in model.task_state().values() if v.is_floating_point()]
    if not torch.stack([torch.isfinite(v).all() for v in state]).all():
        raise TrainingError(f"the weights stopped being finite in epoch {epoch}; lower --lr (now {lr})")


def _training_loader(cache: Cache, config: TrainConfig, model: TunedModel, indices: np.ndarray | None,
                     labels: torch.Tensor, device: torch.device, augments: tuple[str, ...], ranks: Dist,
                     bank: "ActivationBank | None") -> tuple[Loader, bool, torch.nn.Module | None]:
    """(loader, inputs already past the frozen bridge?, DDP-wrapped forward under torchrun or None)."""
    subset = labels if indices is None else labels[torch.from_numpy(indices)]
    if ranks.active:  # DDP: a static, equal-sized shard of the training positions per rank
        from torch.nn.parallel import DistributedDataParallel

        positions = np.arange(len(labels)) if indices is None else indices
        shard = np.sort(positions[ranks.rank::ranks.world][:len(positions) // ranks.world])
        local = replace(config, batch_size=max(2, config.batch_size // ranks.world), seed=config.seed + ranks.rank)
        loader, precomputed = make_loader(cache, local, model, shard, labels[torch.from_numpy(shard)], device,
                                          augments)
        step = DistributedDataParallel(_Step(model, precomputed),
                                       device_ids=[device.index] if device.type == "cuda" else None)
        return loader, precomputed, step
    if bank is not None and not augments:
        x = bank.input_of(config.train_split, model.first_trainable)
        x = x if indices is None else x[torch.from_numpy(indices).to(device)]
        return DeviceLoader(x, subset.to(device), config.batch_size, config.seed), True, None
    return (*make_loader(cache, config, model, indices, subset, device, augments), None)


class _Step(torch.nn.Module):
    """What DDP wraps: one training forward (from precomputed inputs or through the frozen bridge)."""

    def __init__(self, model: TunedModel, precomputed: bool):
        super().__init__()
        self.model, self.precomputed = model, precomputed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.trainable_part(x) if self.precomputed else self.model(x)


def _scorer(model: TunedModel, cache: Cache, config: TrainConfig, train_labels: torch.Tensor,
            bank: "ActivationBank | None", eval_indices: np.ndarray | None,
            device: torch.device) -> Callable[[], float] | None:
    """How this run is scored: the test split (from the bank when there is one), or held-out training positions."""
    if eval_indices is not None:
        split, labels, rows = config.train_split, train_labels, torch.from_numpy(np.asarray(eval_indices))
    elif config.test_split in cache.splits:
        split, rows = config.test_split, None
        labels = labels_for(cache, split, config.labels)[0]
    else:
        return None
    y = labels if rows is None else labels[rows]
    if bank is None and rows is None:
        return lambda: evaluate(model, cache, split, y, device)
    if bank is None:
        return lambda: accuracy(model, cache.decode(read_rows(cache, split, np.sort(rows.numpy())).to(device)).float(),
                                labels[torch.from_numpy(np.sort(rows.numpy()))])
    x = lambda: bank.input_of(split, model.first_trainable)  # noqa: E731 - evaluated lazily, memoised by the bank
    return lambda: accuracy(model.trainable_part, x() if rows is None else x()[rows.to(device)], y, model)


@torch.inference_mode()
def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             model: TunedModel | None = None, batch: int = 1024) -> float:
    """Top-1 accuracy of ``forward`` over tensors already on the device (eval mode for the duration)."""
    model = model if model is not None else forward
    was_training = model.training
    model.eval()
    pred = torch.cat([forward(x[i:i + batch].float()).argmax(1) for i in range(0, len(x), batch)])
    model.train(was_training)
    return (pred.cpu() == y.cpu()).sum().item() / len(y)


def _meta(cache: Cache, backbone: Backbone, model: TunedModel, config: TrainConfig, metrics: dict, *,
          complete: bool, **extra) -> dict:
    import zarr

    return {
        "complete": complete,
        "backbone": cache.backbone,
        "cache": cache.path, "cache_layer": cache.layer, "cache_layer_name": cache.layer_name,
        "sample_shape": cache.attrs["sample_shape"], "preprocess": cache.attrs["preprocess"],
        "blocks": list(model.tuned), "block_names": [backbone.block_names[i - 1] for i in model.tuned],
        "classes": cache.classes if config.labels is None else label_classes(cache, config.train_split, config.labels),
        "labels": config.labels, "siamese": config.siamese,
        "pruned_shapes": pruned_shapes(model) if config.prune else None,
        "config": asdict(config), "metrics": metrics,
        "versions": {"subcache": __version__, "torch": torch.__version__, "zarr": zarr.__version__},
        **extra,
    }


def evaluate_task(task_dir: str | os.PathLike, cache: Cache | str | os.PathLike, *, split: str = "test",
                  device: str = "auto", backbone: Backbone | None = None, progress: bool = False) -> float:
    """Accuracy of a saved task on a cached split. The cache must come from the task's backbone."""
    from .task import load_task

    task = load_task(task_dir)
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    cache.check_backbone(task.meta["backbone"])
    backbone = backbone or backbone_for(cache.backbone)
    dev = resolve_device(device)
    model = task.model(backbone.to(dev), start=cache.layer).to(dev)
    labels = labels_for(cache, split, task.meta.get("labels"))[0]
    return evaluate(model, cache, split, labels, dev, progress=progress)


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
    history, seconds = fit(model, loader, config, dev, precomputed=False)
    return model, history, seconds
