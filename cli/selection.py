"""Commands that choose blocks: `profile` (and `--halving`), `rank`, `select`, `greedy`."""
from __future__ import annotations

import click
from rich.table import Table

from subcache.advice import once, within_noise
from subcache.config import TrainConfig
from subcache.progress import warn
from subcache.selection import GreedyConfig, ProfileConfig, SelectConfig
from subcache.selection.rank import RankConfig

from .common import (allows_factories, check_batch_runs, console, device_option, emit_json, fmt_int, friendly,
                     is_main_process, option, renamed, train_config, train_options, window_options)


@click.command()
@click.option("--cache", required=True)
@window_options
@option("--repeats", "seeds", type=click.IntRange(min=1), of=ProfileConfig,
        help="runs per window, with seeds 0..K-1 (mean ± std)")
@click.option("--no-probe", is_flag=True, help="skip the linear-probe baseline")
@option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), of=ProfileConfig, show_default=False,
        help="select on this class-balanced fraction of the training split; test only reports "
             "[default: 0, or 0.2 with --halving]")
@click.option("--halving", is_flag=True, help="successive halving: all windows briefly, the best 1/eta longer, …")
@option("--eta", type=click.IntRange(min=2), of=ProfileConfig, help="halving: keep 1/eta per rung")
@option("--min-epochs", type=click.IntRange(min=1), of=ProfileConfig,
        help="halving: epochs of the first rung")
@click.option("--prior", type=click.Choice(["rank"]), help="halving: start from rank's best 1/eta windows")
@option("--batch-runs", of=ProfileConfig, callback=check_batch_runs,
        help="auto | off | K: train up to K of a window's repeats together as one batched model "
             "(auto: 8 on CUDA, off on the CPU)")
@train_options
@click.option("--out", required=True, help="folder for profile.csv/json/png (rerun to resume)")
@click.option("--json", "as_json", is_flag=True)
@renamed("--blocks", "block_range", "--range")
@renamed("--seeds", "seeds", "--repeats", type=click.IntRange(min=1))
@allows_factories
@friendly
def profile(cache, block_range, widths, seeds, no_probe, val_fraction, halving, eta, min_epochs, prior, batch_runs,
            out, as_json, **kw) -> None:
    """The finetuning profile: train every window of consecutive blocks from one cache."""
    from subcache.selection import ProfileConfig, profile_blocks

    if prior and not halving:
        raise click.UsageError("--prior applies to --halving")
    config = ProfileConfig(blocks=block_range, widths=widths, seeds=seeds, probe=not no_probe,
                           train=train_config(**kw), val_fraction=val_fraction, halving=halving, eta=eta,
                           min_epochs=min_epochs, prior=prior, batch_runs=batch_runs)
    with once():  # a warning every run gives (too few steps) is printed once
        result = profile_blocks(cache, config, out=out, progress=True)
    if not is_main_process():  # under torchrun: rank 0 reports
        return
    if halving:
        return show_halving(result, out, as_json)
    best = result.best()
    if within_noise(result.summary(), best):
        warn(within_noise(result.summary(), best))
    if as_json:
        emit_json({"summary": result.summary(), "best": best, "selected_on": "validation" if val_fraction else "test",
                   "out": out})
        return
    table = Table(title=f"finetuning profile ({seeds} run{'s' if seeds > 1 else ''} per window)")
    for col in ("blocks", "width", "test accuracy", "± std", "trainable params"):
        table.add_column(col, justify="right")
    for s in result.summary():
        mark = " ★" if best and s["blocks"] == best["blocks"] else ""
        table.add_row(s["blocks"] + mark, str(s["width"]) if s["width"] else "probe", f"{s['mean']:.4f}",
                      f"{s['std']:.4f}", fmt_int(s["trainable_params"]))
    console.print(table)
    console.print(f"wrote {out}/profile.csv, profile.json, profile.png")


def show_halving(result, out: str, as_json: bool) -> None:
    if as_json:
        emit_json(result.to_dict())
        return
    table = Table(title="successive halving")
    for col in ("rung", "epochs", "windows", "kept"):
        table.add_column(col, justify="right")
    for r in result.rungs:
        table.add_row(str(r["rung"]), str(r["epochs"]), str(len(r["windows"])), ", ".join(r["kept"]))
    console.print(table)
    b = result.best
    console.print(f"best window {b['blocks']}: validation {b['val_accuracy']:.4f}, test {b['test_accuracy']:.4f}; "
                  f"{result.compute_fraction:.1%} of a full profile's training compute → {out}/halving.json")


