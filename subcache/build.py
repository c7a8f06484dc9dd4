"""`build`: push a dataset once through the frozen prefix and write the activations at the input of block L.

One pass serves several layers. Work proceeds in *units* of whole chunks (the longest chunk among the layers; all
chunk lengths are powers of two, so every store's chunks tile a unit exactly). A unit is the unit of resume: after
a kill, units whose chunks are all on disk are kept and the rest recomputed with the same batches, so a resumed
store is bit-identical to an uninterrupted one. Batches are not units: the forward runs whole batches of
``batch_size`` items fixed by position in the split (a unit may hold fewer items than a batch, e.g. 64 at a 224 px
layer) and hands their activations to the writer unit by unit. Images are decoded ahead in worker processes
(`subcache.pipeline`; in order, so the bits do not depend on how many) and units are written behind by a small
thread pool (compression and checksums release the GIL), so the forward pass waits only on the slowest stage.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from ._version import __version__
from .backbones import Backbone, load_backbone
from .devices import resolve_device
from .data import ImageSource, open_source, to_input
from .inputs import record
from .pipeline import (Range, Writer, by_unit, check_workers, covering, decodes, image_loader, ordered,
                       reuse_host_memory, to_device)
from .distributed import Dist, store_locks
from .errors import ConfigError, ForeignStoreError, StoreError, StoreExistsError
from .settings import require_same
from .locations import location
from .faults import fault
from .progress import progress_bar
from .plan import Planner, calibration_len, check_storage, layout
from .store import (FORMAT, FORMAT_VERSION, Cache, Layout, check_writable, create_cache, exists,
                    good_chunks, open_cache, remove, sweep_partials, to_storage, write_len,
                    written_chunks)



def text_paths(config: Any, *names: str) -> None:
    """Path-like fields of a frozen config as text (``pathlib.Path`` welcome; the cache records them in JSON)."""
    for name in names:
        if isinstance(getattr(config, name), os.PathLike):
            object.__setattr__(config, name, os.fspath(getattr(config, name)))


# Forward batches are items [k·batch_size, (k+1)·batch_size) of a split, whatever the units (earlier versions
# batched from each unit's start): recorded, so a resume never mixes the two.
BATCHING = "position"


@dataclass(frozen=True)
class BuildConfig:
    """Everything `subcache build` needs. One field per CLI option."""

    out: str | os.PathLike  # store path (one layer) or folder of `blockNN.zarr` stores (several layers)
    layers: tuple[str, ...] = ("13",)  # first block(s) to be trained: the cache stores each one's input
    model: str = "efficientnet_lite0"
    weights: str = "imagenet"
    data: str = "fashion-mnist"
    splits: tuple[str, ...] = ("train", "test")
    limit: int | None = None  # first N images of each split
    image_size: int | None = None  # pixels; default: the weights' native size
    dtype: str = "float16"  # float16 | bfloat16 | float32 | int8 (per-channel scales from the first items)
    codec: str = "auto"  # auto | zstd | lz4 | none (auto: measured on the first chunk)
    shard_mb: float | None = None  # pack chunks into shards of about this many MiB (object stores)
    flip_views: bool = False  # also store exact activations of mirrored images (x_flip)
    corrupt: str | None = None  # NAME:SEVERITY, a deterministic corruption of every image (subcache.corrupt)
    workers: int | None = None  # decode processes (photos); None: the cores (capped) on CUDA, else 0 (main process)
    decode: str = "cpu"  # cpu (Pillow) | gpu (nvjpeg on CUDA, JPEG folders; other pixels, so recorded)
    batch_size: int = 128
    chunk_mb: float = 1.0  # target uncompressed chunk size; chunks hold whole samples, a power of two of them
    device: str = "auto"  # auto | cpu | cuda
    download: bool = False  # allow torchvision to download named datasets
    data_root: str | None = None
    resume: bool = False
    overwrite: bool = False

    def __post_init__(self) -> None:
        text_paths(self, "out", "data", "data_root")

    def recorded(self) -> dict:
        """The options a resumed build must share with the original (anything that changes the bits)."""
        d = asdict(self)
        for k in ("out", "resume", "overwrite", "download", "data_root", "device", "workers"):
            d.pop(k)
        for k, default in (("corrupt", None), ("decode", "cpu")):  # caches from before the option resume as before
            if d[k] == default:
                d.pop(k)
        d["layers"], d["splits"] = list(self.layers), list(self.splits)
        d["batching"] = BATCHING
        return d


@dataclass
class BuildResult:
    paths: list[str]
    images: int  # images pushed through the prefix in this run (resumed units excluded)
    seconds: float
    skipped_units: int = 0
    layers: list[int] = field(default_factory=list)

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds else 0.0


def out_paths(out: str, layers: list[int]) -> list[str]:
    """One layer: the store is ``out``. Several: ``out/blockNN.zarr`` each."""
    if len(layers) == 1:
        return [out]
    return [str(Path(out) / f"block{layer:02d}.zarr") for layer in layers]


def check_build_config(config: BuildConfig) -> None:
    """Refuse option values a build cannot use, before any work."""
    check_storage(config.dtype, config.codec, config.chunk_mb, config.shard_mb, config.batch_size)
    if config.resume and config.overwrite:
        raise ConfigError("--resume and --overwrite exclude each other: resume keeps finished chunks, overwrite "
                          "discards them")
    if not config.splits:
        raise ConfigError("no --split given; e.g. --split train --split test")
    check_workers(config.workers)


def build_cache(config: BuildConfig, *, progress: bool = True, backbone: Backbone | None = None,
                data: Any = None) -> BuildResult:
    """Build (or resume) cache store(s) as described by ``config``. Returns the store paths and throughput.
    ``data``: dataset objects instead of ``config.data`` (see `with_objects`). ``progress``: on by default (a
    build is long): a bar on a terminal, a line every 10 % on stderr otherwise; False for silence."""
    config, data = with_objects(config, data)
    check_build_config(config)
    reuse_host_memory()
    ranks = Dist.from_env()
    device = resolve_device(config.device, ranks.local_rank)
    backbone = backbone or load_backbone(config.model, config.weights, image_size=config.image_size)
    backbone.eval()  # a backbone handed over in train mode would cache batch statistics
    layers = sorted({backbone.resolve(layer) for layer in config.layers})
    config = replace(config, layers=tuple(map(str, layers)))  # recorded resolved: `--layer layer3.1` resumes `6`
    sources = {s: open_source(config.data if data is None else data[s], s, limit=config.limit,
                              download=config.download, root=config.data_root, corrupt=config.corrupt)
               for s in dict.fromkeys(config.splits)}
    paths = out_paths(config.out, layers)
    backbone.to(device)
    shapes = {layer: backbone.input_shape(layer) for layer in layers}
    layouts = {layer: layout(shapes[layer], config.dtype, {s: len(src) for s, src in sources.items()},
                             config.chunk_mb, config.shard_mb) for layer in layers}
    origin = {"data": config.data, "sha256": source_fingerprint(sources)}
    jobs = {split: image_job(src, backbone, config, device) for split, src in sources.items()}

    def first_items() -> dict[int, dict[str, np.ndarray]]:  # float32 activations: codec choice and int8 scales
        job = next(iter(jobs.values()))
        images = job.finish(job.load(0, min(job.n, calibration_len(layouts, config.dtype, config.batch_size))))
        return _forward_unit(backbone, layers, images, replace(config, dtype="float32", flip_views=False))

    plans = Planner(first_items, config.dtype, config.codec, layouts)
    if not config.flip_views:  # the first batches' activations, measured to plan the stores, are not computed twice
        first = next(iter(jobs))
        jobs[first] = replace(jobs[first], reuse=plans.reuse)

    def create() -> list[Cache]:
        check_outputs(config.out, paths, overwrite=config.overwrite, resume=config.resume)
        return [open_or_create(path, {**_attrs(config, backbone, layer, shapes[layer], sources), "source": origin},
                               layouts[layer], resume=config.resume, plan=functools.partial(plans, layer))
                for path, layer in zip(paths, layers)]

    return write_stores(ranks, paths, layers, create, jobs, layouts,
                        lambda x, scales: _forward_unit(backbone, layers, x, config, scales), device, progress,
                        sources=[config.data] if Path(config.data).exists() else [])


def write_stores(ranks: Dist, paths: list[str], layers: list[int], create: Callable[[], list[Cache]],
                 jobs: dict[str, "Job"], layouts: dict[int, Layout], forward: Callable[[Any, dict], dict],
                 device: torch.device, progress: bool, sources: list[str] = ()) -> BuildResult:
    """What `build` and `build --from` share: refuse outputs overlapping the ``sources``, lock the stores, create
    (or reopen) them, write every unit still to do with ``forward(inputs, int8 scales)``, verify and mark them
    complete."""
    check_overlap(paths, sources)
    with store_locks(paths, enabled=ranks.main):
        stores = open_stores(ranks, paths, create)
        scales = {c.layer: c.scale() for c in stores}
        start = time.perf_counter()
        done, skipped = run_units(stores, layers, jobs, {k: v.unit for k, v in layouts.items()},
                                  lambda x: forward(x, scales), device, progress and ranks.main, ranks)
        finish_all(ranks, stores)
    return BuildResult(paths, ranks.sum(done), time.perf_counter() - start, ranks.sum(skipped), layers)


def with_objects(config: BuildConfig, data: Any) -> tuple[BuildConfig, dict | None]:
    """``data`` (Python only): ``{"train": ds, "test": ds2}``, or one dataset serving the first of
    ``config.splits``; each a torchvision dataset, a Hugging Face ``datasets.Dataset`` (image + label columns) or
    any sequence of (PIL image | uint8 array, label). The config then records ``python:<type name>`` as its data."""
    if data is None:
        return config, None
    data = data if isinstance(data, dict) else {config.splits[0]: data}
    return replace(config, splits=tuple(data), data=f"python:{type(next(iter(data.values()))).__name__}"), data


def check_outputs(out: str, paths: list[str], *, overwrite: bool, resume: bool) -> None:
    """Refuse outputs that exist (without --resume/--overwrite) and outputs that --overwrite would have to delete
    although they are not stores. (Outputs overlapping the source are refused earlier, by `write_stores`.)"""
    if len(paths) > 1 and location(out).is_file():
        raise StoreExistsError(f"output {out} is a file; a multi-layer build writes a folder of stores")
    for path in paths:
        check_writable(path, overwrite=overwrite, resume=resume)


def check_overlap(paths: list[str], sources: list[str]) -> None:
    """Refuse an output that contains the build's source or lies inside it (checked before any lock file is made
    next to the output, so a refused build leaves the source untouched)."""
    for path in paths:
        for source in sources:
            if location(path).overlaps(location(source)):
                raise ConfigError(f"--out {path} overlaps the build's source {source}; write the cache elsewhere")


def source_fingerprint(sources: dict[str, ImageSource]) -> str:
    """sha256 of what a build reads: per split the labels, ids, classes, and the pixels of in-memory data or the
    (path, size, mtime) of every image file. ``--resume`` refuses a store whose source no longer matches."""
    h = hashlib.sha256()
    for split, src in sources.items():
        h.update(f"{split}|{len(src)}|{src.classes}".encode())
        h.update(np.ascontiguousarray(src.labels).tobytes() + np.ascontiguousarray(src.ids).tobytes())
        if src.array is not None:
            h.update(memoryview(np.ascontiguousarray(src.array)).cast("B"))
        for f in src.files or ():
            st = os.stat(f)
            h.update(f"{f}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()


def open_stores(ranks: Dist, paths: list[str], create: Callable[[], list[Cache]]) -> list[Cache]:
    """Rank 0 creates (or reopens for resume) the stores; then the other ranks open them for writing."""
    return ranks.on_main(create, lambda: [open_cache(p, require_complete=False, mode="r+") for p in paths])


def finish_all(ranks: Dist, stores: list[Cache]) -> None:
    """After every rank has written its units, rank 0 verifies each store and marks it complete."""
    ranks.barrier()
    fault("before-finish")
    if ranks.main:
        for cache in stores:
            finish(cache)
    ranks.barrier()


@dataclass
class Job:
    """One split's work: how many items, how to load items [a, b) (any thread; with ``workers`` > 0 any process),
    the forward batch (items [k·batch, (k+1)·batch), fixed by position), how to put what was loaded on the device,
    and the items' labels/ids."""

    n: int
    load: Callable[[int, int], Any]
    labels: np.ndarray
    ids: np.ndarray
    keys: np.ndarray  # (N,) str: where each item came from
    workers: int = 0  # decode processes
    batch: int = 128
    finish: Callable[[Any], Any] | None = None  # default: move to the build's device
    reuse: Callable[[int, int], dict | None] = lambda a, b: None  # a batch's activations when already computed


