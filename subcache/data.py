"""Image sources: Fashion-MNIST, CIFAR-10/100, Flowers-102, ImageFolder directories, `.npz` files, Hugging Face
datasets (`hf:PATH`: saved with `save_to_disk`, or parquet files) and, from Python, dataset objects.

A source is one split of a dataset. It hands out uint8 image batches (B, C, H, W) by position; `to_input` turns
them into the backbone's normalised float input. Array datasets are resized as a batch on the device; photos are
decoded, resized and center-cropped with PIL in worker threads.
"""
from __future__ import annotations

import functools
import gzip
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Preprocess
from .corrupt import corrupt, parse_corruption
from .errors import DataError
from .imagefiles import list_image_folder, open_rgb, read_image, utf8_name

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot"]
NAMED = ("fashion-mnist", "cifar10", "cifar100", "flowers102")
MAX_CLASSES = 1_000_000  # a label beyond this is an index gone wrong, not a class (each class gets a name)
SPLIT_NAMES = ("train", "test", "val", "valid", "validation")  # an image folder with these holds splits
UNLABELLED = "unlabelled"  # the split name of a flat folder of images, or of one image
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


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
    item: Callable[[int], Any] | None = None  # position → PIL image or uint8 array, for dataset objects
    keys: Sequence[str] | None = None  # where each item came from (path under the folder given); default: id
    _pool: ThreadPoolExecutor | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def __getstate__(self) -> dict:
        """Picklable for decode processes started from a fresh interpreter: the thread pool stays behind."""
        return {**self.__dict__, "_pool": None}

    def subset(self, limit: int | None) -> "ImageSource":
        """The first ``limit`` items (all when None)."""
        if limit is None:
            return self
        if limit <= 0:
            raise DataError(f"--limit must be a positive number of images, got {limit}")
        keep = slice(0, min(limit, len(self)))
        return ImageSource(self.name, self.split, self.labels[keep], self.ids[keep], self.classes,
                           None if self.array is None else self.array[keep],
                           None if self.files is None else list(self.files)[keep], self.item,
                           None if self.keys is None else list(self.keys)[keep])

    def source_keys(self) -> list[str]:
        """Where each item came from: its path under the folder given, else its index in the dataset."""
        return [str(k) for k in (self.keys if self.keys is not None else self.ids.tolist())]

    def load(self, start: int, stop: int, pre: Preprocess,
             fit: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
        """uint8 images [start, stop) as (B, C, H, W); photos already resized/cropped to the input size (by ``fit``,
        PIL image → uint8 (3, S, S), when given: then arrays are fitted the same way, one by one)."""
        if self.array is not None and fit is None:
            return _bchw(np.array(self.array[start:stop]))  # a writable copy
        if self.item is not None:  # a dataset object's __getitem__ need not be thread-safe (FakeData reseeds torch)
            return torch.stack([self._photo(i, pre, fit) for i in range(start, stop)])
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1)))
        return torch.stack(list(self._pool.map(lambda i: self._photo(i, pre, fit), range(start, stop))))

    def _photo(self, i: int, pre: Preprocess, fit: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
        fit = fit or functools.partial(_fit_photo, pre=pre)
        if self.array is not None:
            return fit(_as_pil(self.array[i]))
        if self.item is not None:
            return fit(_as_pil(self.item(i)))
        return read_image(self.files[i], fit)

    def frame(self, i: int) -> torch.Tensor:
        """Item ``i`` at its own size as uint8 (C, H, W): arrays as stored, images decoded to RGB."""
        if self.array is not None:
            return _bchw(np.array(self.array[i:i + 1]))[0]
        return self._photo(i, None, lambda im: torch.from_numpy(np.array(open_rgb(im))).permute(2, 0, 1))

    def take(self, positions: np.ndarray, pre: Preprocess) -> torch.Tensor:
        """uint8 images at arbitrary positions, as (B, C, H, W)."""
        if self.array is not None:
            return _bchw(self.array[np.asarray(positions)])
        return torch.stack([self._photo(int(i), pre) for i in positions])


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


def _bchw(array: np.ndarray) -> torch.Tensor:
    """uint8 N×H×W or N×H×W×C → (N, C, H, W)."""
    x = torch.from_numpy(array)
    return x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)