# -- rank --------------------------------------------------------------------------------------------------------
@click.command()
@click.option("--cache", required=True)
@window_options
@click.option("--method", "methods", default="all", show_default=True,
              help="fisher (+ fisher_pp), fisher_pp, rgn, logme, knn, align, drop, comma-separated, or all; "
                   "the first orders")
@option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), of=RankConfig,
        help="leave out the validation set a profile with this --val-fraction selects on")
@option("--samples", type=click.IntRange(min=2), of=RankConfig,
        help="training examples for the per-sample gradients")
@click.option("--examples", "limit", type=int, help="seeded class-balanced subset of N training examples (as train)")
@click.option("--labels", help="the cache's extra label set labels/NAME")
@device_option
@click.option("--against", "against", help="a profile folder: Spearman, Kendall and regret of each method")
@click.option("--out", required=True, help="folder for rank.csv, rank.json, rank.png")
@click.option("--json", "as_json", is_flag=True)
@renamed("--blocks", "block_range", "--range")
@renamed("--limit", "limit", "--examples", type=int)
@allows_factories
@friendly
def rank(cache, block_range, widths, methods, val_fraction, samples, limit, labels, device, against, out,
         as_json) -> None:
    """Score every window without training it: gradient energy (Fisher, relative gradient norm) and the
    transferability the frozen window loses (LogME, leave-one-out k-NN)."""
    from subcache.selection.rank import RankConfig, parse_methods, rank_windows

    config = RankConfig(blocks=block_range, widths=widths, methods=parse_methods(methods), val_fraction=val_fraction,
                        samples=samples, train=train_config(limit=limit, labels=labels, device=device))
    result = rank_windows(cache, config, out=out, against=against, progress=True)
    if as_json:
        emit_json({**result.to_dict(), "out": out})
        return
    table = Table(title=f"windows ranked by {config.methods[0]} (higher: tune here)")
    for col in ("blocks", *config.methods):
        table.add_column(col, justify="right")
    for r in result.ranking:
        table.add_row(r["blocks"], *(f"{r[m]:.4g}" for m in config.methods))
    console.print(table)
    if result.comparison:
        c = result.comparison
        console.print(f"against {against} ({c['windows']} windows, selected on {c['selected_on']}; "
                      f"profile pick {c['profile_pick']} at {c['profile_pick_test']:.4f} test):")
        for m, v in c["methods"].items():
            console.print(f"  {m:>9}: Spearman {v['spearman']:+.3f}  Kendall {v['kendall']:+.3f}  top {v['top']}  "
                          f"regret {v['regret']:+.2f} points")
    console.print(f"wrote {out}/rank.csv, rank.json, rank.png ({result.seconds:.1f}s)")


@click.command()
@click.option("--cache", required=True)
@window_options
@option("--budget", type=click.FloatRange(0, 1, min_open=True), of=SelectConfig,
        help="hard cap on the selection's compute, as a fraction of a full profile's")
@option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), of=SelectConfig,
        help="class-balanced fraction of the training split; racing past the first half-epoch is judged on it")
@option("--prior", type=click.Choice(["drop", "align"]), of=SelectConfig,
        help="the prior score that picks the candidates")
@option("--top", type=click.IntRange(min=1), of=SelectConfig,
        help="candidates, windows of the widest --width only: the prior's best N, + the earliest and the latest")
@option("--samples", type=click.IntRange(min=2), of=SelectConfig,
        help="training examples for the prior's per-sample gradients")