def image_job(src: ImageSource, backbone: Backbone, config: BuildConfig, device: torch.device) -> Job:
    """A split of images: decoded by ``config.workers`` processes (when the source decodes at all) with
    ``config.decode``, a forward batch at a time."""
    load, finish = image_loader(src, backbone.preprocess, config.decode, device)
    workers = check_workers(config.workers, device) if decodes(src) else 0
    return Job(len(src), load, src.labels, src.ids, np.asarray(src.source_keys(), dtype=object), workers,
               config.batch_size, finish)


def run_units(stores: list[Cache], layers: list[int], jobs: dict[str, Job], chunks: dict[int, dict[str, int]],
              forward: Callable[[Any], dict], device: torch.device, progress: bool,
              ranks: Dist = Dist()) -> tuple[int, int]:
    """The pipeline shared by `build` and `build --from`: load ahead → forward whole batches → write behind, unit
    by unit. Under torchrun each rank takes its contiguous share of every split's units.

    Returns (items written, units skipped because a previous run finished them)."""
    done, skipped = 0, 0
    with _disk_full_is_clear(stores), Writer() as writer, progress_bar(progress) as bar:
        for split, job in jobs.items():
            unit = max(chunks[layer][split] for layer in layers)
            mine = ranks.shard([(a, min(a + unit, job.n)) for a in range(0, job.n, unit)])
            owned = set(mine)
            todo = [u for u in _units_to_do(stores, split, unit, job.n) if u in owned]
            skipped += len(mine) - len(todo)
            total = sum(b - a for a, b in mine)
            task = bar.add_task(f"{split} → block {', '.join(map(str, layers))}", total=total,
                                completed=total - sum(b - a for a, b in todo))
            for (a, b), acts in by_unit(forwarded(job, todo, forward, device), todo):
                writer.submit(functools.partial(_write_unit, stores, split, a, b, acts, job))
                done += b - a
                bar.update(task, advance=b - a)
    return done, skipped


