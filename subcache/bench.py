"""Benchmarks behind `subcache bench WHAT`: each prints ratios measured in one run on this machine.

* build:  build throughput ÷ the bound of its stages (decode, forward, write, each measured alone) and ÷ the bare
          prefix forward on the same images; bytes on disk ÷ raw float32.
* train:  samples/s from the Zarr cache ÷ from the same tensors in memory (device-resident and streaming);
          epoch time from images through the frozen network ÷ epoch time from the cache.
* distributed: 2-process torchrun build throughput ÷ 1-process build throughput.
* multitask: added latency per SubTuned task ÷ latency of a second full model, batch 1 and 64; on torchvision
          ResNets also the reference code's grouped-convolution rewrite ÷ MultiTaskModel, one task.
* score:  pool scoring throughput from the cache ÷ through the full frozen network from images.
* select: `rank`, `profile --halving` and `select` (budget 0.1) ÷ the full profile (validation 20 %, same windows
          and settings): wall time, FLOPs, and regret — test-accuracy points lost against the window the full
          profile picks (select's regret compares the profile's own runs of the two windows).
* profile: a K-window profile with subcache (cache build included) ÷ the reference way (every run reads images
          through the whole frozen network each epoch); and the FLOP bound: FLOPs of a training step from images
          (prefix forward + window/tail forward and backward) ÷ FLOPs of the same step from the cache.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .backbones import Backbone, load_backbone
from .devices import peak_flops, resolve_device
from .build import BuildConfig, build_cache
from .data import open_source, to_input
from .loader import DeviceLoader, ImageLoader, StreamLoader, read_rows
from .selection import (HalvingResult, ProfileConfig, RankConfig, SelectConfig, profile_blocks, profile_flops,
                        rank_windows, select_window, spec_of, windows)
from .selection.flops import training_flops
from .selection.rank import rank_flops
from .store import dir_bytes, open_cache
from .train import CLOCK, TrainConfig, fit
from .tuned import TunedModel


@dataclass(frozen=True)
class BenchConfig:
    model: str = "efficientnet_lite0"
    weights: str = "imagenet"
    data: str = "fashion-mnist"
    image_size: int = 64
    limit: int = 2000  # images of the train split used
    layer: str = "13"  # cached layer (`build`), first tuned block (`train`)
    blocks: str = "13-16"  # tuned blocks (`train`); the profiled range (`profile`)
    width: int = 1  # window width (`profile`)
    epochs: int = 2
    batch_size: int = 256
    device: str = "auto"
    workers: int | None = None  # decode processes (`build`, `score`); None: as `build`
    decode: str = "cpu"  # cpu | gpu (`build`)
    repeats: int = 1  # seeds per window (`profile`)
    batch_runs: str = "auto"  # a window's repeats as one batched model (`profile`): auto | off | K
    compile: str = "auto"  # the training step through torch.compile (`train`, `profile`): auto | on | off
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


def _in_workdir(bench):
    """Give a benchmark its folder for caches (``config.workdir``, or a temporary one removed afterwards, also
    when the benchmark fails) as the keyword ``root``."""

    @functools.wraps(bench)
    def wrapper(config: BenchConfig = BenchConfig(), progress: bool = False) -> dict:
        if config.workdir:
            Path(config.workdir).mkdir(parents=True, exist_ok=True)
            return bench(config, progress, root=Path(config.workdir))
        with tempfile.TemporaryDirectory(prefix="subcache-bench-") as tmp:
            return bench(config, progress, root=Path(tmp))

    return wrapper


def _train_split_cache(config: BenchConfig, name: str, progress: bool, root: Path):
    """Device, backbone, cached layer, and a fresh cache (under ``root``) of the train split at that layer."""
    device = resolve_device(config.device)
    backbone = load_backbone(config.model, config.weights, image_size=config.image_size).to(device)
    layer = backbone.resolve(config.layer)
    out = str(root / f"bench-{name}.zarr")
    build_cache(BuildConfig(out=out, layers=(str(layer),), model=config.model, weights=config.weights,
                            data=config.data, splits=("train",), limit=config.limit, image_size=config.image_size,
                            device=config.device, overwrite=True), backbone=backbone, progress=progress)
    return device, backbone, layer, open_cache(out)


@torch.inference_mode()
def _bare_forward(backbone: Backbone, source, layer: int, batch: int, device: torch.device) -> None:
    for a in range(0, len(source), batch):
        x = to_input(source.load(a, min(a + batch, len(source)), backbone.preprocess).to(device), backbone.preprocess)
        backbone.prefix(x, layer)


@_in_workdir
def bench_build(config: BenchConfig, progress: bool, *, root: Path) -> dict:
    """Build throughput against each stage alone (decode, forward, write) and their bound (`subcache.stages`), and
    against the bare prefix forward with the images loaded in its loop (the older `build_vs_forward`); the
    compression achieved; the build's user and sys CPU seconds. Everything is measured warm, after one untimed
    build of the same images: the process's first build also pays for touching its memory for the first time
    (page faults, several seconds of sys time at 224 px) and for oneDNN's kernel set-up, which a long build pays
    once and the stages, measured after it, would not pay at all."""
    from .pipeline import check_workers, decodes, reuse_host_memory
    from .stages import cpu_seconds, measure

    reuse_host_memory()
    device = resolve_device(config.device)
    backbone = load_backbone(config.model, config.weights, image_size=config.image_size).to(device)
    layer = backbone.resolve(config.layer)
    source = open_source(config.data, "train", limit=config.limit)
    out = str(root / "bench-build.zarr")
    build = BuildConfig(out=out, layers=(str(layer),), model=config.model, weights=config.weights,
                        data=config.data, splits=("train",), limit=config.limit, image_size=config.image_size,
                        device=config.device, overwrite=True, workers=config.workers, decode=config.decode)
    build_cache(build, backbone=backbone, progress=progress)  # warm-up
    forward_s = _timed(lambda: _bare_forward(backbone, source, layer, 128, device), device)
    workers = check_workers(config.workers, device) if decodes(source) else 0
    stages = measure(backbone, layer, source, out, build, workers, device)
    cpu0 = cpu_seconds()
    build_s = _timed(lambda: build_cache(build, backbone=backbone, progress=progress), device)
    cpu = [b - a for a, b in zip(cpu0, cpu_seconds())]
    x = open_cache(out).split("train").x
    raw = math.prod(x.shape) * 4
    x_bytes = dir_bytes(str(Path(out) / "train" / "x"))
    build_rate = len(source) / build_s
    return {"images": len(source), "layer": layer, "device": str(device), **stages,
            "build_images_per_second": build_rate,
            "build_vs_stage_bound": build_rate / stages["stage_bound_images_per_second"],
            "bare_forward_images_per_second": len(source) / forward_s, "build_vs_forward": forward_s / build_s,
            "build_user_seconds": cpu[0], "build_sys_seconds": cpu[1],
            "build_cpu_vs_stages_cpu": sum(stages[f"{k}_cpu_seconds"] for k in ("decode", "forward", "write"))
            / sum(cpu),
            "bytes_on_disk": x_bytes,
            "bytes_float32": raw, "bytes_ratio": x_bytes / raw, "codec": x.attrs.get("codec"),
            "decode_mb_per_s": x.nbytes / 1e6 / min(_timed(lambda: x[:], device) for _ in range(3))}


@_in_workdir
def bench_train(config: BenchConfig, progress: bool, *, root: Path) -> dict:
    """Training throughput from the cache vs from tensors in memory, and vs through the frozen network."""
    device, backbone, layer, cache = _train_split_cache(config, "train", progress, root)
    y = cache.read_y("train")
    tcfg = TrainConfig(blocks=config.blocks, epochs=config.epochs, batch_size=config.batch_size,
                       device=config.device, compile=config.compile)
    from .backbones import parse_block_spec

    tuned = parse_block_spec(config.blocks, backbone)
    shape = cache.sample_shape

    def run(make_loader) -> float:
        """Seconds for: making the loader (reading the cache where it does) + the training epochs."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = TunedModel(backbone, layer, tuned, len(cache.classes), shape).to(device)
        t0 = time.perf_counter()
        loader = make_loader()
        fit(model, loader, tcfg, device)
        _sync(device)
        return time.perf_counter() - t0

    in_memory = cache.decode(read_rows(cache, "train", None).to(device))
    run(lambda: DeviceLoader(in_memory, y.to(device), config.batch_size, 0))  # warm-up
    memory_s = run(lambda: DeviceLoader(in_memory, y.to(device), config.batch_size, 0))
    device_s = run(lambda: DeviceLoader.from_cache(cache, "train", None, y, config.batch_size, 0, device))
    streams: list[StreamLoader] = []  # the streamed run's loader: how long its steps waited, how many readers
    stream_s = run(lambda: streams.append(StreamLoader(cache, "train", None, y, config.batch_size, 0, device))
                   or streams[0])
    source = open_source(config.data, "train", limit=config.limit)
    images_s = run(lambda: ImageLoader(source, backbone, layer, None, y, config.batch_size, 0, device))
    n = config.epochs * len(y)
    read = {k: _stream_read_seconds(StreamLoader(cache, "train", None, y, config.batch_size, 0, device, readers=k))
            for k in (1, 4)}  # the loader alone, no training: the default single reader vs a pool of four
    result = {"samples": len(y), "epochs": config.epochs, "blocks": list(tuned), "layer": layer,
              "device": str(device), "memory_samples_per_second": n / memory_s,
              "device_resident_samples_per_second": n / device_s, "streaming_samples_per_second": n / stream_s,
              "images_samples_per_second": n / images_s, "device_resident_ratio": memory_s / device_s,
              "streaming_ratio": memory_s / stream_s, "cache_speedup": images_s / device_s,
              "stream_read_samples_per_second": len(y) / read[1], "stream_readers_speedup": read[1] / read[4],
              "stream_wait_fraction": sum(streams[0].waits) / stream_s, "stream_readers": streams[0].reading}
    return {**result, **mfu(training_flops(backbone, tuned)[1] * n / device_s, device, tcfg.precision)}


