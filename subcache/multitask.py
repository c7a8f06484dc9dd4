"""Many tasks on one deployed backbone (paper §3.1, Figure 1).

The shared prefix runs once. Each task forks from the original activations at its first tuned block and runs its
own tuned blocks; after its last tuned block its activations join the others *along the batch axis*, so every
frozen block of the tail runs once on the bigger batch; the neck runs once too, then the batch is split into the
task heads. Outputs equal each task run alone (tested).
"""
from __future__ import annotations

import copy
import csv
import functools
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from .backbones import Backbone
from .evaluation import load_tasks
from .errors import TaskError
from .task import Task, atomic_write, load_task


class TaskBranch(nn.Module):
    """One task's own parameters: tuned block copies (by index) and its head."""

    def __init__(self, blocks: dict[int, nn.Module], head: nn.Module, siamese: bool):
        super().__init__()
        self.tuned = tuple(sorted(blocks))
        self.blocks = nn.ModuleDict({str(i): b for i, b in blocks.items()})
        self.head, self.siamese = head, siamese

    @property
    def first(self) -> int:  # a linear probe (no tuned blocks) never forks: its head reads the original features
        return self.tuned[0] if self.tuned else -1

    @property
    def last(self) -> int:
        return self.tuned[-1] if self.tuned else -1


class MultiTaskModel(nn.Module):
    """The original backbone's output plus every task's logits, from one pass over the shared parts.

    ``forward(x)`` takes normalised images (B, 3, S, S) and returns ``{"original": logits, name: logits, …}``.
    """

    def __init__(self, backbone: Backbone, branches: dict[str, TaskBranch], include_original: bool = True):
        super().__init__()
        if not branches:
            raise TaskError("MultiTaskModel needs at least one task")
        self.names = list(branches)  # output keys; module keys may not hold dots (`prune-0.5` → `prune-0_5`)
        self._keys = {name: f"{i}_{name.replace('.', '_')}" for i, name in enumerate(self.names)}
        self.backbone, self.include_original = backbone, include_original
        self.branches = nn.ModuleDict({self._keys[n]: b for n, b in branches.items()})
        self._keep_original_until = (backbone.num_blocks if include_original or
                                     any(b.siamese or not b.tuned for b in branches.values())
                                     else max(b.first for b in branches.values()) - 1)

    @classmethod
    def from_tasks(cls, backbone: Backbone, tasks: Sequence[str | Path | Task],
                   include_original: bool = True) -> "MultiTaskModel":
        """Load saved tasks (dirs or `Task`s) onto ``backbone``; each must come from this backbone."""
        branches: dict[str, TaskBranch] = {}
        for t in tasks:
            task = t if isinstance(t, Task) else load_task(t)
            model = task.model(backbone)  # checks the backbone's identity
            name = Path(task.path).name or "task"
            while name in branches or name == "original":
                name += "_"
            branches[name] = TaskBranch({i: model.tuned_blocks[str(i)] for i in task.blocks}, model.head,
                                        task.meta.get("siamese", False))
        return cls(backbone, branches, include_original).eval()

    def branch(self, name: str) -> TaskBranch:
        return self.branches[self._keys[name]]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bb = self.backbone
        batch = x.shape[0]
        trunk = bb.stem(x)  # the shared frozen path: segments stacked along the batch axis
        segments = ["original"]  # which branch each batch-sized segment of the trunk belongs to
        private: dict[str, torch.Tensor] = {}
        for i in range(1, bb.num_blocks + 1):
            for name in self.names:  # fork: take the original activations at this task's first tuned block
                if self.branch(name).first == i:
                    private[name] = trunk[:batch]
            for name, h in private.items():
                branch = self.branch(name)
                block = branch.blocks[str(i)] if i in branch.tuned else bb.block(i)
                private[name] = block(h)
            if segments and segments[0] == "original" and i > self._keep_original_until:
                trunk, segments = trunk[batch:], segments[1:]  # no task needs the original branch any more
            if segments:
                trunk = bb.block(i)(trunk)
            for name in [n for n in self.names if self.branch(n).last == i]:  # merge along the batch axis
                trunk = torch.cat([trunk, private.pop(name)]) if segments else private.pop(name)
                segments.append(name)
        features = bb.neck(trunk)
        parts = dict(zip(segments, features.unflatten(0, (len(segments), -1)).unbind(0)))  # no fixed batch size
        out = {"original": bb.head(parts["original"])} if self.include_original else {}
        for name in self.names:
            f = parts.get(name, parts.get("original"))  # a linear probe reads the original features
            if self.branch(name).siamese:
                f = torch.cat([f, parts["original"]], dim=-1)
            out[name] = self.branch(name).head(f)
        return out


