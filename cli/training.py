"""Commands that train or score one task: `train`, `evaluate`, `score`, `al`."""
from __future__ import annotations

import os

import click
from rich.table import Table

import subcache
from subcache.advice import once
from subcache.active import ALConfig, score_pool
from subcache.config import TrainConfig
from subcache.evaluation import evaluate_task

from .common import (allows_factories, check_batch_runs, console, device_option, emit_json, fmt_int, friendly,
                     is_main_process, option, renamed, train_config, train_options)


def history_table(history: list[dict]) -> Table:
    table = Table(title="training")
    cols = ["epoch", "loss", "train_accuracy", "seconds"] + [c for c in ("val_accuracy", "test_accuracy")
                                                             if any(c in h for h in history)]
    for col in cols:
        table.add_column(col.replace("_", " "), justify="right")
    for h in history:
        table.add_row(*[f"{h[c]:.4f}" if isinstance(h.get(c), float) else str(h.get(c, "")) for c in cols])
    return table


@click.command()
@click.option("--cache", required=True, help="a complete cache from `subcache build`")
@click.option("--blocks", required=True, help="13 | 13-14 | 13,15 | layer3.5 | none (linear probe)")
@train_options
@option("--seed", type=int, of=TrainConfig)
@option("--eval-every", type=click.IntRange(min=0), of=TrainConfig,
        help="report test accuracy every k epochs (0: at the end); never used to choose")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="hold out this class-balanced fraction of the training examples: validation accuracy every "
                   "epoch, the best epoch's weights kept")
@click.option("--siamese", is_flag=True, help="head sees original + tuned features")
@option("--prune", type=click.FloatRange(0, 1, max_open=True), of=TrainConfig,
        help="channel-prune this fraction of the tuned blocks before training")
@option("--prune-norm", type=click.Choice(["l1", "l2"]), of=TrainConfig)
@option("--prune-scope", type=click.Choice(["local", "global"]), of=TrainConfig)
@click.option("--out", required=True, help="task directory (task.safetensors + task.json)")
@click.option("--overwrite", is_flag=True, help="replace a complete task already in --out")
@click.option("--json", "as_json", is_flag=True)
@allows_factories
@friendly
def train(cache, out, val_fraction, overwrite, as_json, **kw) -> None:
    """Train the selected blocks + a new linear head from a cache (never touching images)."""
    from subcache.selection import validation_split
    from subcache.train import check_train_config

    config, data = train_config(**kw), subcache.TrainData()
    if val_fraction:
        check_train_config(config)
        cache = subcache.open_cache(cache)
        fit, val = validation_split(cache, config, val_fraction)
        data = subcache.TrainData(positions=fit, val_positions=val)
    result = subcache.train(cache, config, data, out=out, progress=os.path.basename(os.path.normpath(out)),
                            overwrite=overwrite)
    if as_json or not is_main_process():
        emit_json({**result.metrics(), "task": out})
        return
    console.print(history_table(result.history))
    acc = "–" if result.test_accuracy is None else f"{result.test_accuracy:.4f}"
    if result.best_epoch is not None:
        acc += f" (epoch {result.best_epoch}, best on validation {result.val_accuracy:.4f})"
    pruned = f" ({result.param_fraction:.0%} of the blocks' params after pruning)" if kw["prune"] else ""
    console.print(f"blocks {kw['blocks']}: test accuracy [bold]{acc}[/], {fmt_int(result.trainable_params)} "
                  f"trainable params{pruned}, {result.samples_per_second:,.0f} samples/s ({result.loader} loader) "
                  f"→ {out}")


@click.command()
@click.option("--task", "task_dir", required=True)
@click.option("--cache", required=True)
@option("--split", of=evaluate_task)
@device_option
@click.option("--json", "as_json", is_flag=True, help="one JSON object: accuracy and SPLIT_accuracy (test_accuracy)")
@allows_factories
@friendly
def evaluate(task_dir, cache, split, device, as_json) -> None:
    """Re-score a saved task on a cached split."""
    accuracy = subcache.evaluate_task(task_dir, cache, split=split, device=device, progress=True)
    if as_json:
        emit_json({"task": task_dir, "split": split, "accuracy": accuracy, f"{split}_accuracy": accuracy})
    else:
        console.print(f"{task_dir} on {cache} ({split}): accuracy [bold]{accuracy:.4f}[/]")


# -- score / al / labels ----------------------------------------------------------------------------------------
@click.command()
@click.option("--cache", required=True)
@click.option("--task", "task_dir", required=True)
@option("--split", of=score_pool)
@option("--metric", type=click.Choice(["margin", "entropy", "least-confidence"]), of=score_pool)
@click.option("--top", type=click.IntRange(min=1), help="print the K most uncertain items")
@click.option("--exclude", "exclude_file", type=click.Path(dir_okay=False),
              help="file of ids to leave out (one per line, or a CSV with an id column)")