def _as_pil(image: Any):
    """A PIL image, or a uint8 array H×W[×C] / tensor C×H×W, as a PIL image."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, torch.Tensor):
        image = image.permute(1, 2, 0).numpy() if image.ndim == 3 else image.numpy()
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim not in (2, 3):
        raise DataError(f"dataset items must be (PIL image | uint8 array H×W[×C], label); got an image of "
                        f"{array.dtype} {array.shape}")
    return Image.fromarray(array.squeeze(-1) if array.ndim == 3 and array.shape[-1] == 1 else array)


def _read_photo(path: str, pre: Preprocess) -> torch.Tensor:
    return read_image(path, lambda im: _fit_photo(im, pre))


def _fit_photo(im, pre: Preprocess) -> torch.Tensor:
    """PIL image → uint8 (3, S, S): short side to size / crop_pct, then a center crop (timm's eval transform)."""
    return _crop_fit(pre)(im)


@functools.lru_cache(maxsize=8)
def _crop_fit(pre: Preprocess) -> Callable[[Any], torch.Tensor]:
    return crop_fit(pre.to_dict())


def crop_transform(rec: dict) -> Callable:
    """timm's eval transform up to the tensor: PIL image → resized and center-cropped PIL image."""
    from timm.data import create_transform

    full = create_transform(input_size=(3, rec["image_size"], rec["image_size"]), interpolation=rec["interpolation"],
                            crop_pct=rec["crop_pct"], mean=tuple(rec["mean"]), std=tuple(rec["std"]))
    return type(full)(full.transforms[:2])  # Resize, CenterCrop (then ToTensor, Normalize: done on the device)


def crop_fit(rec: dict) -> Callable[[Any], torch.Tensor]:
    """PIL image → uint8 (3, S, S), resized and cropped as ``rec`` says."""
    fit = crop_transform(rec)
    return lambda im: torch.from_numpy(np.array(fit(open_rgb(im)), dtype=np.uint8)).permute(2, 0, 1)


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
def open_source(spec: Any, split: str, *, limit: int | None = None, download: bool = False,
                root: str | os.PathLike | None = None, corrupt: str | None = None) -> ImageSource:
    """A split of a dataset: ``spec`` is a known name, an ImageFolder directory, an ``.npz`` file, ``hf:PATH``,
    an image file, or a dataset object (torchvision, Hugging Face, any sequence of (image, label)) for that split.
    ``corrupt``: ``NAME:SEVERITY`` (see `subcache.corrupt`) corrupts every item deterministically."""
    if corrupt:
        parse_corruption(corrupt)  # a bad spec fails before any data is read
    root = Path(root or os.environ.get("SUBCACHE_DATA", Path.home() / ".cache" / "subcache" / "data"))
    if not isinstance(spec, str | os.PathLike):
        source = from_dataset(spec, split)
    else:
        source = _from_spec(os.fspath(spec), split, download, root)
    if len(source) == 0:
        raise DataError(f"{source.name} split {split} holds no images")
    return corrupted(source.subset(limit), corrupt)


def _from_spec(spec: str, split: str, download: bool, root: Path) -> ImageSource:
    if spec == "fashion-mnist":
        source = _fashion_mnist(split, download, root)
    elif spec in ("cifar10", "cifar100"):
        source = _cifar(spec, split, download, root)
    elif spec == "flowers102":
        source = _flowers(split, download, root)
    elif spec.endswith(".npz"):
        source = _npz(Path(spec), split)
    elif spec.startswith("hf:"):
        source = from_dataset(_hf_split(spec.removeprefix("hf:"), split), split, name=spec)
    elif Path(spec).is_dir() and _images_in(Path(spec)):
        source = _unlabelled(spec, split, _images_in(Path(spec)))
    elif Path(spec).is_dir():
        source = _image_folder(Path(spec), split)
    elif Path(spec).suffix.lower() in IMAGE_SUFFIXES and Path(spec).is_file():
        source = _unlabelled(spec, split, [Path(spec)])
    elif Path(spec).suffix.lower() in (*IMAGE_SUFFIXES, ".npz", ".parquet") or os.sep in spec:
        raise DataError(f"{spec}: file or folder not found")
    else:
        raise DataError(f"unknown data {spec!r}; use one of {', '.join(NAMED)}, an ImageFolder directory, an "
                        f".npz file with x (uint8 N×H×W[×C]) and y, hf:PATH, or an image file")
    return source


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


def split_layout(path: Path) -> bool:
    """Whether an image folder holds splits (``DIR/<split>/<class>/``) rather than classes directly (``DIR/<class>/``,
    torchvision's ImageFolder layout: one split, ``train``)."""
    return any((path / s).is_dir() for s in SPLIT_NAMES)


def default_split(spec: Any, wanted: str = "test") -> str:
    """``wanted``, except for a folder of class folders (one split: ``train``)."""
    path = Path(os.fspath(spec)) if isinstance(spec, str | os.PathLike) else None
    one = path is not None and path.is_dir() and not _images_in(path) and not split_layout(path)
    return "train" if one else wanted


def _image_folder(path: Path, split: str) -> ImageSource:
    if not split_layout(path) and split != "train":
        raise DataError(f"{path} holds class folders directly (the ImageFolder layout): one split, train; use "
                        f"--split train, or lay it out as {path}/<split>/<class>/<image>")
    folder = path / split if split_layout(path) else path
    if not folder.is_dir():
        raise DataError(f"no split {split!r} in {path}: expected {path / split}/<class>/<image>")
    classes, samples = list_image_folder(folder)
    y = np.asarray([s[1] for s in samples], dtype=np.int64)
    files = [s[0] for s in samples]
    return ImageSource(str(path), split, y, np.arange(len(y)), classes, files=files,
                       keys=[Path(f).relative_to(path).as_posix() for f in files])


def _images_in(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (an unlabelled folder, e.g. for `predict`)."""
    return sorted(Path(utf8_name(f)) for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)


def _unlabelled(spec: str, split: str, files: list[Path]) -> ImageSource:
    """Images without labels (label -1, no classes), keyed by file name: the split ``unlabelled``."""
    return ImageSource(spec, UNLABELLED, np.full(len(files), -1, np.int64), np.arange(len(files)), [],
                       files=[str(f) for f in files], keys=[f.name for f in files])


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
    if num_classes > MAX_CLASSES:
        raise DataError(f"{path}: {yk} holds label {num_classes - 1}; labels are class indices below {MAX_CLASSES}")
    return ImageSource(str(path), split, y.astype(np.int64), np.arange(len(y)),
                       [str(i) for i in range(num_classes)], array=x)


# -- dataset objects: torchvision, Hugging Face, sequences of (image, label) ---------------------------------------
def from_dataset(ds: Any, split: str, name: str | None = None) -> ImageSource:
    """One split from a dataset object: a Hugging Face ``datasets.Dataset`` (an image column and a label column),
    a torchvision dataset, or any sequence of (PIL image | uint8 array, label). Class names come from the
    ClassLabel feature or ``ds.classes``; keys are the positions."""
    if hasattr(ds, "features") and hasattr(ds, "column_names"):
        return _hf_source(ds, split, name or type(ds).__name__)
    if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
        raise DataError(f"cannot read images from a {type(ds).__name__}; pass a name, a path, a torchvision or "
                        f"Hugging Face dataset, or a sequence of (image, label)")
    targets = getattr(ds, "targets", None)
    y = np.asarray(targets if targets is not None else [ds[i][1] for i in range(len(ds))], dtype=np.int64)
    classes = [str(c) for c in getattr(ds, "classes", None) or range(int(y.max()) + 1 if len(y) else 0)]
    return ImageSource(name or type(ds).__name__, split, y, np.arange(len(y)), classes, item=lambda i: ds[i][0])


def _hf_source(ds: Any, split: str, name: str) -> ImageSource:
    import datasets

    image_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.Image)]
    label_cols = [c for c, f in ds.features.items() if isinstance(f, datasets.ClassLabel)]
    image_col = (image_cols or [c for c in ("image", "img") if c in ds.column_names] or [None])[0]
    label_col = (label_cols or [c for c in ("label", "labels") if c in ds.column_names] or [None])[0]
    if image_col is None or label_col is None:
        raise DataError(f"{name}: a Hugging Face dataset needs an image column and a label column; it has "
                        f"{ds.column_names}")
    y = np.asarray(ds[label_col], dtype=np.int64)
    feature = ds.features[label_col]
    classes = (list(feature.names) if isinstance(feature, datasets.ClassLabel)
               else [str(c) for c in range(int(y.max()) + 1 if len(y) else 0)])
    return ImageSource(name, split, y, np.arange(len(y)), classes, item=lambda i: ds[i][image_col])


def _hf_split(path: str, split: str) -> Any:
    """``hf:PATH``: a folder from ``save_to_disk`` (Dataset or DatasetDict), a parquet file (one split), or a
    folder of ``<split>-*.parquet`` / ``<split>/*.parquet`` files. Offline: nothing is downloaded."""
    try:
        import datasets
    except ImportError:
        raise DataError("hf:PATH needs the Hugging Face datasets package: pip install 'subcache[hf]'") from None
    p = Path(path)
    if (p / "dataset_dict.json").is_file() or (p / "state.json").is_file():
        data = datasets.load_from_disk(str(p))
        if isinstance(data, datasets.DatasetDict):
            if split not in data:
                raise DataError(f"hf:{path} has no split {split!r}; it has {', '.join(data)}")
            return data[split]
        return _only_train(data, path, split)
    if p.is_file() and p.suffix == ".parquet":
        return _only_train(datasets.Dataset.from_parquet(str(p)), path, split)
    files = sorted({*p.rglob(f"{split}-*.parquet"), *p.rglob(f"{split}/*.parquet")}) if p.is_dir() else []
    if not files:
        raise DataError(f"hf:{path}: expected a folder saved with Dataset.save_to_disk, a .parquet file, or "
                        f"{split}-*.parquet files under it")
    return datasets.Dataset.from_parquet([str(f) for f in files])


def _only_train(data: Any, path: str, split: str) -> Any:
    if split != "train":
        raise DataError(f"hf:{path} is a single dataset, used as split train; no split {split!r}")
    return data