def mfu(achieved: float, device: torch.device, precision: str) -> dict:
    """Model FLOP utilisation: achieved FLOP/s ÷ the device's peak for the precision used, with the peak named."""
    peak, name = peak_flops(device, precision)
    return {"achieved_flops_per_second": achieved, "peak_flops_per_second": peak, "peak": name,
            "mfu": achieved / peak}


def _stream_read_seconds(loader: StreamLoader) -> float:
    """Seconds for one epoch of a stream loader's batches on the device, nothing trained (epoch 0 warms up)."""
    for _ in loader.epoch(0):
        pass
    t0 = time.perf_counter()
    for _ in loader.epoch(1):
        pass
    _sync(loader.device)
    return time.perf_counter() - t0



@_in_workdir
def bench_profile(config: BenchConfig, progress: bool, *, root: Path) -> dict:
    """A profile over K windows with subcache (one cache build + every run from it) vs the reference way (every
    run pushes every epoch's images through the whole frozen network), same epochs, same run, each window scored
    on the test split both ways; and the FLOP bound."""
    from .backbones import parse_block_spec
    from .train import train_reference

    device = resolve_device(config.device)
    backbone = load_backbone(config.model, config.weights, image_size=config.image_size).to(device)
    blocks = parse_block_spec(config.blocks, backbone)
    lo, hi = blocks[0], blocks[-1]
    wins = windows(lo, hi, config.width)
    tcfg = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, device=config.device,
                       compile=config.compile)
    out = str(root / "bench-profile.zarr")
    source = open_source(config.data, "train", limit=config.limit)
    test = open_source(config.data, "test", limit=config.limit)
    for win in wins:  # warm-up, untimed: a GPU's first step of each window pays cuDNN's set-up, for both ways alike
        train_reference(source, backbone, lo, replace(tcfg, blocks=spec_of(win), epochs=1, limit=min(
            len(source), 2 * config.batch_size)), len(source.classes), config.device)
    t0 = time.perf_counter()
    build_cache(BuildConfig(out=out, layers=(str(lo),), model=config.model, weights=config.weights,
                            data=config.data, limit=config.limit, image_size=config.image_size,
                            device=config.device, overwrite=True), backbone=backbone, progress=progress)
    cache_build_s = time.perf_counter() - t0
    before = replace(CLOCK)
    profile = profile_blocks(out, ProfileConfig(blocks=f"{lo}-{hi}", widths=(config.width,), seeds=config.repeats,
                                                probe=False, train=tcfg, batch_runs=config.batch_runs),
                             backbone=backbone)
    cached_s = time.perf_counter() - t0
    steps_s, scoring_s = CLOCK.steps - before.steps, CLOCK.scoring - before.scoring
    reference_s, reference_acc = _reference_profile(source, test, backbone, wins, tcfg, config.repeats, device)
    from_images, from_cache = profile_flops(backbone, wins, config.epochs, len(source), len(test))
    bound, speedup = from_images / from_cache, reference_s / cached_s
    arm_s = cached_s - cache_build_s  # the profile itself, build excluded
    return {"windows": [spec_of(w) for w in wins], "repeats": config.repeats, "epochs": config.epochs,
            "images": len(source), "device": str(device), "batch_runs": config.batch_runs,
            "compile": config.compile, "subcache_seconds": cached_s, "cache_build_seconds": cache_build_s,
            "step_seconds": steps_s, "scoring_seconds": scoring_s,
            "setup_fraction": max(0.0, arm_s - steps_s - scoring_s) / arm_s,
            "reference_seconds": reference_s, "speedup": speedup, "flop_bound": bound,
            "bound_fraction": speedup / bound, "subcache_test_accuracy": [r["test_accuracy"] for r in profile.rows],
            "reference_test_accuracy": reference_acc, **mfu(from_cache / cached_s, device, tcfg.precision)}