@device_option
@click.option("--out", required=True, help="scores as .csv or .npz (id, key, score, pred, pred_index, prob)")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--json", "as_json", is_flag=True)
@allows_factories
@friendly
def score(cache, task_dir, split, metric, top, exclude_file, device, out, overwrite, as_json) -> None:
    """Score every item of a cached split with a task: margin, entropy or least-confidence (offline inference)."""
    from subcache.task import check_output_file

    check_output_file(out, overwrite=overwrite)
    exclude = read_ids(exclude_file) if exclude_file else None
    scores = subcache.score_pool(cache, task_dir, split=split, metric=metric, exclude=exclude, device=device,
                                 progress=True)
    scores.save(out)
    picked = scores.top(top) if top else []
    if as_json:
        emit_json({"out": out, "items": len(scores.ids), "metric": metric,
                   "top": [{"id": int(scores.ids[i]), "key": str(scores.keys[i]), "score": float(scores.score[i]),
                            "pred": str(scores.pred_names()[i]), "prob": float(scores.prob[i])} for i in picked]})
        return
    console.print(f"scored {len(scores.ids)} items of {split} by {metric} → {out}")
    if top:
        table = Table(title=f"{top} most uncertain")
        for col in ("id", "key", metric, "predicted", "probability"):
            table.add_column(col, justify="right")
        names = scores.pred_names()
        for i in picked:
            table.add_row(str(scores.ids[i]), str(scores.keys[i]), f"{scores.score[i]:.4f}", names[i],
                          f"{scores.prob[i]:.4f}")
        console.print(table)


def read_ids(path: str):
    """Ids from a file: one per line, or the first column of a CSV with a header."""
    import numpy as np

    lines = [line.split(",")[0].strip() for line in open(path) if line.strip()]
    lines = lines[1:] if lines and not lines[0].lstrip("-").isdigit() else lines
    try:
        return np.array([int(x) for x in lines], dtype=np.int64)
    except ValueError:
        raise click.ClickException(f"{path}: ids must be integers, one per line (or an id column)") from None


@click.command()
@click.option("--cache", required=True)
@click.option("--blocks", required=True)
@click.option("--budgets", required=True, help="labelled-set sizes per round, e.g. 100,500,1000")
@option("--strategy", of=ALConfig,
        help="margin | entropy | least-confidence | random, or several: margin,random")
@option("--repeats", "seeds", type=click.IntRange(min=1), of=ALConfig,
        help="runs with seeds 0..K-1: initial labelled set and training (mean ± std)")
@click.option("--oracle", type=click.Path(dir_okay=False),
              help="CSV id,label filled in by a person; the run stops at each round with OUT/STRATEGY/to_label.csv")
@option("--batch-runs", of=ALConfig, callback=check_batch_runs,
        help="auto | off | K: train a round of up to K repeats together as one batched model "
             "(auto: 8 on CUDA, off on the CPU; off with --oracle)")
@train_options(examples=False)
@click.option("--out", required=True)
@click.option("--json", "as_json", is_flag=True)
@renamed("--seeds", "seeds", "--repeats", type=click.IntRange(min=1))
@allows_factories
@friendly
def al(cache, blocks, budgets, strategy, seeds, oracle, batch_runs, out, as_json, **kw) -> None:
    """Pool-based active learning on one cache: retrain, score the pool, label the most uncertain, repeat."""
    try:
        budget_list = tuple(int(b) for b in budgets.split(","))
    except ValueError:
        raise click.BadParameter(f"{budgets!r} is not a comma-separated list of sizes",
                                 param_hint="--budgets") from None
    strategies = tuple(s.strip() for s in strategy.split(",") if s.strip())
    config = subcache.ALConfig(blocks=blocks, budgets=budget_list, strategy=strategies[0], seeds=seeds,
                               oracle=oracle, train=train_config(**kw), batch_runs=batch_runs)
    with once():  # a warning every round gives (too few steps) is printed once
        results = subcache.compare_strategies(cache, config, strategies, out=out, progress=True)
    waiting = {s: r.waiting for s, r in results.items() if r.waiting}
    if as_json:
        emit_json({"curves": {s: r.curve for s, r in results.items()}, "waiting": waiting, "out": out})
        return
    for s, path in waiting.items():
        console.print(f"[yellow]{s}: waiting for labels[/]: fill in {path}, add the rows to {oracle}, rerun")
    table = Table(title="active learning: test accuracy (mean over seeds)")
    table.add_column("budget", justify="right")
    for s in results:
        table.add_column(s, justify="right")
    for b in budget_list:
        cells = []
        for r in results.values():
            accs = [c["accuracy"] for c in r.curve if c["budget"] == b]
            cells.append(f"{sum(accs) / len(accs):.4f}" if accs else "–")
        table.add_row(str(b), *cells)
    console.print(table)
