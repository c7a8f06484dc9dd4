"""Feature-space augmentation, batched on the device (no per-sample Python).

Beware: a flipped activation map is not the activation of the flipped image (cosine ≈ 0.62 at Lite0 block 4's
input, ≈ 0.93 at blocks 13–16). When the cache holds exact mirrored views (`build --flip-views`), `flip` uses them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import ConfigError

AUGMENTS = ("flip", "crop")


def parse_augment(spec: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """``flip,crop`` / ``none`` → a tuple of known names; raises on unknown names."""
    if spec is None:
        return ()
    parts = spec if isinstance(spec, tuple) else tuple(p.strip() for p in spec.split(",") if p.strip())
    parts = tuple(p for p in parts if p != "none")
    unknown = [p for p in parts if p not in AUGMENTS]
    if unknown:
        raise ConfigError(f"unknown augmentation {unknown[0]!r}; allowed: flip, crop, flip,crop or none")
    return parts


def mirror(x: torch.Tensor) -> torch.Tensor:
    """Horizontal mirror of activation maps (B, C, H, W), or of the patch grid of tokens (B, T, D)."""
    if x.ndim == 4:
        return x.flip(-1)
    tokens = x.shape[1]
    grid = math.isqrt(tokens)
    prefix = tokens - grid * grid  # class/register tokens come first
    patches = x[:, prefix:].unflatten(1, (grid, grid)).flip(2).flatten(1, 2)
    return torch.cat([x[:, :prefix], patches], dim=1)


def batch_flip(x: torch.Tensor, gen: torch.Generator, x_flip: torch.Tensor | None = None) -> torch.Tensor:
    """Mirror a random half of the batch (exact mirrored views when given)."""
    mask = torch.rand(x.shape[0], generator=gen, device=gen.device) < 0.5
    mask = mask.to(x.device).view(-1, *([1] * (x.ndim - 1)))
    return torch.where(mask, mirror(x) if x_flip is None else x_flip, x)


def batch_crop(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """Random translation by up to ``pad`` pixels: reflect-pad the maps, then crop each sample at its offset."""
    if x.ndim != 4:
        raise ConfigError("crop needs a convolutional cache (N, C, H, W); token caches support flip only")
    b, c, h, w = x.shape
    pad = min(pad, h - 1, w - 1)
    if pad <= 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dy = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    dx = torch.randint(0, 2 * pad + 1, (b,), generator=gen, device=gen.device).to(x.device)
    rows = (dy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
    cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
    batch = torch.arange(b, device=x.device)[:, None, None, None]
    chans = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chans, rows, cols]


def default_pad(shape: tuple[int, ...]) -> int:
    """Crop padding for a map of this shape: 1/8 of its side, at least one pixel."""
    return max(1, shape[-1] // 8) if len(shape) == 3 else 0


def apply(x: torch.Tensor, augments: tuple[str, ...], gen: torch.Generator, x_flip: torch.Tensor | None = None,
          pad: int = 1) -> torch.Tensor:
    if "flip" in augments:
        x = batch_flip(x, gen, x_flip)
    if "crop" in augments:
        x = batch_crop(x, gen, pad)
    return x