@dataclass
class Predictions:
    ids: np.ndarray
    keys: np.ndarray  # (N,) str: where each item came from (path under the folder given, else its index)
    labels: np.ndarray  # (N,) the data's labels (-1: unlabelled)
    classes: list[str]  # the data's class names (empty when unlabelled)
    preds: dict[str, np.ndarray]  # task name → predicted class index per item
    probs: dict[str, np.ndarray]  # task name → probability of the predicted class
    task_classes: dict[str, list[str]]  # task name → its class names
    accuracy: dict[str, float]  # tasks whose classes are the dataset's
    images_per_second: float
    probabilities: dict[str, np.ndarray] = field(default_factory=dict)  # task name → (N, classes) softmax
    no_accuracy: dict[str, str] = field(default_factory=dict)  # task name → why no accuracy (labelled data)
    split: str = ""  # the data's split (``unlabelled`` for a flat folder of images or one image)

    def top(self, name: str, k: int) -> list[list[tuple[str, float]]]:
        """Per item, the task's ``k`` most probable classes with their probabilities, most probable first."""
        p = self.probabilities[name]
        order = np.argsort(-p, axis=1, kind="stable")[:, :k]
        names = self.task_classes[name]
        return [[(names[c], float(p[i, c])) for c in row] for i, row in enumerate(order)]

    def rows(self, top: int = 1) -> list[dict]:
        """One dict per item: id, key, label (name), then per task its predicted class name and probability (and
        with ``top`` > 1 its ``top`` classes as ``NAME_top``: [[class, probability], …])."""
        label_names = [self.classes[y] if 0 <= y < len(self.classes) else "" for y in self.labels.tolist()]
        rows = [{"id": int(i), "key": str(k), "label": n} for i, k, n in zip(self.ids, self.keys, label_names)]
        for name, pred in self.preds.items():
            for row, c, p in zip(rows, pred.tolist(), self.probs[name].tolist()):
                row[name], row[f"{name}_prob"] = self.task_classes[name][c], round(p, 6)
            if top > 1:
                for row, best in zip(rows, self.top(name, top)):
                    row[f"{name}_top"] = [[c, round(p, 6)] for c, p in best]
        return rows

    def save(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        rows = self.rows()

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=["id", "key", "label",
                                                  *(c for n in self.preds for c in (n, f"{n}_prob"))])
                w.writeheader()
                w.writerows(rows)

        atomic_write(p, write)


def predict(tasks: Sequence[str | Path], data, *, split: str | None = None, limit: int | None = None,
            batch_size: int = 128, device: str = "auto", progress: bool = False,
            backbone: Backbone | None = None, workers: int | None = None) -> Predictions:
    """Run several tasks (tuned or linear probes) over a dataset with one `MultiTaskModel`. ``data``: anything
    `open_source` takes (a name, a folder, an unlabelled folder, one image file, hf:PATH, a dataset object).
    Photos are decoded by ``workers`` processes (default as in `build`: the cores, capped, on CUDA; else 0, the
    main process), made into inputs as the tasks' record says. Accuracy for tasks trained on the data's labels.
    ``split``: default test (train for a folder of class folders, its one split)."""
    from .data import default_split, open_source
    from .inputs import load_input, note_mismatch
    from .pipeline import check_workers, decodes, ordered, reuse_host_memory
    from .progress import progress_bar

    check_workers(workers)
    reuse_host_memory()
    loaded, backbone, dev = load_tasks(tasks, device, backbone)
    workers = check_workers(workers, dev)
    model = MultiTaskModel.from_tasks(backbone, loaded, include_original=False).to(dev)
    source = open_source(data, split or default_split(data), limit=limit)
    rec = input_record(loaded)
    note_mismatch(rec, source, "the task" if len(loaded) == 1 else "the tasks")
    outputs: dict[str, list] = {name: [] for name in model.names}
    load = functools.partial(load_input, source, rec=rec, device="cpu")  # runs in worker processes too
    units = [(a, min(a + batch_size, len(source))) for a in range(0, len(source), batch_size)]
    start = time.perf_counter()
    with progress_bar(progress) as bar, torch.inference_mode():
        task = bar.add_task(f"predict {source.split}", total=len(source))
        for _, images in ordered(load, units, workers=workers if decodes(source) else 0, piece=batch_size,
                                 pin=dev.type == "cuda"):
            for name, logits in model(images.to(dev, non_blocking=True)).items():
                outputs[name].append(logits.float().softmax(1))
            bar.advance(task, len(images))
    seconds = time.perf_counter() - start
    full = {name: torch.cat(v).cpu().numpy() for name, v in outputs.items()}
    preds = {name: p.argmax(1) for name, p in full.items()}
    probs = {name: p.max(1) for name, p in full.items()}
    classes = {name: list(t.meta["classes"]) for name, t in zip(model.names, loaded)}
    accuracy, why = _accuracy(dict(zip(model.names, loaded)), preds, source)
    return Predictions(source.ids, np.asarray(source.source_keys()), source.labels, source.classes, preds, probs,
                       classes, accuracy, len(source) / seconds, full, why, source.split)


