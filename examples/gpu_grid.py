"""Which CUDA training options pay, measured: precision × channels_last × fused AdamW × cudnn.benchmark, on one
cache per image size (Lite0, Fashion-MNIST), steady-state samples/s from the last epoch; then a torch.profiler
table of one epoch with the defaults. Writes grid.json and profile.txt to OUT.

    python examples/gpu_grid.py --out runs/gpu --limit 5000 --sizes 64,224
"""
import argparse
import itertools
import json
import time
from pathlib import Path

import torch

import subcache


def steady(result) -> float:
    """Samples per second of the last epoch (the first one pays for cudnn's and the allocator's warm-up)."""
    h = result.history
    last = h[-1]["seconds"] - (h[-2]["seconds"] if len(h) > 1 else 0.0)
    return result.num_samples / max(last, 1e-9)


def grid(cache, blocks: str, epochs: int, device: str) -> list[dict]:
    rows = []
    for precision, channels_last, fused, bench in itertools.product(("fp32", "bf16"), (False, True), (False, True),
                                                                    (False, True)):
        torch.backends.cudnn.benchmark = bench
        config = subcache.TrainConfig(blocks=blocks, epochs=epochs, batch_size=256, device=device,
                                      precision=precision, channels_last=channels_last, fused=fused)
        result = subcache.train(cache, config)
        rows.append({"precision": precision, "channels_last": channels_last, "fused": fused, "cudnn_benchmark": bench,
                     "steady_samples_per_second": round(steady(result)),
                     "samples_per_second": round(result.samples_per_second), "test_accuracy": result.test_accuracy})
        print(json.dumps(rows[-1]), flush=True)
    torch.backends.cudnn.benchmark = False
    return rows


def profile_epoch(cache, blocks: str, device: str) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    config = subcache.TrainConfig(blocks=blocks, epochs=1, batch_size=256, device=device)
    subcache.train(cache, config)  # warm
    with profile(activities=activities) as prof:
        subcache.train(cache, config)
    key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
    return (prof.key_averages().table(sort_by=key, row_limit=25) + "\n\n"
            + prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/gpu")
    ap.add_argument("--limit", type=int, default=5000)
    ap.add_argument("--sizes", default="64,224")
    ap.add_argument("--blocks", default="14-16")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report, profiles = {}, []
    for size in map(int, args.sizes.split(",")):
        path = f"/tmp/grid-{size}.zarr"
        t0 = time.perf_counter()
        subcache.build_cache(subcache.BuildConfig(out=path, layers=("13",), model="efficientnet_lite0",
                                                  data="fashion-mnist", image_size=size, limit=args.limit,
                                                  device=args.device, overwrite=True))
        print(f"build {size}px: {time.perf_counter() - t0:.1f}s", flush=True)
        cache = subcache.open_cache(path)
        report[size] = grid(cache, args.blocks, args.epochs, args.device)
        profiles.append(f"### {size}px, defaults\n" + profile_epoch(cache, args.blocks, args.device))
    (out / "grid.json").write_text(json.dumps(report, indent=1))
    (out / "profile.txt").write_text("\n\n".join(profiles))


if __name__ == "__main__":
    main()
