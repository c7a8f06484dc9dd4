"""A trained task on disk: ``task.safetensors`` (tuned blocks + head only) and ``task.json`` (what it fits).

Loading never unpickles code: tensors come from safetensors, everything else from JSON. A task refuses a
backbone other than the one it was trained on.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .backbones import Backbone, load_backbone
from .errors import TaskError, WeightsError
from .tuned import TunedModel

TASK_FORMAT = "subcache-task"


@dataclass
class Task:
    path: str
    meta: dict
    state: dict[str, torch.Tensor]

    @property
    def blocks(self) -> tuple[int, ...]:
        return tuple(self.meta["blocks"])

    @property
    def start(self) -> int:
        return int(self.meta["cache_layer"])

    def check_backbone(self, backbone: Backbone) -> None:
        mine = self.meta["backbone"]
        if mine["model"] != backbone.model_id or mine["weights_sha256"] != backbone.weights_sha256:
            raise TaskError(f"task {self.path} was trained on {mine['model']} weights {mine['weights']} "
                            f"(sha256 {mine['weights_sha256'][:12]}…), not {backbone.model_id} weights "
                            f"{backbone.weights_id} (sha256 {backbone.weights_sha256[:12]}…)")

    def model(self, backbone: Backbone, start: int | None = None) -> TunedModel:
        """The task's TunedModel on ``backbone``, fed from the input of block ``start`` (default: its cache layer)."""
        self.check_backbone(backbone)
        first = self.start if start is None else start
        if self.blocks and first > min(self.blocks):
            raise TaskError(f"task {self.path} tunes block {min(self.blocks)}, before block {first}")
        shape = tuple(self.meta["sample_shape"]) if first == self.start else _shape_at(backbone, first)
        model = TunedModel(backbone, first, self.blocks, len(self.meta["classes"]), shape,
                           self.meta.get("siamese", False))
        if self.meta.get("pruned_shapes"):
            from .pruning import PruneConfig, rebuild

            c = self.meta["config"]
            rebuild(model, shape, PruneConfig(c["prune"], c["prune_norm"], c["prune_scope"]),
                    self.meta["pruned_shapes"])
        missing, unexpected = model.load_state_dict(self.state, strict=False)
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise TaskError(f"task {self.path} does not fit its blocks: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        return model.eval()


def _shape_at(backbone: Backbone, layer: int) -> tuple[int, ...]:
    from .build import sample_shape

    return sample_shape(backbone, layer)


def save_task(path: str | os.PathLike, model: TunedModel, meta: dict) -> None:
    """Write both files atomically (temp file + rename), the JSON last so a half-written task is never complete."""
    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out, suffix=".tmp", delete=False) as f:
        tmp = f.name
    save_file(model.task_state(), tmp, metadata={"format": TASK_FORMAT})
    os.chmod(tmp, 0o666 & ~_umask())  # a temporary file is private (0600); a checkpoint is an ordinary file
    os.replace(tmp, out / "task.safetensors")
    tmp = out / "task.json.tmp"
    tmp.write_text(json.dumps({"format": TASK_FORMAT, **meta}, indent=2, default=str))
    os.replace(tmp, out / "task.json")


def _umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it
    os.umask(mask)
    return mask


def load_task(path: str | os.PathLike, *, allow_incomplete: bool = False) -> Task:
    p = Path(path)
    meta_file, weights_file = p / "task.json", p / "task.safetensors"
    if not meta_file.is_file() or not weights_file.is_file():
        raise TaskError(f"{p} is not a task directory (needs task.json and task.safetensors from `subcache train`)")
    try:
        meta = json.loads(meta_file.read_text())
        state = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise TaskError(f"cannot read task {p}: {str(exc).splitlines()[0]}") from None
    if meta.get("format") != TASK_FORMAT:
        raise TaskError(f"{meta_file} is not a subcache task file")
    if not meta.get("complete", False) and not allow_incomplete:
        raise TaskError(f"task {p} is incomplete ({meta.get('stopped', 'training did not finish')})")
    return Task(str(p), meta, state)


def backbone_for(record: dict) -> Backbone:
    """Rebuild the backbone a cache or task records (model, weights spec, image size) and check its sha256."""
    backbone = load_backbone(record["model"], record["weights_spec"], image_size=record["image_size"])
    if backbone.weights_sha256 != record["weights_sha256"]:
        raise WeightsError(f"weights {record['weights_spec']} for {record['model']} changed since the cache was "
                           f"built (sha256 {backbone.weights_sha256[:12]}…, expected "
                           f"{record['weights_sha256'][:12]}…)")
    return backbone