def _reference_profile(source, test, backbone: Backbone, wins: list[tuple[int, ...]], tcfg: TrainConfig,
                       repeats: int, device: torch.device) -> tuple[float, list[float]]:
    """The reference way: every window × seed trained from images, then scored from images: (seconds, accuracies)."""
    from .train import train_reference

    t0, accuracies = time.perf_counter(), []
    for win in wins:
        for seed in range(repeats):
            model, _, _ = train_reference(source, backbone, win[0], replace(tcfg, blocks=spec_of(win), seed=seed),
                                          len(source.classes), str(device))
            accuracies.append(_image_accuracy(model, backbone, test, win[0], device))
    return time.perf_counter() - t0, accuracies


@torch.inference_mode()
def _image_logits(model: TunedModel, backbone: Backbone, source, layer: int, device: torch.device,
                  batch: int = 512, workers: int | None = None) -> torch.Tensor:
    """Logits the reference way, on the CPU: each image (decoded as `build` does) through the live frozen prefix,
    then ``model``."""
    from .pipeline import check_workers, image_batches

    out = []
    for _, images in image_batches(source, backbone.preprocess, batch, workers=check_workers(workers, device),
                                   device=device):
        out.append(model(backbone.prefix(to_input(images, backbone.preprocess), layer)).cpu())
    return torch.cat(out)


