"""Logits and accuracy of a model on cached activations, and a saved task opened on a cache.

One place for what `train` (its scores), `evaluate`, `score` and `bench` compute: every loop over a cached split
that turns activations into logits lives here.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch

from .backbones import Backbone, backbone_for
from .devices import resolve_device
from .errors import DataError
from .labels import read_labels
from .loader import read_rows
from .progress import progress_bar
from .store import Cache, from_storage, open_cache, read
from .task import Task, load_task
from .tuned import TunedModel

if TYPE_CHECKING:
    from .bank import ActivationBank


def labels_for(cache: Cache, split: str, name: str | None) -> tuple[torch.Tensor, int]:
    """Labels of a split (y, or labels/NAME) and the number of classes."""
    y, n = (cache.read_y(split), len(cache.classes)) if name is None else read_labels(cache, split, name)
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= n):
        raise DataError(f"cache {cache.path} split {split} has labels outside 0..{n - 1} (found {int(y.min())}.."
                        f"{int(y.max())}); rebuild it or fix the label set")
    return y, n


@torch.inference_mode()
def cached_logits(model: TunedModel, cache: Cache, split: str, device: torch.device | None = None,
                  batch: int = 1024, bank: "ActivationBank | None" = None, progress: bool = False) -> torch.Tensor:
    """float32 logits (N, classes) on the CPU for every item of a cached split, in eval mode (tuned BatchNorms use
    their running statistics): from the bank's activations when given, else read from the cache by whole chunks."""
    if bank is not None:
        x = bank.input_of(split, model.first_trainable)
        return _batched(model.trainable_part, x, batch, model).float().cpu()
    device = device or next(model.head.parameters()).device
    s = cache.split(split)
    step = max(batch // s.chunk_len, 1) * s.chunk_len  # whole chunks per read
    out = []
    with progress_bar(progress) as bar:
        task = bar.add_task(f"inference on {split}", total=len(s))
        for a in range(0, len(s), step):
            x = cache.decode(from_storage(read(s.x, slice(a, a + step)), cache.dtype).to(device))
            out.append(_batched(model, x, batch).float().cpu())
            bar.advance(task, len(x))
    return torch.cat(out)


def _batched(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, batch: int,
             model: torch.nn.Module | None = None) -> torch.Tensor:
    """``forward`` over ``x`` in batches (as float32 inputs), with ``model`` (default: ``forward``) in eval mode."""
    model = model if model is not None else forward
    was_training = model.training
    model.eval()
    try:
        return torch.cat([forward(x[i:i + batch].float()) for i in range(0, len(x), batch)])
    finally:
        model.train(was_training)


def evaluate(model: TunedModel, cache: Cache, split: str = "test", labels: torch.Tensor | None = None,
             device: torch.device | None = None, batch: int = 1024, progress: bool = False) -> float:
    """Top-1 accuracy of ``model`` on a cached split."""
    y = cache.read_y(split) if labels is None else labels
    logits = cached_logits(model, cache, split, device, batch, progress=progress)
    return (logits.argmax(1) == y).sum().item() / len(y)


@torch.inference_mode()
def accuracy(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             model: TunedModel | None = None, batch: int = 1024) -> float:
    """Top-1 accuracy of ``forward`` over tensors already on the device (eval mode for the duration)."""
    pred = _batched(forward, x, batch, model).argmax(1)
    return (pred.cpu() == y.cpu()).sum().item() / len(y)


def scorer(model: TunedModel, cache: Cache, split: str, labels: torch.Tensor, rows: np.ndarray | None,
           bank: "ActivationBank | None", device: torch.device) -> Callable[[], float]:
    """Accuracy on a split (``rows``: only those positions, ``labels`` the whole split's), from the bank when given."""
    if rows is None and bank is None:
        return lambda: evaluate(model, cache, split, labels, device)
    if bank is None:  # read in storage order
        rows = np.sort(np.asarray(rows))
        y = labels[torch.from_numpy(rows)]
        return lambda: accuracy(model, cache.decode(read_rows(cache, split, rows).to(device)).float(), y)
    rows = None if rows is None else torch.from_numpy(np.asarray(rows))
    y = labels if rows is None else labels[rows]

    def from_bank() -> float:  # evaluated lazily, memoised by the bank
        x = bank.input_of(split, model.first_trainable)
        return accuracy(model.trainable_part, x if rows is None else x[rows.to(device)], y, model)

    return from_bank


def open_task(task_dir: str | os.PathLike, cache: Cache | str | os.PathLike, device: str = "auto",
              backbone: Backbone | None = None) -> tuple[Task, Cache, TunedModel, torch.device]:
    """A saved task on a cache of its backbone: (task, cache, its model on the device from the cache's layer,
    device)."""
    task = load_task(task_dir)
    cache = cache if isinstance(cache, Cache) else open_cache(cache)
    cache.check_backbone(task.meta["backbone"])
    _, backbone, dev = load_tasks([task], device, backbone, cache.backbone)
    return task, cache, task.model(backbone, start=cache.layer, shape=cache.sample_shape).to(dev), dev


def load_tasks(task_dirs: Sequence[str | os.PathLike | Task], device: str = "auto", backbone: Backbone | None = None,
               identity: dict | None = None) -> tuple[list[Task], Backbone, torch.device]:
    """Saved tasks (folders, or tasks already loaded), and the backbone they run on (``backbone``, or one built
    from ``identity``, or from the first task's record) placed on the resolved device: what `evaluate`, `score`
    and `predict` all start from."""
    tasks = [t if isinstance(t, Task) else load_task(t) for t in task_dirs]
    backbone = backbone or backbone_for(identity or tasks[0].meta["backbone"],
                                       "the cache" if identity else f"task {tasks[0].path}")
    dev = resolve_device(device)
    return tasks, backbone.to(dev), dev


def evaluate_task(task_dir: str | os.PathLike, cache: Cache | str | os.PathLike, *, split: str = "test",
                  device: str = "auto", backbone: Backbone | None = None, progress: bool = False) -> float:
    """Accuracy of a saved task on a cached split. The cache must come from the task's backbone."""
    task, cache, model, dev = open_task(task_dir, cache, device, backbone)
    return evaluate(model, cache, split, labels_for(cache, split, task.meta.get("labels"))[0], dev,
                    progress=progress)
