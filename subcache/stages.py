"""The build's stages measured one at a time, for `bench build`: decode (the pipeline's workers, nothing else),
forward (the build's own forward over images already decoded and on the device, storage dtype and copy to the
host included) and write (the build's writer pool encoding and writing the activations already computed). Their
bound: on a GPU the slowest stage (the stages overlap on different hardware); on a CPU, where all stages share
the cores, 1 / Σ 1/throughput."""
from __future__ import annotations

import functools
import resource
import time
from dataclasses import replace

import numpy as np
import torch

from .backbones import Backbone
from .build import BuildConfig, Job, _forward_unit, _write_unit
from .pipeline import Writer, image_batches, writer_threads
from .data import ImageSource
from .store import open_cache, write_len


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def decode_seconds(source: ImageSource, backbone: Backbone, config: BuildConfig, workers: int,
                   device: torch.device) -> tuple[float, list[torch.Tensor]]:
    """Seconds to decode ``source`` into uint8 batches on the device, and the batches."""
    batches: list[torch.Tensor] = []

    def run() -> None:
        batches.clear()
        batches.extend(x for _, x in image_batches(source, backbone.preprocess, config.batch_size, workers=workers,
                                                   device=device, decode=config.decode))

    return timed(run, device), batches


def forward_seconds(backbone: Backbone, layer: int, batches: list[torch.Tensor], config: BuildConfig,
                    device: torch.device) -> tuple[float, np.ndarray]:
    """Seconds for the build's forward over decoded batches, and the stored activations (host, storage dtype)."""
    out: list[np.ndarray] = []

    def run() -> None:
        out.clear()
        out.extend(_forward_unit(backbone, [layer], x, config)[layer]["x"] for x in batches)

    return timed(run, device), np.concatenate(out)


def write_seconds(path: str, acts: np.ndarray, source: ImageSource, threads: int | None = None) -> float:
    """Seconds for the build's writer pool to encode and write ``acts`` unit by unit into the train split of the
    store at ``path`` (a store just built from the same items: the chunks are rewritten with the same bits)."""
    cache = open_cache(path, require_complete=False, mode="r+")
    unit, n = write_len(cache.split("train").x), len(acts)
    job = Job(n, None, source.labels, source.ids, np.asarray(source.source_keys(), dtype=object))
    t0 = time.perf_counter()
    with Writer(threads) as writer:
        for a in range(0, n, unit):
            b = min(a + unit, n)
            writer.submit(functools.partial(_write_unit, [cache], "train", a, b, {cache.layer: {"x": acts[a:b]}}, job))
    return time.perf_counter() - t0


def stage_bound(rates: list[float], device: torch.device) -> float:
    """Items/s the stages allow together: the slowest on a GPU, 1 / Σ 1/rate on a CPU (shared cores)."""
    if device.type == "cuda":
        return min(rates)
    return 1 / sum(1 / r for r in rates)


def cpu_seconds() -> tuple[float, float]:
    """(user, sys) CPU seconds of this process and its finished children (decode workers)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + kids.ru_utime, me.ru_stime + kids.ru_stime


def measure(backbone: Backbone, layer: int, source: ImageSource, path: str, config: BuildConfig, workers: int,
            device: torch.device) -> dict:
    """Each stage alone over ``source`` (the train split the store at ``path`` was built from): images/s, and the
    CPU seconds (user + sys, decode workers included) it took — on a shared machine the CPU time of a stage varies
    less than its wall time."""
    n, cpu = len(source), []

    def stage(fn):
        before = sum(cpu_seconds())
        out = fn()
        cpu.append(sum(cpu_seconds()) - before)
        return out

    decode_s, batches = stage(lambda: decode_seconds(source, backbone, config, workers, device))
    forward_s, acts = stage(lambda: forward_seconds(backbone, layer, batches, replace(config, flip_views=False),
                                                    device))
    write_s = stage(lambda: write_seconds(path, acts, source))
    rates = [n / decode_s, n / forward_s, n / write_s]
    return {"decode_workers": workers, "write_threads": writer_threads(), "decode_images_per_second": rates[0],
            "forward_images_per_second": rates[1], "write_images_per_second": rates[2],
            "stage_bound_images_per_second": stage_bound(rates, device), "decode_cpu_seconds": cpu[0],
            "forward_cpu_seconds": cpu[1], "write_cpu_seconds": cpu[2]}