def _image_accuracy(model: TunedModel, backbone: Backbone, source, layer: int, device: torch.device) -> float:
    """Test accuracy the reference way (eval mode: tuned BatchNorms use their running statistics)."""
    pred = _image_logits(model.eval(), backbone, source, layer, device).argmax(1)
    return (pred == torch.from_numpy(source.labels)).sum().item() / len(source)


@_in_workdir
def bench_score(config: BenchConfig, progress: bool, *, root: Path) -> dict:
    """Scoring a pool from the cache vs through the full frozen network from images (same model, same run)."""
    from .evaluation import cached_logits
    from .backbones import parse_block_spec

    device, backbone, layer, cache = _train_split_cache(config, "score", progress, root)
    model = TunedModel(backbone, layer, parse_block_spec(config.blocks, backbone), len(cache.classes),
                       cache.sample_shape).to(device).eval()
    source = open_source(config.data, "train", limit=config.limit)
    cached_logits(model, cache, "train", device)  # warm-up
    cache_s = _timed(lambda: cached_logits(model, cache, "train", device), device)
    images_s = _timed(lambda: _image_logits(model, backbone, source, layer, device, workers=config.workers), device)
    result = {"items": len(source), "layer": layer, "device": str(device),
              "cache_items_per_second": len(source) / cache_s, "images_items_per_second": len(source) / images_s,
              "speedup": images_s / cache_s}
    return result


