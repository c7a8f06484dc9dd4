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
COMPILES = ("auto", "on", "off")
COMPILE_PAYS_ON: tuple[str, ...] = ()  # device types where a compiled step was measured to pay (CPU: it did not)


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


def memory_budget(device: torch.device) -> int:
    """Bytes a resident split may take: half the free GPU memory, or a quarter of the host's RAM."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free // 2
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


def resident_dtype(float32_nbytes: int, stored: torch.dtype, device: torch.device,
                   budget: int | None = None) -> torch.dtype:
    """float32 for tensors kept on the device when that fits the budget, else the cache's 16-bit dtype (float16 for
    an int8 cache: its codes dequantize to floats, never back to int8)."""
    budget = memory_budget(device) if budget is None else budget
    if float32_nbytes <= budget:
        return torch.float32
    return stored if stored.is_floating_point else torch.float16


def autocast(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of a precision option on a device (disabled for fp32)."""
    amp = autocast_dtype(precision)
    return torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None)


def fused_adamw(params: list[torch.Tensor], lr: float, weight_decay: float, device: torch.device,
                fused: bool | None) -> torch.optim.AdamW:
    """AdamW over ``params``; the fused kernel on CUDA by default, or where ``fused`` asks (an error where this torch
    has none for the device)."""
    fused = device.type == "cuda" if fused is None else fused
    if fused and not fused_adamw_supported(device):
        raise ConfigError(f"--fused: this torch ({torch.__version__}) has no fused AdamW for {device.type}; "
                          f"use --no-fused")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None)


def compile_enabled(option: str, device: torch.device) -> bool:
    """Whether `--compile` (auto | on | off) compiles the training step on this device: ``auto`` only where it was
    measured to pay (`COMPILE_PAYS_ON`)."""
    if option not in COMPILES:
        raise ConfigError(f"unknown --compile {option!r}; allowed: {', '.join(COMPILES)}")
    return option == "on" or (option == "auto" and device.type in COMPILE_PAYS_ON)


# Vendors' dense peaks (FLOP/s) for the precisions training uses: fp32 runs convolutions in TF32 on Ampere and
# later by PyTorch's default (cudnn.allow_tf32), so TF32 tensor-core peaks are the ceiling there.
GPU_PEAKS = {  # name fragment → {precision: (FLOP/s, what it is)}
    "H200": {"fp32": (494.7e12, "H200 TF32 tensor-core dense peak"), "bf16": (989.4e12, "H200 BF16 dense peak")},
    "H100": {"fp32": (494.7e12, "H100 SXM TF32 tensor-core dense peak"),
             "bf16": (989.4e12, "H100 SXM BF16 dense peak")},
    "A100": {"fp32": (156e12, "A100 TF32 tensor-core dense peak"), "bf16": (312e12, "A100 BF16 dense peak")},
}


def peak_flops(device: torch.device, precision: str = "fp32") -> tuple[float, str]:
    """(the device's peak FLOP/s for ``precision``, what that figure is): the vendor's dense peak for known GPUs;
    elsewhere (CPUs, other GPUs) the rate of a large matrix multiply measured here, named as such."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in GPU_PEAKS.items():
            if fragment in name and precision in peaks:
                return peaks[precision]
    return _measured_matmul(device, torch.bfloat16 if precision == "bf16" else torch.float32)


def _measured_matmul(device: torch.device, dtype: torch.dtype, n: int = 1024, repeats: int = 8) -> tuple[float, str]:
    import time

    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    rate = 2 * n ** 3 * repeats / (time.perf_counter() - t0)
    where = f"{torch.get_num_threads()} threads" if device.type == "cpu" else torch.cuda.get_device_name(device)
    return rate, f"measured {str(dtype).removeprefix('torch.')} {n}x{n} matmul rate ({device.type}, {where})"
