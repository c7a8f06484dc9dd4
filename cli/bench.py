"""`subcache bench WHAT`: a capability against its baseline, measured in one run."""
from __future__ import annotations

import click
from rich.table import Table

from subcache.bench import BenchConfig

from .common import check_batch_runs, console, device_option, emit_json, friendly, option

# -- bench -------------------------------------------------------------------------------------------------------
BENCHES = ("build", "train", "profile", "score", "multitask", "distributed", "select")


@click.command()
@click.argument("what", type=click.Choice(BENCHES))
@option("--model", of=BenchConfig)
@option("--weights", of=BenchConfig)
@option("--data", of=BenchConfig)
@option("--image-size", type=click.IntRange(min=8), of=BenchConfig)
@option("--limit", type=click.IntRange(min=2), of=BenchConfig,
        help="first N images of the train split")
@option("--layer", of=BenchConfig, help="cached layer")
@option("--blocks", of=BenchConfig, help="tuned blocks (train), profiled range (profile)")
@option("--width", type=click.IntRange(min=1), of=BenchConfig,
        help="window width (profile); widths 1..W (select)")
@option("--epochs", type=click.IntRange(min=1), of=BenchConfig)
@option("--batch-size", type=click.IntRange(min=2), of=BenchConfig)
@device_option
@click.option("--workers", type=click.IntRange(min=0), help="processes decoding photos (build, score) "
              "[default: as build]")
@option("--decode", type=click.Choice(["cpu", "gpu"]), of=BenchConfig, help="(build)")
@option("--repeats", type=click.IntRange(min=1), of=BenchConfig, help="seeds per window (profile)")
@option("--batch-runs", of=BenchConfig, callback=check_batch_runs,
        help="auto | off | K: a window's repeats as one batched model (profile)")
@option("--compile", type=click.Choice(["auto", "on", "off"]), of=BenchConfig,
        help="the training step through torch.compile (train, profile)")
@click.option("--workdir", help="keep the benchmark's caches here (default: a temporary folder)")
@click.option("--json", "as_json", is_flag=True)
@friendly
def bench(what, as_json, **kw) -> None:
    """Measure a capability against its baseline in one run and print the ratio."""
    from subcache import bench as benches

    result = getattr(benches, f"bench_{what}")(benches.BenchConfig(**kw), progress=True)
    if as_json:
        emit_json(result)
        return
    table = Table(title=f"subcache bench {what}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
    console.print(table)