def _latency(fn, x: torch.Tensor, device: torch.device, reps: int) -> float:
    """Median seconds per call after warm-up (CUDA events on a GPU, wall clock on the CPU)."""
    import statistics

    with torch.inference_mode():
        for _ in range(2):
            fn(x)
        times = []
        for _ in range(reps):
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn(x)
                end.record()
                torch.cuda.synchronize()
                times.append(start.elapsed_time(end) / 1000)
            else:
                t0 = time.perf_counter()
                fn(x)
                times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_multitask(config: BenchConfig = BenchConfig(), progress: bool = False, tasks: int = 3,
                    reps: int = 10) -> dict:
    """Latency of the backbone alone, backbone + k SubTuned tasks (MultiTaskModel), backbone + k full copies;
    the added latency per task as a ratio to a second full model, at batch 1 and 64."""
    import copy

    from torch import nn

    from .backbones import TORCHVISION_RESNETS, parse_block_spec
    from .multitask import GroupedPairModel, MultiTaskModel, TaskBranch

    device = resolve_device(config.device)
    backbone = load_backbone(config.model, config.weights, image_size=config.image_size).to(device)
    window = parse_block_spec(config.blocks, backbone)
    size = backbone.preprocess.image_size
    dim = backbone.features(backbone.stem(torch.zeros(1, 3, size, size, device=device)), 0).shape[-1]  # fp32 model
    branches = {f"task{k}": TaskBranch({i: copy.deepcopy(backbone.block(i)) for i in window}, nn.Linear(dim, 10),
                                       False) for k in range(tasks)}
    multi = MultiTaskModel(backbone, branches).to(device).eval()
    copies = [copy.deepcopy(backbone).to(device) for _ in range(tasks)]
    grouped = single = None
    if config.model in TORCHVISION_RESNETS and len(window) <= 2:  # the reference code's rewrite: one task only
        first = branches["task0"]
        grouped = GroupedPairModel(backbone, {i: first.blocks[str(i)] for i in window}, first.head).to(device).eval()
        single = MultiTaskModel(backbone, {"task0": first}).to(device).eval()
    result = {"model": config.model, "image_size": size, "tasks": tasks, "window": list(window),
              "device": str(device)}
    for batch in (1, 64):
        x = torch.randn(batch, 3, size, size, device=device)
        alone = _latency(backbone, x, device, reps)
        shared = _latency(multi, x, device, reps)
        full = _latency(lambda x: [backbone(x)] + [c(x) for c in copies], x, device, reps)
        result[f"backbone_ms_b{batch}"] = alone * 1e3
        result[f"multitask_ms_b{batch}"] = shared * 1e3
        result[f"full_copies_ms_b{batch}"] = full * 1e3
        result[f"added_latency_ratio_b{batch}"] = ((shared - alone) / tasks) / ((full - alone) / tasks)
        if grouped is not None:  # one task: the grouped-convolution rewrite vs forking with batch-axis merges
            result[f"grouped_ms_b{batch}"] = _latency(grouped, x, device, reps) * 1e3
            result[f"multitask_1task_ms_b{batch}"] = _latency(single, x, device, reps) * 1e3
            result[f"grouped_vs_multitask_b{batch}"] = (result[f"grouped_ms_b{batch}"] /
                                                         result[f"multitask_1task_ms_b{batch}"])
    return result


