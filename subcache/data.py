"""Image sources: Fashion-MNIST, CIFAR-10/100, Flowers-102, ImageFolder directories and `.npz` files.

A source is one split of a dataset. It hands out uint8 image batches (B, C, H, W) by position; `to_input` turns
them into the backbone's normalised float input. Array datasets are resized as a batch on the device; photos are
decoded, resized and center-cropped with PIL in worker threads.
"""
from __future__ import annotations

import gzip
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Preprocess
from .errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
NAMED = ("fashion-mnist", "cifar10", "cifar100", "flowers102")


@dataclass
class ImageSource:
    """One split of a dataset: images by position, labels, and ids (index into the original split)."""

    name: str
    split: str
    labels: np.ndarray  # (N,) int64
    ids: np.ndarray  # (N,) int64
    classes: list[str]
    array: np.ndarray | None = None  # (N, H, W[, C]) uint8, for in-memory datasets
    files: Sequence[str] | None = None  # image paths, for photo datasets
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, limit: int | None) -> "ImageSource":
        """The first ``limit`` items (all when None)."""
        if limit is None:
            return self
        if limit <= 0:
            raise DataError(f"--limit must be a positive number of images, got {limit}")
        keep = slice(0, min(limit, len(self)))
        return ImageSource(self.name, self.split, self.labels[keep], self.ids[keep], self.classes,
                           None if self.array is None else self.array[keep],
                           None if self.files is None else list(self.files)[keep])

    def load(self, start: int, stop: int, pre: Preprocess) -> torch.Tensor:
        """uint8 images [start, stop) as (B, C, H, W); photos already resized/cropped to the input size."""
        if self.array is not None:
            return _bchw(np.array(self.array[start:stop]))  # a writable copy
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))
        images = list(self._pool.map(lambda f: _read_photo(f, pre), list(self.files[start:stop])))
        return torch.stack(images)


    def take(self, positions: np.ndarray, pre: Preprocess) -> torch.Tensor:
        """uint8 images at arbitrary positions, as (B, C, H, W)."""
        if self.array is not None:
            return _bchw(self.array[np.asarray(positions)])
        return torch.stack([_read_photo(self.files[int(i)], pre) for i in positions])


