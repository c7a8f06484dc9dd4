"""`subcache export`: saved tasks as one deployable model, or one task folded back into the plain model.

- ``onnx`` / ``pt2`` / ``torchscript``: the shared-prefix `MultiTaskModel` (the prefix runs once, each task forks at
  its first tuned block) taking normalised images ``(batch, 3, S, S)`` with a dynamic batch and returning one
  logits tensor per task, in the order given. The file carries a JSON record (``subcache``: tasks, classes, the
  output order and the preprocessing the input needs) — ONNX metadata_props, a `subcache.json` extra file in
  TorchScript and pt2.
- ``timm``: one task as a plain state dict of the original timm/torchvision model built with ``num_classes`` = the
  task's classes (the tuned blocks replace the pretrained ones, the head replaces the classifier); it loads with
  ``strict=True`` and gives the task's logits, no subcache needed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .backbones import Backbone
from .errors import TaskError
from .inputs import describe, resizing
from .multitask import MultiTaskModel, input_record
from .backbones import backbone_for
from .task import Task, atomic_write, check_output_file, load_task

FORMATS = ("onnx", "pt2", "torchscript", "timm")


class Deployable(nn.Module):
    """A `MultiTaskModel` returning a tuple of logits in task order (export formats want tensors, not dicts)."""

    def __init__(self, model: MultiTaskModel):
        super().__init__()
        self.model, self.names = model, list(model.names)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:  # (B, 3, S, S) → K × (B, classes_k)
        out = self.model(images)
        return tuple(out[name] for name in self.names)


class Normalised(nn.Module):
    """The in-graph preprocessing step (`export --preprocess`): uint8 RGB (B, 3, S, S), already resized as the
    metadata says → ``/ 255``, ``(x - mean) / std`` → the model."""

    def __init__(self, model: Deployable, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model, self.names = model, model.names
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1) * 255)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1) * 255)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.model((images.float() - self.mean) / self.std)


def export(tasks: Sequence[str | os.PathLike], fmt: str, out: str | os.PathLike, *,
           backbone: Backbone | None = None, preprocess: bool = False, overwrite: bool = False) -> dict:
    """Write ``tasks`` as ``fmt`` (one of `FORMATS`) to ``out`` (a temp file in its folder, flushed and renamed into
    place; an existing ``out`` needs ``overwrite``); returns the metadata written with it. ``preprocess``: the model
    takes uint8 RGB images (resized as the metadata says) and scales and normalises them itself."""
    if fmt not in FORMATS:
        raise TaskError(f"unknown export format {fmt!r}; allowed: {', '.join(FORMATS)}")
    out = check_output_file(out, overwrite=overwrite)
    loaded = [load_task(t) for t in tasks]
    if not loaded:
        raise TaskError("export needs at least one --task")
    backbone = (backbone or backbone_for(loaded[0].meta["backbone"], f"task {loaded[0].path}")).cpu().eval()
    if fmt == "timm":
        return _fold(loaded, backbone, out)
    model = Deployable(MultiTaskModel.from_tasks(backbone, loaded, include_original=False)).eval()
    rec = input_record(loaded)
    if preprocess:
        model = Normalised(model, rec["mean"], rec["std"]).eval()
    meta = metadata(model, loaded, rec, backbone, preprocess)
    size = rec["image_size"]
    # batch 2: a batch of 1 would let exporters fix the batch size
    example = torch.zeros(2, 3, size, size, dtype=torch.uint8 if preprocess else torch.float32)
    writer = {"onnx": _onnx, "pt2": _pt2, "torchscript": _torchscript}[fmt]
    atomic_write(out, lambda tmp: writer(model, example, Path(tmp), meta))
    return meta


def metadata(model: nn.Module, tasks: list[Task], rec: dict, backbone: Backbone, preprocess: bool = False) -> dict:
    """The record written with the model: tasks, output order, and the input — made exactly as the tasks'
    caches' inputs were (``preprocess``: `subcache.inputs` record; ``how``: in words)."""
    size = rec["image_size"]
    how = describe(rec)
    if preprocess:
        how = (f"RGB (gray repeated, alpha dropped) uint8; {resizing(rec)}; layout (batch, 3, {size}, {size}) "
               f"uint8 (the model scales and normalises)")
    return {"format": "subcache-export", "outputs": model.names,
            "tasks": {n: {"classes": t.meta["classes"], "blocks": list(t.blocks), "path": t.path}
                      for n, t in zip(model.names, tasks)},
            "input": {"name": "images", "shape": ["batch", 3, size, size],
                      "dtype": "uint8" if preprocess else "float32", "preprocess": rec, "how": how,
                      "normalised_in_model": preprocess},
            "backbone": backbone.identity()}


