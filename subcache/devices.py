"""Where tensors live: the device a run asks for, and the device/dtype of what a new tensor will meet.

Every tensor subcache creates is made on the device (and dtype) of the module or data it meets, so the same code
runs on the CPU, on a GPU, and on PyTorch's `meta` device (which the tests use to catch a stray CPU tensor).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from .errors import ConfigError

PRECISIONS = ("fp32", "bf16")


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """auto | cpu | cuda | cuda:N → a device (under torchrun, cuda means this rank's GPU)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        device = f"cuda:{local_rank}"
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ConfigError(f"unknown device {device!r}; allowed: auto, cpu, cuda, cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA GPU is available; use --device cpu or auto")
    return torch.device(device)


def placement(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """(device, floating dtype) of a module's first parameter (or buffer): where its inputs must be made."""
    for t in (*module.parameters(), *module.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def autocast_dtype(precision: str) -> torch.dtype | None:
    """The autocast dtype of a precision option (None: plain float32). fp32 is the default everywhere: on an H200,
    bf16 autocast never beat fp32 for EfficientNet-Lite0 (examples/gpu_grid.py; README, "Speed knobs")."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; allowed: {', '.join(PRECISIONS)}")
    return torch.bfloat16 if precision == "bf16" else None


def fused_adamw_supported(device: torch.device) -> bool:
    """Whether this torch has a fused AdamW kernel for the device (CUDA, and the CPU in recent versions)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # older torch: CUDA only
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()