def forwarded(job: Job, units: list[Range], forward: Callable[[Any], dict],
              device: torch.device) -> Iterator[tuple[Range, dict]]:
    """(batch, its activations) for every batch holding an item of ``units``, in order. Batches are fixed by
    position, not by the units (a unit's chunks may hold fewer items than a batch) nor by where a resume or a rank
    starts: an item is always forwarded in the same company, and a conv's float results may depend on it."""
    batches = covering(units, job.batch, job.n)
    ready = 0
    while ready < len(batches) and (acts := job.reuse(*batches[ready])) is not None:
        yield batches[ready], acts
        ready += 1
    for r, x in ordered(job.load, batches[ready:], workers=job.workers, piece=job.batch, pin=device.type == "cuda"):
        yield r, forward(job.finish(x) if job.finish else to_device(x, device))


@contextlib.contextmanager
def _disk_full_is_clear(stores: list[Cache]) -> Iterator[None]:
    """A full disk while writing → one line; the store stays `building` and --resume finishes it later."""
    try:
        yield
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
        raise StoreError(f"no space left on the device while writing {', '.join(c.path for c in stores)}; the "
                         f"store stays incomplete: free space and rerun the same command with --resume") from None


# -- store set-up and resume -------------------------------------------------------------------------------------
def _attrs(config: BuildConfig, backbone: Backbone, layer: int, shape: tuple[int, ...],
           sources: dict[str, ImageSource]) -> dict:
    import zarr

    first = next(iter(sources.values()))
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "backbone": {**backbone.identity(), "weights_spec": config.weights,
                     "image_size": backbone.preprocess.image_size},
        "layer": {"index": layer, "name": backbone.block_names[layer - 1], "num_blocks": backbone.num_blocks},
        "sample_shape": list(shape),
        "preprocess": record(backbone.preprocess, first),  # exactly how the inputs were made (subcache.inputs)
        "dtype": config.dtype,
        "data": config.data, "splits": list(sources), "classes": first.classes,
        "flip_views": config.flip_views,
        "build": config.recorded(),
        "versions": {"subcache": __version__, "torch": torch.__version__, "zarr": zarr.__version__},
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def open_or_create(path: str, attrs: dict, layout: Layout, *, resume: bool, plan: Callable[[], dict]) -> Cache:
    """A new store (status building) — or, with ``resume``, the existing one if it was started with the same
    options and weights (``attrs['build']`` and the weights sha256), its `.partial` litter swept."""
    if resume and exists(path):
        cache = open_cache(path, require_complete=False, mode="r+")
        recorded = {**(cache.attrs.get("build") or {}), "weights": cache.backbone.get("weights_sha256")}
        require_same(recorded, {**attrs["build"], "weights": attrs["backbone"]["weights_sha256"]},
                     f"cannot resume {path}: it was built with other options",
                     "rerun the original command or use --overwrite", ForeignStoreError)
        if cache.attrs.get("source") != attrs["source"]:
            raise ForeignStoreError(f"cannot resume {path}: its source data changed since the build began "
                                    f"(fingerprint differs); rebuild it with --overwrite")
        sweep_partials(path)
        restore_scales(cache, plan)
        return cache
    if exists(path):
        remove(path)
    # a kill leaves no half-created store (local: built aside and renamed into place whole)
    location(path).create_whole(lambda where: create_cache(where, attrs, layout, flip_views=attrs["flip_views"],
                                                           **plan()))
    return open_cache(path, require_complete=False, mode="r+")


