"""The build's pipeline around the forward: decode ahead, write behind.

Decoding, shared by `build`, `predict` and `bench score`: uint8 images of a source, range by range, in
order, decoded in worker processes (``torch.utils.data.DataLoader`` workers, one core each) or, with ``workers=0``,
in a thread of the main process. The bits do not depend on the number of workers: every range is decoded by the
same code, only elsewhere.

On CUDA, ``decode="gpu"`` reads the JPEG files' bytes in the workers and decodes them as a batch on the device
(nvjpeg through ``torchvision.io.decode_jpeg``), then resizes and crops there. Its pixels differ slightly from
Pillow's, so a store records which decoder made it.

Forwarding: whole batches fixed by position (`covering`), whatever the store's units; their activations are
regrouped into units (`by_unit`) for writing.

Writing: units are encoded (compression, crc32c) and written by a small thread pool (`Writer`).
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import pickle
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from .backbones import Preprocess
from .data import CorruptedSource, ImageSource
from .errors import ConfigError

MAX_WORKERS = 8  # default cap on decode processes
WRITERS = 4  # at most this many units are encoded and written at once
DECODERS = ("cpu", "gpu")
Range = tuple[int, int]


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters
_MALLOC_ENV = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


def reuse_host_memory() -> bool:
    """Keep freed host memory in the process for the next batch (glibc only; once per process, inherited by worker
    processes): a CPU forward frees and allocates the same large activations batch after batch, and by default glibc
    hands each one (any block over 32 MiB) back to the kernel and maps it afresh — every page faulted and zeroed
    again, which made sys time exceed user time at 224 px. Allocations up to 1 GiB then come from the heap, which
    is never trimmed: the process keeps its peak memory. Skipped when a MALLOC_* tuning variable is set (the user's
    choice wins). Returns whether it took effect."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux") or any(k in os.environ for k in _MALLOC_ENV):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30) and libc.mallopt(M_TRIM_THRESHOLD, -1))
    except (OSError, AttributeError):  # not glibc (musl has no mallopt tuning)
        return False


def default_workers(device: torch.device | None = None) -> int:
    """Decode processes by default: when the forward runs on a GPU, the cores this process may use, capped at
    MAX_WORKERS; on the CPU 0 — the forward already uses every core, and the main process's decode threads (Pillow
    releases the GIL) cost less CPU than worker processes (measured: README, *Benchmarks*)."""
    if device is None or device.type != "cuda":
        return 0
    return min(MAX_WORKERS, len(os.sched_getaffinity(0)))


def check_workers(workers: int | None, device: torch.device | None = None) -> int:
    if workers is None:
        return default_workers(device)
    if workers < 0:
        raise ConfigError(f"--workers must be 0 (decode in the main process) or a positive number, got {workers}")
    return workers


def decodes(source: ImageSource) -> bool:
    """Whether a source's items cost real work to produce (photos to decode, corruptions to draw), so worker
    processes pay: in-memory arrays are sliced in the main process, whatever --workers says."""
    return source.array is None or isinstance(source, CorruptedSource)


def load_images(source: ImageSource, pre: Preprocess, a: int, b: int) -> torch.Tensor:
    """uint8 images [a, b): in a worker process one by one (the worker is one core) straight into shared memory
    (the main process receives a handle, no copy), else with the source's thread pool."""
    if torch.utils.data.get_worker_info() is None:
        return source.load(a, b, pre)
    first = source.take(np.arange(a, a + 1), pre)
    out = torch.empty((b - a, *first.shape[1:]), dtype=torch.uint8).share_memory_()
    out[0] = first[0]
    for k in range(1, b - a):
        out[k] = source.take(np.arange(a + k, a + k + 1), pre)[0]
    return out


@dataclass
class _Failed:
    """An exception raised in a worker, handed over as a value so the main process re-raises it unchanged (the
    DataLoader would wrap it in a traceback text)."""

    error: BaseException


class _Ranges(torch.utils.data.Dataset):
    def __init__(self, load: Callable[[int, int], Any], ranges: list[Range]):
        self.load, self.ranges = load, ranges

    def __len__(self) -> int:
        return len(self.ranges)

    def __getitem__(self, k: int) -> Any:
        try:
            return self.load(*self.ranges[k])
        except Exception as exc:  # noqa: BLE001 - re-raised in the main process
            return _Failed(exc)