def input_record(tasks: Sequence[Task]) -> dict:
    """The input record the tasks share (they run on one backbone, so they must have been fed alike)."""
    recs = [t.input_record for t in tasks]
    keys = ("image_size", "resize", "crop_pct", "interpolation", "mean", "std")
    for t, rec in zip(tasks[1:], recs[1:]):
        if any(rec[k] != recs[0][k] for k in keys):
            raise TaskError(f"tasks {tasks[0].path} and {t.path} were trained on inputs made differently "
                            f"({recs[0]['resize']} vs {rec['resize']} resize); predict them separately")
    return recs[0]


def _accuracy(tasks: dict[str, Task], preds: dict[str, np.ndarray], source) -> tuple[dict, dict]:
    """Accuracy of each task trained on the data's labels, and why none for the others (labelled data only)."""
    accuracy, why = {}, {}
    for name, t in tasks.items():
        if t.meta.get("labels") is None and t.meta["classes"] == source.classes:
            accuracy[name] = float((preds[name] == source.labels).mean())
        elif source.classes and (source.labels >= 0).any():
            reason = (f"it was trained on label set {t.meta['labels']!r}" if t.meta.get("labels") is not None else
                      f"its classes ({_names(t.meta['classes'])}) are not the data's ({_names(source.classes)})")
            why[name] = f"no accuracy for {name}: {reason}"
    return accuracy, why


def _names(classes: Sequence[str], show: int = 4) -> str:
    more = f", … ({len(classes)} in all)" if len(classes) > show else ""
    return ", ".join(map(str, classes[:show])) + more


# -- the reference SubTuning code's alternative (src/latency.py): grouped convolutions --------------------------------
def _paired(original: nn.Module, tuned: nn.Module) -> nn.Module:
    """One module computing both branches over a channel-doubled input: every conv becomes a conv with twice the
    groups (weights stacked), every BatchNorm one over twice the channels. ResNet blocks only, as in the reference."""
    if isinstance(original, nn.Conv2d):
        conv = nn.Conv2d(original.in_channels * 2, original.out_channels * 2, original.kernel_size, original.stride,
                         original.padding, original.dilation, original.groups * 2, original.bias is not None)
        conv.weight.data = torch.cat([original.weight, tuned.weight]).detach().clone()
        if original.bias is not None:
            conv.bias.data = torch.cat([original.bias, tuned.bias]).detach().clone()
        return conv
    if isinstance(original, nn.BatchNorm2d):
        bn = nn.BatchNorm2d(original.num_features * 2, original.eps, original.momentum)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(bn, name).data = torch.cat([getattr(original, name), getattr(tuned, name)]).detach().clone()
        return bn
    if isinstance(original, nn.Linear) or any(True for _ in original.parameters(recurse=False)):
        raise TaskError(f"the grouped-convolution rewrite supports ResNet blocks only, not {type(original).__name__}")
    paired = copy.copy(original)  # same class and forward; children replaced below
    paired._modules = {name: _paired(child, dict(tuned.named_children())[name])
                       for name, child in original.named_children()}
    return paired


class GroupedPairModel(nn.Module):
    """Backbone + one task as the reference code deploys it: the tuned window's blocks run as grouped convolutions
    over a channel-doubled input (original ⊕ task), then the two halves go through the shared tail as one batch.
    For comparison with `MultiTaskModel` in `bench multitask`; outputs are the same."""

    def __init__(self, backbone: Backbone, blocks: dict[int, nn.Module], head: nn.Module):
        super().__init__()
        window = sorted(blocks)
        if window != list(range(window[0], window[-1] + 1)) or len(window) > 2:
            raise TaskError("the grouped-convolution rewrite handles one window of at most 2 consecutive blocks")
        self.backbone, self.first, self.last, self.head = backbone, window[0], window[-1], head
        self.pairs = nn.ModuleList([_paired(backbone.block(i), blocks[i]) for i in window])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        bb, batch = self.backbone, x.shape[0]
        h = bb.prefix(x, self.first)
        h = torch.cat([h, h], dim=1)  # (B, 2C, H, W): original channels, then the task's
        for pair in self.pairs:
            h = pair(h)
        h = torch.cat(h.chunk(2, dim=1))  # halves → batch axis: (2B, C', H', W')
        original, task = bb.neck(bb.run_blocks(h, self.last + 1, bb.num_blocks)).split(batch)
        return {"original": bb.head(original), "task": self.head(task)}
