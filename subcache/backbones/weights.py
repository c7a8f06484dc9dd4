"""Local weight files (.pth read without unpickling code, .safetensors) loaded onto a model of any family."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..errors import WeightsError


def _local_state_dict(path: str) -> dict[str, torch.Tensor]:
    p = Path(path)
    if not p.is_file():
        raise WeightsError(f"weights file {path} does not exist; use imagenet, none, or a .pth/.safetensors file")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(p))
        state = torch.load(p, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as exc:  # noqa: BLE001 - any failure to read is the same problem for the user
        raise WeightsError(f"cannot read weights {path}: {str(exc).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise WeightsError(f"{path} does not hold a state dict")
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise WeightsError(f"weights {source} do not fit the model: missing {result.missing_keys[:3]}, "
                           f"unexpected {result.unexpected_keys[:3]}")


def apply_weights(model: nn.Module, weights: str, model_id: str) -> str:
    """Load a local file or 'none'; returns the weights id. Hub weights are handled by the caller."""
    if weights == "none":
        return "none"
    try:
        _load_state(model, _local_state_dict(weights), weights)
    except RuntimeError as exc:  # size mismatch
        raise WeightsError(f"weights {weights} do not fit {model_id}: {str(exc).splitlines()[-1].strip()}") from None
    return f"file:{Path(weights).name}"