def pieces(units: list[Range], piece: int) -> list[Range]:
    """Each unit cut into ranges of at most ``piece`` items from its start."""
    return [(s, min(s + piece, b)) for a, b in units for s in range(a, b, piece)]


def ordered(load: Callable[[int, int], Any], units: list[Range], *, workers: int, piece: int,
            pin: bool = False, depth: int = 2) -> Iterator[tuple[Range, Any]]:
    """Yield (unit, load(*unit)) for every unit in order. ``workers`` > 0: pieces of ≤ ``piece`` items are loaded
    by that many worker processes and joined per unit; 0: whole units in a background thread."""
    if workers == 0 or not units:
        yield from _threaded(load, units, depth)
        return
    ranges = pieces(units, piece)
    loader = torch.utils.data.DataLoader(_Ranges(load, ranges), batch_size=None, num_workers=min(workers, len(ranges)),
                                         prefetch_factor=depth, pin_memory=pin, multiprocessing_context=_start(load))
    it = iter(loader)
    for a, b in units:
        parts = [_unwrap(next(it)) for _ in range(-(-(b - a) // piece))]
        yield (a, b), parts[0] if len(parts) == 1 else _join(parts)


def _start(load: Callable[[int, int], Any]) -> str:
    """How decode processes start: from the forkserver's small process when ``load`` pickles — a fork of this
    process, whose heap keeps gigabytes of reused activation memory, would make every page it writes next a
    copy-on-write fault — else (a dataset object that does not pickle) by fork."""
    try:
        pickle.dumps(load)
    except Exception:  # noqa: BLE001 - any pickling failure means: fork
        return "fork"
    multiprocessing.set_forkserver_preload(["subcache.pipeline"])  # workers start with torch already imported
    return "forkserver"


def _unwrap(item: Any) -> Any:
    if isinstance(item, _Failed):
        raise item.error
    return item


def _join(parts: list) -> Any:
    if isinstance(parts[0], torch.Tensor):
        return torch.cat(parts)
    return [x for p in parts for x in p]  # lists of encoded files (gpu decoding)


def _threaded(load: Callable[[int, int], Any], units: list[Range], depth: int) -> Iterator[tuple[Range, Any]]:
    """Units loaded ahead in one background thread (in-memory arrays; `build --from`'s cache reads)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def work() -> None:
        try:
            for a, b in units:
                if stop.is_set():
                    return
                q.put(((a, b), load(a, b)))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)
        q.put(None)

    threading.Thread(target=work, daemon=True).start()
    try:
        while (item := q.get()) is not None:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def covering(units: list[Range], batch: int, n: int) -> list[Range]:
    """The batches [k·batch, (k+1)·batch) ∩ [0, n) holding an item of ``units``, in order, each once."""
    ks = sorted({k for a, b in units for k in range(a // batch, -(-b // batch))})
    return [(k * batch, min((k + 1) * batch, n)) for k in ks]


def by_unit(batches: Iterator[tuple[Range, dict]], units: list[Range]) -> Iterator[tuple[Range, dict]]:
    """Forwarded batches regrouped into ``units`` (ascending): a unit may take parts of several batches and a
    batch serve several units; a batch is let go once no unit still to come needs it."""
    held: list[tuple[Range, dict]] = []
    for a, b in units:
        held = [(r, acts) for r, acts in held if r[1] > a]
        while not held or held[-1][0][1] < b:
            held.append(next(batches))
        parts = [(acts, max(a, s) - s, min(b, e) - s) for (s, e), acts in held if s < b]
        yield (a, b), {layer: {view: _joined([p[layer][view][i:j] for p, i, j in parts]) for view in views}
                       for layer, views in parts[0][0].items()}


def _joined(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


def to_device(inputs: Any, device: torch.device) -> Any:
    if isinstance(inputs, dict):
        return {k: v.to(device, non_blocking=True) for k, v in inputs.items()}
    return inputs.to(device, non_blocking=True)


def image_batches(source: ImageSource, pre: Preprocess, batch: int, *, workers: int, device: torch.device,
                  decode: str = "cpu") -> Iterator[tuple[Range, torch.Tensor]]:
    """uint8 (B, C, S, S) batches of ``source`` in order, on ``device`` (for `predict` and `bench score`)."""
    units = [(a, min(a + batch, len(source))) for a in range(0, len(source), batch)]
    load, finish = image_loader(source, pre, decode, device)
    for rng, x in ordered(load, units, workers=workers if decodes(source) else 0, piece=batch,
                          pin=device.type == "cuda"):
        yield rng, finish(x)


def image_loader(source: ImageSource, pre: Preprocess, decode: str,
                 device: torch.device) -> tuple[Callable[[int, int], Any], Callable[[Any], torch.Tensor]]:
    """(load(a, b) for any process, finish(loaded) → uint8 images on ``device``) for a decoder."""
    check_decode(decode, source, device)
    if decode == "gpu":
        return functools.partial(_file_bytes, list(source.files)), functools.partial(gpu_fit, pre=pre, device=device)
    return functools.partial(load_images, source, pre), functools.partial(to_device, device=device)


def check_decode(decode: str, source: ImageSource, device: torch.device) -> None:
    """``gpu`` needs CUDA and a source of JPEG files (no corruption: that is drawn on the CPU's pixels)."""
    if decode not in DECODERS:
        raise ConfigError(f"unknown --decode {decode!r}; allowed: {', '.join(DECODERS)}")
    if decode == "cpu":
        return
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ConfigError(f"--decode gpu decodes JPEGs with CUDA (torchvision's nvjpeg), but the build runs on "
                          f"{device.type}; use --decode cpu (the default) or --device cuda on a GPU machine")
    if source.files is None or not decodes(source) or source.array is not None or type(source) is not ImageSource:
        raise ConfigError("--decode gpu reads JPEG files: use it with an ImageFolder of JPEGs, without --corrupt")
    bad = [f for f in source.files if not str(f).lower().endswith((".jpg", ".jpeg"))]
    if bad:
        raise ConfigError(f"--decode gpu decodes JPEG files only; {bad[0]} is not one (use --decode cpu)")


def _file_bytes(files: list[str], a: int, b: int) -> list[torch.Tensor]:
    from torchvision.io import read_file

    return [read_file(str(f)) for f in files[a:b]]


def gpu_fit(encoded: list[torch.Tensor], pre: Preprocess, device: torch.device) -> torch.Tensor:
    """JPEG bytes → uint8 (B, 3, S, S) on the GPU: nvjpeg batch decode, then per image the short side to
    size / crop_pct (antialiased, as Pillow) and a center crop — `data._fit_photo` on the device."""
    from torchvision.io import ImageReadMode, decode_jpeg

    images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=device)
    size, mode = pre.image_size, "bicubic" if pre.interpolation == "bicubic" else "bilinear"
    out = torch.empty(len(images), 3, size, size, dtype=torch.uint8, device=device)
    for i, im in enumerate(images):
        h, w = im.shape[-2:]
        scale = size / pre.crop_pct / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        x = F.interpolate(im[None].float(), size=(nh, nw), mode=mode, antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        out[i] = x[0, :, top:top + size, left:left + size].round_().clamp_(0, 255).to(torch.uint8)
    return out


class Writer:
    """Writes units (their chunks' compression and crc32c release the GIL) in a pool of ``threads``; the caller
    waits only when ``2 × threads`` units are pending, i.e. when writing is the slowest stage. Units own whole
    chunks, so no two threads ever write one chunk. Re-raises the first failure."""

    def __init__(self, threads: int | None = None):
        threads = threads or writer_threads()
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="subcache-write")
        self.pending: list[Future] = []
        self.depth = 2 * threads

    def submit(self, fn) -> None:
        self.pending.append(self.pool.submit(fn))
        while self.pending and (len(self.pending) > self.depth or self.pending[0].done()):
            self.pending.pop(0).result()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, *exc) -> None:
        try:
            if exc[0] is None:
                for f in self.pending:
                    f.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def writer_threads() -> int:
    """Threads encoding and writing chunks: the cores available, at most WRITERS."""
    return max(1, min(WRITERS, len(os.sched_getaffinity(0))))
