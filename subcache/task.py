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
from .errors import OutputExistsError, StoreError, SubcacheError, TaskError
from .integrity import MAX_CLASSES, check_sample_shape
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

    def model(self, backbone: Backbone, start: int | None = None,
              shape: tuple[int, ...] | None = None) -> TunedModel:
        """The task's TunedModel on ``backbone``, fed from the input of block ``start`` (default: its cache layer)
        whose samples have ``shape`` (default: derived from the task's own cache shape)."""
        self.check_backbone(backbone)
        first = self.start if start is None else start
        if self.blocks and first > min(self.blocks):
            raise TaskError(f"task {self.path} tunes block {min(self.blocks)}, before block {first}")
        try:
            model, (missing, unexpected) = self._build(backbone, first, shape)
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

    def _build(self, backbone: Backbone, first: int,
               shape: tuple[int, ...] | None) -> tuple[TunedModel, tuple[list, list]]:
        shape = tuple(shape) if shape is not None else self._input_shape(backbone, first)
        model = TunedModel(backbone, first, self.blocks, len(self.meta["classes"]), shape,
                           self.meta.get("siamese", False))
        if self.meta.get("pruned_shapes"):
            from .pruning import PruneConfig, rebuild

            c = self.meta["config"]
            rebuild(model, shape, PruneConfig(c["prune"], c["prune_norm"], c["prune_scope"]),
                    self.meta["pruned_shapes"])
        return model, model.load_state_dict(self.state, strict=False)

    def _input_shape(self, backbone: Backbone, first: int) -> tuple[int, ...]:
        """Shape of block ``first``'s input: the task's cache shape, run forward from there for a later block; for
        an earlier block (before the task's cache layer) probed from images."""
        shape = tuple(self.meta["sample_shape"])
        if first == self.start:
            return shape
        if first < self.start:
            return backbone.input_shape(first)
        return backbone.input_shape(first, start=self.start, start_shape=shape)


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


def check_output_file(path: str | os.PathLike, *, overwrite: bool) -> Path:
    """An output file (export, scores, predictions) may be written to ``path``: not a folder, and not an existing
    file unless ``overwrite``. Checked before any work; its folder is created."""
    p = Path(path)
    if p.is_dir():
        raise TaskError(f"--out {p} is a folder; give a file path (e.g. {p / 'out'}{p.suffix or '.ext'})")
    if p.exists() and not overwrite:
        raise OutputExistsError(f"--out {p} exists; pass --overwrite to replace it")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TaskError(f"cannot write to --out {p}: {exc.strerror or exc}") from None
    return p


def check_task_out(path: str | os.PathLike, *, overwrite: bool) -> None:
    """A task folder may be (re)written when it holds no task files, or an incomplete subcache task (a killed run);
    a complete task, or task files subcache did not write, need ``overwrite``."""
    p = Path(path)
    if overwrite or not ((p / "task.json").exists() or (p / "task.safetensors").exists()):
        return
    try:
        meta = json.loads((p / "task.json").read_text(encoding="utf-8"))
        ours_incomplete = isinstance(meta, dict) and meta.get("format") == TASK_FORMAT and not meta.get("complete")
    except (OSError, ValueError):
        ours_incomplete = False
    if not ours_incomplete:
        raise OutputExistsError(f"--out {p} already holds a task (or task files subcache did not write); pass "
                                f"--overwrite to replace it, or choose another --out")


def atomic_write(target: str | os.PathLike, write) -> None:
    """``write(tmp_path)`` into a temp file in ``target``'s folder, fsync it, rename it over ``target``, fsync the
    folder; on any failure the temp file is removed, ``target`` is left as it was, and an OSError becomes one
    TaskError line."""
    target = Path(target)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes a private (0600) file; outputs are ordinary files
        _fsync(tmp)
        fault("before-rename")
        os.replace(tmp, target)
        _fsync(target.parent)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, Exception) and not isinstance(exc, SubcacheError):  # OSError, SafetensorError (disk full)
            raise TaskError(f"cannot write {target}: {str(exc).splitlines()[0] if str(exc) else exc}") from None
        raise


def _fsync(path: str | os.PathLike) -> None:
    """Flush a file's (or a folder's: the rename) bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
    meta = _read_meta(meta_file)
    if not isinstance(meta.get("weights_sha256"), str):
        raise TaskError(f"task {p}: task.json names no weights_sha256, so its weights cannot be checked; retrain "
                        f"with `subcache train --out {p}`")
    if meta["weights_sha256"] != _sha256(weights_file):  # checked before any tensor is read
        raise TaskError(f"task {p}: task.safetensors is not the file task.json describes (a save was interrupted "
                        f"or a file edited); retrain with `subcache train --out {p}`")
    try:
        state = load_file(str(weights_file))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise TaskError(f"cannot read task {p}: {str(exc).splitlines()[0]}") from None
    _check_state(state, p)
    _check_meta(meta, p)
    if not meta.get("complete", False) and not allow_incomplete:
        raise TaskError(f"task {p} is incomplete ({meta.get('stopped', 'training did not finish')})")
    return Task(str(p), meta, state)


def _read_meta(meta_file: Path) -> dict:
    try:
        meta = json.loads(meta_file.read_text(encoding="utf-8"))
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise TaskError(f"cannot read task {meta_file.parent}: {str(exc).splitlines()[0]}") from None
    if not isinstance(meta, dict) or meta.get("format") != TASK_FORMAT:
        raise TaskError(f"{meta_file} is not a subcache task file")
    return meta


def _check_meta(meta: dict, p: Path) -> None:
    """What building a task's model reads from task.json, checked before it allocates anything."""
    try:
        check_sample_shape(meta.get("sample_shape"), f"task {p}")
    except StoreError as exc:
        raise TaskError(str(exc)) from None
    classes, blocks = meta.get("classes"), meta.get("blocks")
    if not (isinstance(classes, list) and 0 < len(classes) <= MAX_CLASSES and isinstance(blocks, list) and
            all(isinstance(b, int) and not isinstance(b, bool) for b in blocks) and
            isinstance(meta.get("backbone"), dict) and isinstance(meta.get("cache_layer"), int)):
        raise TaskError(f"task {p}: task.json's classes, blocks, backbone or cache_layer are missing or malformed; "
                        f"retrain with `subcache train --out {p}`")


def _check_state(state: dict[str, torch.Tensor], p: Path) -> None:
    """Weights are floating point and finite; anything else (an edited or foreign file) is refused."""
    for name, t in state.items():
        if name.endswith("num_batches_tracked") and t.dtype == torch.int64 and t.dim() == 0:
            continue  # BatchNorm's step counter, the one integer buffer a block has
        if not t.is_floating_point():
            raise TaskError(f"task {p}: weight {name} is {str(t.dtype).removeprefix('torch.')}; a task's weights "
                            f"are floating point")
        if not torch.isfinite(t).all():
            raise TaskError(f"task {p}: weight {name} is not finite (NaN or inf); retrain with "
                            f"`subcache train --out {p}`")
