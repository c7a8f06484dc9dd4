"""How a cache's inputs were made — recorded with the cache and every task trained on it — and made the same way
again wherever images meet a task (`predict`, `export`, `Task.transform`), so a task answers the same on the
images it was trained on whether they come from the dataset or from files.

A record is the backbone's `Preprocess` plus ``source`` (``array``: in-memory frames; ``file``: decoded images and
dataset objects), ``resize`` and ``antialias``:

- ``frame``: the whole frame resized to ``image_size`` × ``image_size`` (torch, ``interpolation``, antialiased), no
  crop — how array datasets (Fashion-MNIST, CIFAR, ``.npz``) are cached;
- ``crop``: the short side resized to ``image_size / crop_pct``, then a center crop (timm's eval transform on PIL
  images, ``interpolation``) — how image files and dataset objects are cached.

Then ``/ 255``, ``(x - mean) / std`` per channel.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from .backbones import Preprocess
from .data import _as_pil, crop_fit, to_input
from .imagefiles import open_rgb
from .progress import warn

FRAME, CROP = "frame", "crop"


def record(pre: Preprocess, source: Any) -> dict:
    """The record of a cache built from ``source`` (an `ImageSource`) with ``pre``."""
    kind = "array" if source.array is not None else "file"
    return {**pre.to_dict(), "source": kind, "resize": FRAME if kind == "array" else CROP, "antialias": True}


def recorded(preprocess: dict, data: str | None = None) -> dict:
    """A cache's or task's ``preprocess`` attrs as a full record (older records lack ``resize``: derived from
    the data they name, an array dataset or ``.npz`` resized whole-frame, anything else cropped)."""
    if "resize" in preprocess:
        return dict(preprocess)
    arrays = data is not None and (data in ("fashion-mnist", "cifar10", "cifar100") or str(data).endswith(".npz"))
    return {**preprocess, "source": "array" if arrays else "file", "resize": FRAME if arrays else CROP,
            "antialias": True}


def preprocess_of(rec: dict) -> Preprocess:
    return Preprocess(int(rec["image_size"]), tuple(rec["mean"]), tuple(rec["std"]), float(rec["crop_pct"]),
                      rec["interpolation"])


def resizing(rec: dict) -> str:
    """How ``rec`` resizes, in words."""
    size, interp = rec["image_size"], rec["interpolation"]
    if rec["resize"] == FRAME:
        return f"the whole frame resized to {size}×{size} ({interp}, antialiased; no crop)"
    return (f"the short side resized to {size} / crop_pct ({rec['crop_pct']}) = {int(size / rec['crop_pct'])} "
            f"({interp}), then a center crop of {size}×{size}")


def describe(rec: dict) -> str:
    """The record in words, for export metadata."""
    size = rec["image_size"]
    return (f"RGB (gray repeated, alpha dropped) scaled to [0, 1]; {resizing(rec)}; subtract mean and divide by "
            f"std per channel; layout (batch, 3, {size}, {size}) float32")


def note_mismatch(rec: dict, source: Any, what: str = "the task") -> None:
    """Say once when ``source``'s kind is not what ``rec`` was made from, and that ``rec`` is followed."""
    kind = "array" if source.array is not None else "file"
    if kind == rec.get("source", kind):
        return
    made = "arrays" if rec["source"] == "array" else "image files"
    warn(f"note: {what} was trained on {made} ({resizing(rec)}); {source.name} is "
              f"prepared the same way to match")


def load_input(source: Any, start: int, stop: int, rec: dict, device: torch.device | str = "cpu") -> torch.Tensor:
    """Items [start, stop) of ``source`` as the normalised float input ``rec`` describes, on ``device``."""
    pre = preprocess_of(rec)
    if rec["resize"] == CROP:
        return to_input(source.load(start, stop, pre, fit=crop_fit(rec)).to(device), pre)
    if source.array is not None:
        return to_input(source.load(start, stop, pre).to(device), pre)
    frames = [source.frame(i) for i in range(start, stop)]
    return torch.cat([to_input(group.to(device), pre) for group in _same_size_runs(frames)])


def _same_size_runs(frames: list[torch.Tensor]) -> list[torch.Tensor]:
    """Consecutive frames of one size stacked (B, C, H, W), in order."""
    runs: list[list[torch.Tensor]] = []
    for f in frames:
        if runs and runs[-1][0].shape == f.shape:
            runs[-1].append(f)
        else:
            runs.append([f])
    return [torch.stack(r) for r in runs]


def transform(rec: dict) -> Callable[[Any], torch.Tensor]:
    """One image (PIL image, uint8 array H×W[×C] or tensor C×H×W) → normalised float (3, S, S), as ``rec`` says:
    the task's inputs made the way its cache's were."""
    pre, fit = preprocess_of(rec), crop_fit(rec)

    def apply(image: Any) -> torch.Tensor:
        im = open_rgb(_as_pil(image))
        uint8 = fit(im) if rec["resize"] == CROP else torch.from_numpy(np.array(im)).permute(2, 0, 1)
        return to_input(uint8.unsqueeze(0), pre)[0]

    return apply