def _bchw(array: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W or N×H×W×C → (N, C, H, W)."""
    x = torch.from_numpy(array)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def _read_photo(path: str, pre: Preprocess) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = pre.image_size / pre.crop_pct / min(im.size)
        w, h = max(pre.image_size, round(im.size[0] * scale)), max(pre.image_size, round(im.size[1] * scale))
        resample = Image.BICUBIC if pre.interpolation == "bicubic" else Image.BILINEAR
        im = im.resize((w, h), resample)
        left, top = (w - pre.image_size) // 2, (h - pre.image_size) // 2
        im = im.crop((left, top, left + pre.image_size, top + pre.image_size))
        return torch.from_numpy(np.array(im, dtype=np.uint8)).permute(2, 0, 1)


def to_input(images: torch.Tensor, pre: Preprocess, flip: bool = False) -> torch.Tensor:
    """uint8 (B, C, H, W) → normalised float (B, 3, S, S): gray→RGB, drop alpha, resize, scale, normalise."""
    x = images.float().div_(255)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    elif x.shape[1] == 4:
        x = x[:, :3]
    if x.shape[-2:] != (pre.image_size, pre.image_size):
        mode = "bicubic" if pre.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=(pre.image_size, pre.image_size), mode=mode, antialias=True,
                          align_corners=False).clamp_(0, 1)
    if flip:
        x = x.flip(-1)
    mean = torch.tensor(pre.mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


# ---------------------------------------------------------------------------------------------------------------
def open_source(spec: str, split: str, *, limit: int | None = None, download: bool = False,
                root: str | os.PathLike | None = None) -> ImageSource:
    """A split of a dataset named by ``spec``: a known name, an ImageFolder directory or an ``.npz`` file."""
    root = Path(root or os.environ.get("SUBCACHE_DATA", Path.home() / ".cache" / "subcache" / "data"))
    if spec == "fashion-mnist":
        source = _fashion_mnist(split, download, root)
    elif spec in ("cifar10", "cifar100"):
        source = _cifar(spec, split, download, root)
    elif spec == "flowers102":
        source = _flowers(split, download, root)
    elif spec.endswith(".npz"):
        source = _npz(Path(spec), split)
    elif Path(spec).is_dir():
        source = _image_folder(Path(spec), split)
    else:
        raise DataError(f"unknown data {spec!r}; use one of {', '.join(NAMED)}, an ImageFolder directory or an "
                        f".npz file with x (uint8 N×H×W[×C]) and y")
    if len(source) == 0:
        raise DataError(f"{spec} split {split} holds no images")
    return source.subset(limit)


def _check_split(name: str, split: str, allowed: Sequence[str]) -> None:
    if split not in allowed:
        raise DataError(f"{name} has no split {split!r}; allowed: {', '.join(allowed)}")


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _fashion_mnist(split: str, download: bool, root: Path) -> ImageSource:
    _check_split("fashion-mnist", split, ("train", "test"))
    prefix = "train" if split == "train" else "t10k"
    for folder in (Path(os.environ.get("SUBCACHE_FASHION_MNIST", FASHION_MNIST_DIR)), root / "FashionMNIST" / "raw"):
        images, labels = folder / f"{prefix}-images-idx3-ubyte.gz", folder / f"{prefix}-labels-idx1-ubyte.gz"
        if images.is_file() and labels.is_file():
            x, y = _read_idx(images), _read_idx(labels).astype(np.int64)
            return ImageSource("fashion-mnist", split, y, np.arange(len(y)), FASHION_CLASSES, array=x)
    if download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(str(root), train=split == "train", download=True)
        return _fashion_mnist(split, False, root)
    raise DataError(f"Fashion-MNIST not found in {FASHION_MNIST_DIR}: apt-get install dataset-fashion-mnist "
                    f"(Debian), set SUBCACHE_FASHION_MNIST to a folder of the idx .gz files, or pass --download")


def _torchvision_dataset(factory, name: str, download: bool, **kwargs):
    try:
        return factory(**kwargs, download=download)
    except RuntimeError as exc:
        if download:
            raise DataError(f"cannot download {name}: {str(exc).splitlines()[0]}") from None
        raise DataError(f"{name} not found under {kwargs['root']}: pass --download when online, or set "
                        f"SUBCACHE_DATA to the folder that holds it") from None


def _cifar(name: str, split: str, download: bool, root: Path) -> ImageSource:
    from torchvision.datasets import CIFAR10, CIFAR100

    _check_split(name, split, ("train", "test"))
    ds = _torchvision_dataset(CIFAR10 if name == "cifar10" else CIFAR100, name, download, root=str(root),
                              train=split == "train")
    y = np.asarray(ds.targets, dtype=np.int64)
    return ImageSource(name, split, y, np.arange(len(y)), list(ds.classes), array=ds.data)


def _flowers(split: str, download: bool, root: Path) -> ImageSource:
    from torchvision.datasets import Flowers102

    _check_split("flowers102", split, ("train", "val", "test"))
    ds = _torchvision_dataset(Flowers102, "flowers102", download, root=str(root), split=split)
    y = np.asarray(ds._labels, dtype=np.int64)
    return ImageSource("flowers102", split, y, np.arange(len(y)), [str(i) for i in range(102)],
                       files=[str(f) for f in ds._image_files])


def _image_folder(path: Path, split: str) -> ImageSource:
    from torchvision.datasets import ImageFolder

    folder = path / split if (path / split).is_dir() else (path if split == "train" else None)
    if folder is None:
        raise DataError(f"no split {split!r} in {path}: expected {path / split}/<class>/<image>")
    try:
        ds = ImageFolder(str(folder))
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"{folder} is not an ImageFolder (<class>/<image> files): {str(exc).splitlines()[0]}") from None
    y = np.asarray(ds.targets, dtype=np.int64)
    return ImageSource(str(path), split, y, np.arange(len(y)), list(ds.classes), files=[s[0] for s in ds.samples])


def _npz(path: Path, split: str) -> ImageSource:
    if not path.is_file():
        raise DataError(f"{path} does not exist")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
        raise DataError(f"cannot read {path} as .npz: {str(exc).splitlines()[0]}") from None
    keys = set(npz.files)
    xk, yk = (f"x_{split}", f"y_{split}") if f"x_{split}" in keys else ("x", "y")
    if xk not in keys or yk not in keys or (xk == "x" and split != "train" and any(k.startswith("x_") for k in keys)):
        raise DataError(f"{path} needs arrays x and y (or x_{split} and y_{split}); it has {sorted(keys)}")
    try:
        x, y = npz[xk], npz[yk]
    except ValueError as exc:  # object arrays need pickle, which is never allowed
        raise DataError(f"cannot read {path}: {str(exc).splitlines()[0]}; store plain uint8/int arrays") from None
    if x.dtype != np.uint8 or x.ndim not in (3, 4) or (x.ndim == 4 and x.shape[-1] not in (1, 3, 4)):
        raise DataError(f"{path}: {xk} must be uint8 N×H×W or N×H×W×C with C in 1, 3, 4; got {x.dtype} "
                        f"{x.shape}")
    if y.ndim != 1 or len(y) != len(x) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise DataError(f"{path}: {yk} must be N non-negative integer labels matching {xk} ({len(x)}); got "
                        f"{y.dtype} {y.shape}")
    num_classes = int(y.max()) + 1 if len(y) else 0
    return ImageSource(str(path), split, y.astype(np.int64), np.arange(len(y)),
                       [str(i) for i in range(num_classes)], array=x)