def restore_scales(cache: Cache, plan: Callable[[], dict]) -> None:
    """An int8 store's scales are deterministic (measured on the first items): a resume rewrites every split's
    ``x_scale`` whose chunk is missing or damaged, so the codes already written read right again."""
    if cache.dtype != "int8":
        return
    for split in cache.splits:
        arr = cache.split(split).x_scale
        if 0 not in good_chunks(arr):
            arr[:] = plan()["scale"]


def check_scales(cache: Cache) -> None:
    """`finish`: an int8 store's scales are on disk, decode, and are finite and positive in every split."""
    for split in cache.splits if cache.dtype == "int8" else ():
        arr = cache.split(split).x_scale
        if 0 not in good_chunks(arr) or not (np.isfinite(values := arr[:]).all() and (values > 0).all()):
            raise StoreError(f"{cache.path}: {arr.path} (the int8 scales) is missing, damaged or not positive "
                             f"after the build; rerun with --resume")


def _arrays(cache: Cache, split: str) -> list:
    s = cache.split(split)
    return [a for a in (s.x, s.x_flip, s.y, s.id, s.key) if a is not None]


def _units_to_do(stores: list[Cache], split: str, unit: int, n: int) -> list[tuple[int, int]]:
    """Units [a, b) not yet fully on disk in every store (the last unit may be short)."""
    present = [(write_len(a), good_chunks(a)) for c in stores for a in _arrays(c, split)]
    todo = []
    for a in range(0, n, unit):
        b = min(a + unit, n)
        needed = ((clen, range(a // clen, -(-b // clen))) for clen, _ in present)
        if not all(set(idx) <= have for (_, idx), (_, have) in zip(needed, present)):
            todo.append((a, b))
    return todo


# -- the pipeline --------------------------------------------------------------------------------------------------
def capture_inputs(backbone: Backbone, h: torch.Tensor, first: int, layers: list[int],
                   dtype: str, scales: dict | None = None) -> dict[int, np.ndarray]:
    """Run blocks ``first``.. over ``h`` (the input of block ``first``), keeping the input of every block in
    ``layers`` in the storage dtype. Shared by `build` (from the stem) and `build --from` (from a cache)."""
    kept = {}
    for index in range(first, layers[-1] + 1):
        if index in layers:
            kept[index] = to_storage(h, dtype, (scales or {}).get(index))
        if index < layers[-1]:
            h = backbone.block(index)(h)
    return kept


def join_views(parts: dict[int, dict[str, list[np.ndarray]]]) -> dict[int, dict[str, np.ndarray]]:
    return {layer: {view: np.concatenate(arrays) for view, arrays in d.items()} for layer, d in parts.items()}


@torch.inference_mode()
def _forward_unit(backbone: Backbone, layers: list[int], images: torch.Tensor,
                  config: BuildConfig, scales: dict | None = None) -> dict[int, dict[str, np.ndarray]]:
    """Activations at each layer's input for ``images`` (one batch of the build, or the first items measured to
    plan the stores), in batches of ``config.batch_size`` from the first (→ the build's own batches)."""
    views = {"x": False, "x_flip": True} if config.flip_views else {"x": False}
    parts: dict[int, dict[str, list]] = {layer: {v: [] for v in views} for layer in layers}
    for i in range(0, len(images), config.batch_size):
        for view, flip in views.items():
            h = backbone.stem(to_input(images[i:i + config.batch_size], backbone.preprocess, flip=flip))
            for layer, kept in capture_inputs(backbone, h, 1, layers, config.dtype, scales).items():
                parts[layer][view].append(kept)
    return join_views(parts)


def _write_unit(stores: list[Cache], split: str, a: int, b: int, acts: dict[int, dict[str, np.ndarray]],
                job: Job) -> None:
    for cache in stores:
        s = cache.split(split)
        for view, arr in acts[cache.layer].items():
            getattr(s, view)[a:b] = arr
        s.y[a:b] = job.labels[a:b]
        s.id[a:b] = job.ids[a:b]
        if s.key is not None:
            s.key[a:b] = job.keys[a:b]
    fault("unit-written")


def finish(cache: Cache) -> None:
    """Verify every chunk of every array is on disk, then mark the store complete."""
    for split in cache.splits:
        for arr in _arrays(cache, split):
            n_chunks = -(-arr.shape[0] // write_len(arr))
            missing = set(range(n_chunks)) - written_chunks(arr)
            if missing:
                raise StoreError(f"{cache.path}: {arr.path} is missing chunks {sorted(missing)[:5]} after the build;"
                                 f" rerun with --resume")
    check_scales(cache)
    import zarr

    group = zarr.open_group(cache.path, mode="r+")
    group.attrs.update({"status": "complete", "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    cache.attrs = dict(group.attrs)

