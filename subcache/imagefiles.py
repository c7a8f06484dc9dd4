"""Image files on disk, read safely: an ImageFolder listing that never follows directory symlinks (a link out of
the root, or back into it, would add or relabel images), file names that must be UTF-8 (they become the cache's
keys), decompression bombs refused, and 16-bit images scaled to 8 bits instead of saturated."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import DataError

# torchvision's ImageFolder extensions, so a listing keeps the items (and their order) ImageFolder gave
FOLDER_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def utf8_name(path: str | os.PathLike) -> str:
    """``path`` as text, refused in one line when its name is not UTF-8 (it could not be stored as a key)."""
    text = os.fspath(path)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise DataError(f"file name {os.fsencode(text)!r} is not UTF-8; rename it (keys are stored as UTF-8 "
                        f"text)") from None
    return text


def list_image_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, [(path, class index)]) like torchvision's ImageFolder (class = a sub-folder, files under it at any
    depth, sorted), except that directory symlinks are never followed: neither class folders nor folders below."""
    classes = sorted(utf8_name(e.name) for e in os.scandir(folder) if e.is_dir(follow_symlinks=False))
    if not classes:
        raise DataError(f"{folder} is not an ImageFolder: it has no class sub-folders (<class>/<image>; directory "
                        f"symlinks are not followed)")
    samples = []
    for index, name in enumerate(classes):
        found = [os.path.join(root, f) for root, _, files in sorted(os.walk(folder / name, followlinks=False))
                 for f in sorted(files) if f.lower().endswith(FOLDER_SUFFIXES)]
        if not found:
            raise DataError(f"{folder}: class folder {name!r} holds no image ({', '.join(FOLDER_SUFFIXES)})")
        samples += [(utf8_name(f), index) for f in found]
    return classes, samples


def open_rgb(im, where: str = "image"):
    """A PIL image as 8-bit RGB: 16-bit (and 32-bit integer) grey scaled by 1/257 instead of clipped at 255."""
    from PIL import Image

    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        values = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(np.rint(values / 257), 0, 255).astype(np.uint8), mode="L")
    return im.convert("RGB")


def read_image(path: str, fit):
    """Open an image file and hand it to ``fit``; a decompression bomb or an unreadable file is one DataError."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return fit(im)
    except Image.DecompressionBombError as exc:
        raise DataError(f"{path}: {str(exc).splitlines()[0]} (refused as a decompression bomb)") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise DataError(f"cannot read image {path}: {str(exc).splitlines()[0]}") from None