@_in_workdir
def bench_distributed(config: BenchConfig, progress: bool, *, root: Path) -> dict:
    """Build throughput with 2 torchrun processes ÷ with 1 process, same images, this machine."""
    import json
    import subprocess
    import sys

    args = ["build", "--model", config.model, "--weights", config.weights, "--data", config.data, "--limit",
            str(config.limit), "--image-size", str(config.image_size), "--layer", config.layer, "--device",
            config.device, "--overwrite", "--json"]
    runs = {}
    for procs in (1, 2):
        launcher = ([sys.executable, "-m", "subcache"] if procs == 1 else
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
                     "-m", "subcache"])
        done = subprocess.run(launcher + args + ["--out", str(root / f"bench-dist-{procs}.zarr")],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"{procs}-process build failed: {done.stderr.strip().splitlines()[-1]}")
        runs[procs] = json.loads(done.stdout.strip().splitlines()[-1])
    result = {"images": runs[1]["images"], "device": config.device,
              "build_images_per_second_1": runs[1]["images"] / runs[1]["seconds"],
              "build_images_per_second_2": runs[2]["images"] / runs[2]["seconds"],
              "build_scaling_2": (runs[2]["images"] / runs[2]["seconds"]) / (runs[1]["images"] / runs[1]["seconds"]),
              "cpu_count": os.cpu_count()}
    return result


@_in_workdir
def bench_select(config: BenchConfig, progress: bool, *, root: Path) -> dict:
    """`rank`, `profile --halving` and `select` (budget 0.1) vs the full profile of the same windows (widths
    1..``width``): wall seconds, FLOPs (select: its `compute_fraction`) and regret, measured in one run."""
    from .backbones import parse_block_spec

    device = resolve_device(config.device)
    backbone = load_backbone(config.model, config.weights, image_size=config.image_size).to(device)
    blocks = parse_block_spec(config.blocks, backbone)
    lo, hi = blocks[0], blocks[-1]
    out = str(root / "bench-select.zarr")
    build_cache(BuildConfig(out=out, layers=(str(lo),), model=config.model, weights=config.weights,
                            data=config.data, limit=config.limit, image_size=config.image_size,
                            device=config.device, overwrite=True), backbone=backbone, progress=progress)
    tcfg = TrainConfig(epochs=config.epochs, batch_size=config.batch_size, device=config.device)
    widths = tuple(range(1, config.width + 1))
    pcfg = ProfileConfig(blocks=f"{lo}-{hi}", widths=widths, probe=False, train=tcfg, val_fraction=0.2)
    t0 = time.perf_counter()
    full = profile_blocks(out, pcfg, out=str(root / "profile"), backbone=backbone)
    full_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    halving: HalvingResult = profile_blocks(out, replace(pcfg, halving=True), backbone=backbone)
    halving_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ranked = rank_windows(out, RankConfig(blocks=f"{lo}-{hi}", widths=widths, train=tcfg, val_fraction=0.2),
                          backbone=backbone, against=str(root / "profile"))
    rank_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    chosen = select_window(out, SelectConfig(blocks=f"{lo}-{hi}", widths=widths, train=tcfg), backbone=backbone)
    select_s = time.perf_counter() - t0
    test = {s["blocks"]: s["mean"] for s in full.summary()}
    pick = full.best()["blocks"]
    r_flops = rank_flops(backbone, ranked, lo, hi, int(0.8 * len(open_cache(out).split("train"))))
    c = ranked.comparison["methods"]
    return {"windows": len(test), "epochs": config.epochs, "device": str(device), "profile_pick": pick,
            "profile_seconds": full_s, "profile_flops": halving.full_flops,
            "halving_pick": halving.best["blocks"], "halving_seconds_ratio": halving_s / full_s,
            "halving_flops_ratio": halving.compute_fraction,
            "halving_regret": 100 * (test[pick] - test[halving.best["blocks"]]),
            "rank_seconds_ratio": rank_s / full_s, "rank_flops_ratio": r_flops / halving.full_flops,
            **{f"rank_{m}_regret": v["regret"] for m, v in c.items()},
            **{f"rank_{m}_spearman": v["spearman"] for m, v in c.items()},
            "select_pick": spec_of(chosen.blocks), "select_compute_fraction": chosen.compute_fraction,
            "select_total_fraction": chosen.total_fraction, "select_seconds_ratio": select_s / full_s,
            "select_regret": 100 * (test[pick] - test[spec_of(chosen.blocks)]),
            "select_test_accuracy": chosen.test_accuracy}
