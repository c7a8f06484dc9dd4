"""Deterministic image corruptions for distribution-shift tasks (`build --corrupt NAME:SEVERITY`).

Parameters follow CIFAR-10-C (Hendrycks & Dietterich 2019, ``make_cifar_c.py``), severities 1-5, applied to the
uint8 images as the source hands them out — at the dataset's own resolution (28 px for Fashion-MNIST, close to
CIFAR's 32 px for which the parameters were chosen), before resizing to the backbone's input. Random corruptions
draw from a generator seeded by (corruption, severity, item id), so any batch, any order and a resumed build give
the same bits for the same item.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .data import ImageSource
from .errors import DataError

SEED = 0x5C0C  # base of every per-item seed


def _gaussian_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(size=x.shape, scale=c)


def _shot_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return rng.poisson(x * c) / c


def _impulse_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Salt and pepper: a fraction ``c`` of the values set to 0 or 1 (half each), as skimage's s&p."""
    hit, salt = rng.random(x.shape) < c, rng.random(x.shape) < 0.5
    return np.where(hit, salt.astype(x.dtype), x)


def _speckle_noise(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    return x + x * rng.normal(size=x.shape, scale=c)


def _gaussian_blur(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """Separable Gaussian of std ``c`` pixels, kernel truncated at 4 std, reflected edges (scipy's defaults)."""
    radius = max(1, math.ceil(4 * c))
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (t / c) ** 2)
    k = k / k.sum()
    h = torch.from_numpy(x)[:, None]  # (C, 1, H, W)
    h = F.pad(h, (radius, radius, radius, radius), mode="reflect")
    h = F.conv2d(F.conv2d(h, k.view(1, 1, 1, -1)), k.view(1, 1, -1, 1))
    return h[:, 0].numpy()


def _contrast(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    means = x.mean(axis=(1, 2), keepdims=True)
    return (x - means) * c + means


def _brightness(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    """CIFAR-10-C adds ``c`` to HSV value; for gray images that is adding ``c`` to the intensity."""
    if x.shape[0] == 1:
        return x + c
    import matplotlib.colors as mc

    hsv = mc.rgb_to_hsv(np.clip(x.transpose(1, 2, 0), 0, 1))
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return mc.hsv_to_rgb(hsv).transpose(2, 0, 1)


def _pil(x: np.ndarray):
    from PIL import Image

    a = np.clip(np.rint(x * 255), 0, 255).astype(np.uint8)
    return Image.fromarray(a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0))


def _from_pil(im, channels: int) -> np.ndarray:
    a = np.asarray(im, dtype=np.float64) / 255
    return a[None] if channels == 1 else a.transpose(2, 0, 1)


def _pixelate(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    h, w = x.shape[1:]
    small = _pil(x).resize((max(1, int(w * c)), max(1, int(h * c))), Image.BOX)
    return _from_pil(small.resize((w, h), Image.BOX), x.shape[0])


def _jpeg(x: np.ndarray, c: float, rng: np.random.Generator) -> np.ndarray:
    from PIL import Image

    buf = io.BytesIO()
    _pil(x).save(buf, "JPEG", quality=int(c))
    return _from_pil(Image.open(buf), x.shape[0])


Corruption = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]
# name → (function on one float image (C, H, W) in [0, 1], CIFAR-10-C's parameter per severity 1..5)
CORRUPTIONS: dict[str, tuple[Corruption, tuple[float, ...]]] = {
    "gaussian_noise": (_gaussian_noise, (0.04, 0.06, 0.08, 0.09, 0.10)),
    "shot_noise": (_shot_noise, (500, 250, 100, 75, 50)),
    "impulse_noise": (_impulse_noise, (0.01, 0.02, 0.03, 0.05, 0.07)),
    "speckle_noise": (_speckle_noise, (0.06, 0.10, 0.12, 0.16, 0.20)),
    "gaussian_blur": (_gaussian_blur, (0.4, 0.6, 0.7, 0.8, 1.0)),
    "contrast": (_contrast, (0.75, 0.5, 0.4, 0.3, 0.15)),
    "brightness": (_brightness, (0.05, 0.1, 0.15, 0.2, 0.3)),
    "pixelate": (_pixelate, (0.95, 0.9, 0.85, 0.75, 0.65)),
    "jpeg_compression": (_jpeg, (80, 65, 58, 50, 40)),
}
ALIASES = {"blur": "gaussian_blur", "noise": "gaussian_noise", "jpeg": "jpeg_compression"}


def parse_corruption(spec: str) -> tuple[str, int]:
    """``gaussian_noise:3`` → (name, severity); one clear line when the name or severity is not allowed."""
    name, _, sev = spec.partition(":")
    name = ALIASES.get(name.strip(), name.strip())
    if name not in CORRUPTIONS:
        raise DataError(f"unknown corruption {name!r}; allowed: {', '.join([*CORRUPTIONS, *ALIASES])} "
                        f"(as NAME:SEVERITY, e.g. gaussian_noise:3)")
    if sev.strip() not in ("1", "2", "3", "4", "5"):
        raise DataError(f"corruption severity must be 1 to 5 (as {name}:3), got {spec!r}")
    return name, int(sev)


def corrupt(images: torch.Tensor, ids: np.ndarray, name: str, severity: int) -> torch.Tensor:
    """uint8 (B, C, H, W) → the same images corrupted, each from its own generator seeded by its id."""
    fn, params = CORRUPTIONS[name]
    c = params[severity - 1]
    index = list(CORRUPTIONS).index(name)
    out = np.empty(tuple(images.shape), dtype=np.uint8)
    for i, (image, item) in enumerate(zip(images.cpu().numpy(), np.asarray(ids))):
        rng = np.random.default_rng([SEED, index, severity, int(item)])
        y = fn(image.astype(np.float64) / 255, c, rng)
        out[i] = np.clip(np.rint(y * 255), 0, 255).astype(np.uint8)
    return torch.from_numpy(out).to(images.device)


@dataclass
class CorruptedSource(ImageSource):
    """An image source whose items come out corrupted (``load`` and ``take``)."""

    corruption: tuple[str, int] = ("gaussian_noise", 1)

    def load(self, start: int, stop: int, pre, fit=None) -> torch.Tensor:
        return corrupt(super().load(start, stop, pre, fit), self.ids[start:stop], *self.corruption)

    def frame(self, i: int) -> torch.Tensor:
        return corrupt(super().frame(i)[None], self.ids[i:i + 1], *self.corruption)[0]

    def take(self, positions: np.ndarray, pre) -> torch.Tensor:
        return corrupt(super().take(positions, pre), self.ids[np.asarray(positions)], *self.corruption)


def corrupted(source: ImageSource, spec: str | None) -> ImageSource:
    """``source`` with the corruption ``spec`` (NAME:SEVERITY) applied to every item; None: unchanged."""
    if not spec:
        return source
    kept = {f.name: getattr(source, f.name) for f in fields(ImageSource) if f.init}
    return CorruptedSource(**kept, corruption=parse_corruption(spec))
