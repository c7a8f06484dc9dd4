"""A trained task on disk: ``task.safetensors`` (tuned blocks + head only) and ``task.json`` (what it fits).

Loading never unpickles code: tensors come from safetensors, everything else from JSON. A task refuses a
backbone other than the one it was trained on.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .backbones import Backbone
from .errors import SubcacheError, TaskError
from .faults import fault
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

    @property
    def input_record(self) -> dict:
        """How the task's cache's inputs were made (`subcache.inputs`): what its inputs must be made like."""
        from .inputs import recorded

        return recorded(self.meta["preprocess"], self.meta.get("data"))

    def transform(self):
        """One image (PIL, uint8 array H×W[×C] or C×H×W tensor) → the normalised (3, S, S) input the task expects,
        made as its cache's inputs were (whole-frame resize for array datasets, resize + center crop for files)."""
        from .inputs import transform

        return transform(self.input_record)

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
        try:
            model, (missing, unexpected) = self._build(backbone, first)
        except SubcacheError:
            raise
        except Exception as exc:  # noqa: BLE001 - edited blocks/shapes surface as many error types
            raise TaskError(f"task {self.path} does not fit {backbone.model_id}: "
                            f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        missing = [k for k in missing if not k.startswith("backbone.")]
        if missing or unexpected:
            raise TaskError(f"task {self.path} does not fit its blocks: missing {missing[:3]}, "
                            f"unexpected {unexpected[:3]}")
        return model.eval()

    def _build(self, backbone: Backbone, first: int) -> tuple[TunedModel, tuple[list, list]]:
        shape = tuple(self.meta["sample_shape"])
        shape = shape if first == self.start else backbone.input_shape(first, start=self.start, start_shape=shape)
        model = TunedModel(backbone, first, self.blocks, len(self.meta["classes"]), shape,
                           self.meta.get("siamese", False))
        if self.meta.get("pruned_shapes"):
            from .pruning import PruneConfig, rebuild

            c = self.meta["config"]
            rebuild(model, shape, PruneConfig(c["prune"], c["prune_norm"], c["prune_scope"]),
                    self.meta["pruned_shapes"])
        return model, model.load_state_dict(self.state, strict=False)


def check_out_dir(path: str | os.PathLike) -> Path:
    """Create the output folder ``path`` if needed and make sure it can be written — before any work is done."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise TaskError(f"--out {out} is a file; it must be a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise TaskError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    return out


def atomic_write(target: str | os.PathLike, write) -> None:
    """``write(tmp_path)`` then rename over ``target``; on any failure the temp file is removed, ``target`` is
    left as it was, and an OSError becomes one TaskError line."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes a private (0600) file; outputs are ordinary files
        os.replace(tmp, target)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, SubcacheError):  # OSError, SafetensorError (disk full)
            raise TaskError(f"cannot write {target}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        raise


def save_task(path: str | os.PathLike, model: TunedModel, meta: dict) -> None:
    """Write the pair so a reader never takes one file for the other's partner: the weights first (temp file +
    rename), then task.json naming their sha256 (`load_task` checks it)."""
    out = check_out_dir(path)
    atomic_write(out / "task.safetensors",
                 lambda tmp: save_file(model.task_state(), tmp, metadata={"format": TASK_FORMAT}))
    digest = _sha256(out / "task.safetensors")
    fault("task-weights")
    text = json.dumps({"format": TASK_FORMAT, **meta, "weights_sha256": digest}, indent=2, default=str)
    atomic_write(out / "task.json", lambda tmp: Path(tmp).write_text(text))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
    if not isinstance(meta, dict) or meta.get("format") != TASK_FORMAT:
        raise TaskError(f"{meta_file} is not a subcache task file")
    if "weights_sha256" in meta and meta["weights_sha256"] != _sha256(weights_file):
        raise TaskError(f"task {p}: task.safetensors is not the file task.json describes (a save was interrupted "
                        f"or a file edited); retrain with `subcache train --out {p}`")
    if not meta.get("complete", False) and not allow_incomplete:
        raise TaskError(f"task {p} is incomplete ({meta.get('stopped', 'training did not finish')})")
    return Task(str(p), meta, state)