@option("--epochs", type=click.IntRange(min=1), of=TrainConfig, help="the winner's schedule")
@option("--lr", type=click.FloatRange(min=0, min_open=True), of=TrainConfig)
@option("--weight-decay", type=click.FloatRange(min=0), of=TrainConfig)
@option("--batch-size", type=click.IntRange(min=2), of=TrainConfig)
@click.option("--examples", "limit", type=int, help="a seeded, class-balanced subset of N training examples")
@click.option("--labels", help="train on the cache's extra label set labels/NAME")
@option("--seed", type=click.IntRange(min=0), of=TrainConfig)
@device_option
@click.option("--out", required=True, help="task directory for the winner (as `train --out`)")
@click.option("--overwrite", is_flag=True, help="replace a complete task already in --out")
@click.option("--json", "as_json", is_flag=True)
@friendly
def select(cache, block_range, widths, budget, val_fraction, prior, top, samples, out, overwrite, as_json,
           **kw) -> None:
    """Choose a window within a compute budget (a label-aware gradient prior, then racing on held-out loss),
    finish training it and save it as a task."""
    from subcache.selection import SelectConfig, select_window

    config = SelectConfig(blocks=block_range, widths=widths, budget=budget, val_fraction=val_fraction, prior=prior,
                          top=top, samples=samples, train=train_config(**kw))
    result = select_window(cache, config, out=out, progress=not as_json, overwrite=overwrite)
    if as_json:
        emit_json(result.to_dict())
        return
    table = Table(title="select: candidates (prior score, racing)")
    for col in ("blocks", prior, "steps raced", "held-out loss"):
        table.add_column(col, justify="right")
    for c in result.candidates:
        mark = " ★" if c["blocks"] == result.to_dict()["blocks"] else ""
        table.add_row(c["blocks"] + mark, f"{c[prior]:.4g}", str(c["steps_raced"]),
                      "–" if c["val_loss"] is None else f"{c['val_loss']:.4f}")
    console.print(table)
    acc = "–" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    console.print(f"picked {result.to_dict()['blocks']}: test accuracy [bold]{acc}[/]; selection "
                  f"{result.compute_fraction:.1%} of a full profile's compute (with the winner's training "
                  f"{result.total_fraction:.1%}){' — stopped by the budget' if result.stopped_by_budget else ''} "
                  f"→ {out}")


@click.command()
@click.option("--cache", required=True)
@click.option("--range", "block_range", help="candidate blocks LOW-HIGH [default: cached layer to last block]")
@option("--epsilon", type=float, of=GreedyConfig, help="stop when the gain is below this")
@option("--start", type=click.Choice(["empty", "full"]), of=GreedyConfig)
@click.option("--consecutive", is_flag=True, help="keep the chosen set a window of consecutive blocks")
@click.option("--max-blocks", type=click.IntRange(min=1))
@option("--folds", type=click.IntRange(min=0), of=GreedyConfig,
        help="choose by k-fold CV on the training split (0: by test accuracy)")
@option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), of=GreedyConfig,
        help="choose on this class-balanced fraction of the training split (0: by test accuracy)")
@option("--batch-runs", of=GreedyConfig, callback=check_batch_runs,
        help="auto | off | K: train up to K of a candidate's --folds together as one batched model "
             "(auto: 8 on CUDA, off on the CPU)")
@train_options
@click.option("--seed", type=int, default=0, show_default=True, help="seed of every run")
@click.option("--out", required=True)
@click.option("--json", "as_json", is_flag=True)
@renamed("--blocks", "block_range", "--range")
@allows_factories
@friendly
def greedy(cache, block_range, epsilon, start, consecutive, max_blocks, folds, val_fraction, batch_runs, out,
           as_json, **kw) -> None:
    """Greedy block selection: keep adding the block that helps most until the gain is below ε."""
    from subcache.selection import GreedyConfig, greedy_select

    config = GreedyConfig(blocks=block_range, epsilon=epsilon, start=start, consecutive=consecutive,
                          max_blocks=max_blocks, folds=folds, train=train_config(**kw), val_fraction=val_fraction,
                          batch_runs=batch_runs)
    with once():
        result = greedy_select(cache, config, out=out, progress=True)
    if as_json:
        emit_json({"blocks": list(result.blocks), "score": result.score, "test_accuracy": result.test_accuracy,
                   "path": result.path, "out": out})
        return
    table = Table(title="greedy selection")
    for col in ("step", "change", "blocks", "score"):
        table.add_column(col, justify="right")
    for p in result.path:
        table.add_row(str(p["step"]), p["change"], p["blocks"], f"{p['score']:.4f}")
    console.print(table)
    console.print(f"chosen blocks {result.blocks or 'none'}: test accuracy {result.test_accuracy:.4f} → {out}")