def _onnx(model: Deployable, example: torch.Tensor, out: Path, meta: dict) -> None:
    import onnx

    batch = {0: "batch"}
    with torch.inference_mode(False), torch.no_grad():
        torch.onnx.export(model, (example,), str(out), input_names=["images"], output_names=model.names,
                          dynamic_axes={"images": batch, **{n: batch for n in model.names}}, dynamo=False)
    proto = onnx.load(str(out))
    onnx.helper.set_model_props(proto, {"subcache": json.dumps(meta)})
    onnx.save(proto, str(out))


def _pt2(model: Deployable, example: torch.Tensor, out: Path, meta: dict) -> None:
    batch = torch.export.Dim("batch", min=1)
    program = torch.export.export(model, (example,), dynamic_shapes={"images": {0: batch}})
    torch.export.save(program, str(out), extra_files={"subcache.json": json.dumps(meta)})


def _torchscript(model: Deployable, example: torch.Tensor, out: Path, meta: dict) -> None:
    with torch.no_grad():
        traced = torch.jit.trace(model, example, check_trace=False)
    torch.jit.save(traced, str(out), _extra_files={"subcache.json": json.dumps(meta)})


# -- one task back into the plain model ------------------------------------------------------------------------------
def _fold(tasks: list[Task], backbone: Backbone, out: Path) -> dict:
    """The backbone's own state dict with the task's tuned blocks and a new classifier in place."""
    if len(tasks) != 1:
        raise TaskError(f"--format timm folds one task into the plain model; got {len(tasks)} tasks")
    task = tasks[0]
    if task.meta.get("siamese") or task.meta.get("pruned_shapes"):
        raise TaskError(f"task {task.path} is siamese or pruned: its blocks or head do not fit the plain model; "
                        f"export it as onnx, pt2 or torchscript")
    tuned = task.model(backbone)
    state = fold_state(backbone, {i: tuned.tuned_blocks[str(i)] for i in task.blocks}, tuned.head)
    meta = {"format": "subcache-timm", "model": backbone.model_id, "num_classes": len(task.meta["classes"]),
            "classes": task.meta["classes"], "preprocess": task.input_record}
    if out.suffix == ".safetensors":
        from safetensors.torch import save_file

        atomic_write(out, lambda tmp: save_file(state, tmp, metadata={"subcache": json.dumps(meta)}))
    else:
        atomic_write(out, lambda tmp: torch.save(state, tmp))
    return meta


def fold_state(backbone: Backbone, blocks: dict[int, nn.Module], head: nn.Module) -> dict[str, torch.Tensor]:
    """``backbone.model``'s state dict with block i's tensors taken from ``blocks[i]`` and the classifier's from
    ``head`` (matched by tensor identity, so any module tree works)."""
    if not backbone.head.state_dict():
        raise TaskError(f"{backbone.model_id} has no original classifier for the task's head to replace; export "
                        f"it as onnx, pt2 or torchscript")
    keys = {id(t): k for k, t in backbone.model.state_dict(keep_vars=True).items()}
    state = {k: t.detach().clone().contiguous() for k, t in backbone.model.state_dict().items()}
    for original, new in [*((backbone.block(i), m) for i, m in blocks.items()), (backbone.head, head)]:
        theirs = new.state_dict()
        for name, tensor in original.state_dict(keep_vars=True).items():
            if name not in theirs:
                raise TaskError(f"the task's {type(new).__name__} has no {name}; it cannot replace "
                                f"{keys[id(tensor)]} in the plain model")
            state[keys[id(tensor)]] = theirs[name].detach().clone().contiguous()
    return state
