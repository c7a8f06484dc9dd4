"""Benchmarks behind `subcache bench WHAT`: each prints ratios measured in one run on this machine.

* build:  build throughput ÷ bare prefix-forward throughput on the same images; bytes on disk ÷ raw float32.
* train:  samples/s from the Zarr cache ÷ from the same tensors in memory (device-resident and streaming);
          epoch time from images through the frozen network ÷ epoch time from the cache.
"""
from __future__ import annotations

import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .backbones import Backbone, load_backbone
from .build import BuildConfig, build_cache, resolve_device
from .data import open_source, to_input
from .loader import DeviceLoader, ImageLoader, StreamLoader, read_rows
from .store import dir_bytes, open_cache
from .train import TrainConfig, fit
from .tuned import TunedModel


@dataclass(frozen=True)
class BenchConfig:
    model: str = "efficientnet_lite0"
    weights: str = "imagenet"
    data: str = "fashion-mnist"
    image_size: int = 64
    limit: int = 2000  # images of the train split used
    layer: str = "13"  # cached layer (`build`), first tuned block (`train`)
    blocks: str = "13-16"  # tuned blocks (`train`)
    epochs: int = 2
    batch_size: int = 256
    device: str = "auto"
    workdir: str | None = None  # where the benchmark's caches go (default: a temporary folder)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _workdir(config: BenchConfig) -> tuple[Path, tempfile.TemporaryDirectory | None]:
    if config.workdir:
        Path(config.workdir).mkdir(parents=True, exist_ok=True)
        return Path(config.workdir), None
    tmp = tempfile.TemporaryDirectory(prefix="subcache-bench-")
    return Path(tmp.name), tmp


@torch.inference_mode()
def _bare_forward(backbone: Backbone, source, layer: int, batch: int, device: torch.device) -> None:
    for a in range(0, len(source), batch):
        x = to_input(source.load(a, min(a + batch, len(source)), backbone.preprocess).to(device), backbone.preprocess)
        backbone.prefix(x, layer)


def bench_build(config: BenchConfig = BenchConfig(), progress: bool = False) -> dict:
    """Build throughput vs the bare prefix forward over the same images, and the compression achieved."""
    device = resolve_device(config.device)
    backbone = load_backbone(config.model, config.weights, image_size=config.image_size).to(device)
    layer = backbone.resolve(config.layer)
    source = open_source(config.data, "train", limit=config.limit)
    root, tmp = _workdir(config)
    _bare_forward(backbone, open_source(config.data, "train", limit=256), layer, 128, device)  # warm-up
    forward_s = _timed(lambda: _bare_forward(backbone, source, layer, 128, device), device)
    out = str(root / "bench-build.zarr")
    build = BuildConfig(out=out, layers=(str(layer),), model=config.model, weights=config.weights,
                        data=config.data, splits=("train",), limit=config.limit, image_size=config.image_size,
                        device=config.device, overwrite=True)
    build_s = _timed(lambda: build_cache(build, backbone=backbone, progress=progress), device)
    cache = open_cache(out)
    x = cache.split("train").x
    raw = math.prod(x.shape) * 4
    x_bytes = dir_bytes(str(Path(out) / "train" / "x"))
    result = {"images": len(source), "layer": layer, "device": str(device),
              "forward_images_per_second": len(source) / forward_s, "build_images_per_second": len(source) / build_s,
              "build_vs_forward": forward_s / build_s, "bytes_on_disk": x_bytes, "bytes_float32": raw,
              "bytes_ratio": x_bytes / raw}
    if tmp:
        tmp.cleanup()
    return result


def bench_train(config: BenchConfig = BenchConfig(), progress: bool = False) -> dict:
    """Training throughput from the cache vs from tensors in memory, and vs through the frozen network."""
    device = resolve_device(config.device)
    backbone = load_backbone(config.model, config.weights, image_size=config.image_size).to(device)
    layer = backbone.resolve(config.layer)
    root, tmp = _workdir(config)
    out = str(root / "bench-train.zarr")
    build_cache(BuildConfig(out=out, layers=(str(layer),), model=config.model, weights=config.weights,
                            data=config.data, splits=("train",), limit=config.limit, image_size=config.image_size,
                            device=config.device, overwrite=True), backbone=backbone, progress=progress)
    cache = open_cache(out)
    y = cache.read_y("train")
    tcfg = TrainConfig(blocks=config.blocks, epochs=config.epochs, batch_size=config.batch_size,
                       device=config.device)
    from .backbones import parse_block_spec

    tuned = parse_block_spec(config.blocks, backbone)
    shape = tuple(cache.attrs["sample_shape"])

    def run(make_loader) -> float:
        """Seconds for: making the loader (reading the cache where it does) + the training epochs."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = TunedModel(backbone, layer, tuned, len(cache.classes), shape).to(device)
        t0 = time.perf_counter()
        loader = make_loader()
        fit(model, loader, tcfg, device, precomputed=False)
        _sync(device)
        return time.perf_counter() - t0

    in_memory = read_rows(cache, "train", None).to(device)
    run(lambda: DeviceLoader(in_memory, y.to(device), config.batch_size, 0))  # warm-up
    memory_s = run(lambda: DeviceLoader(in_memory, y.to(device), config.batch_size, 0))
    device_s = run(lambda: DeviceLoader.from_cache(cache, "train", None, y, config.batch_size, 0, device))
    stream_s = run(lambda: StreamLoader(cache, "train", None, y, config.batch_size, 0, device))
    source = open_source(config.data, "train", limit=config.limit)
    images_s = run(lambda: ImageLoader(source, backbone, layer, None, y, config.batch_size, 0, device))
    n = config.epochs * len(y)
    result = {"samples": len(y), "epochs": config.epochs, "blocks": list(tuned), "layer": layer,
              "device": str(device), "memory_samples_per_second": n / memory_s,
              "device_resident_samples_per_second": n / device_s, "streaming_samples_per_second": n / stream_s,
              "images_samples_per_second": n / images_s, "device_resident_ratio": memory_s / device_s,
              "streaming_ratio": memory_s / stream_s, "cache_speedup": images_s / device_s}
    if tmp:
        tmp.cleanup()
    return result
