"""`subcache` commands. Each parses options, calls the library, and renders; the library raises, only this layer
turns errors into one clean line and a non-zero exit."""
from __future__ import annotations

import functools
import json
import os
import sys

import click
from rich.console import Console
from rich.table import Table

import subcache
from subcache.errors import SubcacheError
from subcache.data import default_split
from subcache.inputs import resizing
from subcache.advice import once, within_noise
from subcache.progress import stage, warn

console = Console(stderr=True)  # human output; stdout is kept for --json


def friendly(fn):
    """Library errors (and a few predictable OS ones) → `Error: <one line>`, exit 1, no traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except SubcacheError as exc:
            raise click.ClickException(str(exc)) from None
        except (PermissionError, OSError) as exc:
            raise click.ClickException(f"{exc.__class__.__name__}: {exc}") from None

    return wrapper


def allows_factories(fn):
    """``--allow-factory PKG.MOD:FACTORY`` (repeatable): the only way a factory a cache or task names is run."""

    @functools.wraps(fn)
    def wrapper(*args, allow_factory=(), **kw):
        from subcache.trust import allow_factories

        with allow_factories(allow_factory):
            return fn(*args, **kw)

    return click.option("--allow-factory", "allow_factory", multiple=True, metavar="PKG.MOD:FACTORY",
                        help="run this model factory when a cache or task names it (trusted code only; also "
                             "$SUBCACHE_ALLOW_FACTORY)")(wrapper)


def emit_json(obj: dict) -> None:
    if is_main_process():
        click.echo(json.dumps(obj, default=str))


def is_main_process() -> bool:
    """Under torchrun only rank 0 prints."""
    return int(os.environ.get("RANK", 0)) == 0


def fmt_int(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(subcache.__version__, prog_name="subcache")
def main() -> None:
    """SubTuning from a cache: run the frozen prefix once, train chosen blocks + a head from its activations."""


# -- blocks ------------------------------------------------------------------------------------------------------
@main.command()
@click.argument("model")
@click.option("--weights", default="none", show_default=True, help="imagenet | none | PATH (shapes only need none)")
@click.option("--image-size", type=click.IntRange(min=8),
              help="input side in pixels, as `build --image-size` [default: the model's native size, e.g. 224]")
@click.option("--json", "as_json", is_flag=True, help="print one JSON object on stdout")
@friendly
def blocks(model: str, weights: str, image_size: int | None, as_json: bool) -> None:
    """List MODEL's blocks: index, name, parameters, input shape and forward FLOPs per image (FLOPs = 2 × MACs,
    one multiply-add counted as 2; fvcore and timm's profilers report MACs, half this)."""
    with stage(f"blocks {model}: loading and counting FLOPs", not as_json):
        backbone = subcache.load_backbone(model, weights, image_size=image_size)
        infos = subcache.describe_blocks(backbone)
    if as_json:
        emit_json({"model": model, "image_size": backbone.preprocess.image_size, "num_blocks": len(infos),
                   "flops_unit": "FLOPs = 2 x MACs", "blocks": [vars(i) for i in infos]})
        return
    size = backbone.preprocess.image_size
    default = "" if image_size else " (its default; pass --image-size S for the size you will build at)"
    table = Table(title=f"{model} at {size}px{default} — `--layer L` caches block L's input")
    for col in ("index", "name", "params", "input shape", "FLOPs (2×MACs)"):
        table.add_column(col, justify="right" if col != "name" else "left")
    for i in infos:
        table.add_row(str(i.index), i.name, fmt_int(i.params), "×".join(map(str, i.input_shape)), fmt_int(i.flops))
    console.print(table)


# -- build -------------------------------------------------------------------------------------------------------
@main.command()
@click.option("--model", default="efficientnet_lite0", show_default=True, help="see `subcache blocks`")
@click.option("--weights", default="imagenet", show_default=True, help="imagenet | torchvision enum | PATH | none")
@click.option("--data", default="fashion-mnist", show_default=True,
              help="fashion-mnist | cifar10 | cifar100 | flowers102 | ImageFolder dir | file.npz")
@click.option("--split", "splits", multiple=True, default=("train", "test"), show_default=True)
@click.option("--limit", type=int, help="first N images of each split")
@click.option("--image-size", type=click.IntRange(min=8), help="pixels [default: the weights' native size]")
@click.option("--layer", "layers", multiple=True, required=True,
              help="first block to train (index or name); repeat for several caches in one pass")
@click.option("--from", "source_cache", help="derive from an existing cache instead of images")
@click.option("--out", required=True, help="store path (one layer) or folder of blockNN.zarr stores")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32", "int8"]),
              help="[default: float16; with --from, the source's] int8: symmetric per-channel codes, scales in x_scale")
@click.option("--codec", type=click.Choice(["auto", "zstd", "lz4", "none"]), default="auto", show_default=True,
              help="auto: zstd only where it saves ≥ 15 % over lz4 on the first chunk")
@click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True),
              help="pack chunks into shards of about N MiB (fewer objects on object stores)")
@click.option("--flip-views", is_flag=True, help="also store exact activations of mirrored images")
@click.option("--corrupt", help="NAME:SEVERITY, a deterministic CIFAR-10-C style corruption, e.g. gaussian_noise:3")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--chunk-mb", type=click.FloatRange(min=0, min_open=True), default=1.0, show_default=True,
              help="target uncompressed chunk size in MiB")
@click.option("--workers", type=click.IntRange(min=0), help="processes decoding photos [default: the cores, at most "
              "8, on CUDA; 0 on the CPU]; 0: threads of the main process. The store's bits do not depend on it")
@click.option("--decode", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True,
              help="gpu: decode JPEGs in batches on CUDA (nvjpeg); other pixels than cpu (Pillow), so recorded")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--download", is_flag=True, help="let torchvision download named datasets (online only)")
@click.option("--resume", is_flag=True, help="finish an interrupted build (keeps whole chunks)")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@allows_factories
@friendly
def build(ctx, model, weights, data, splits, limit, image_size, layers, source_cache, out, dtype, codec, shard_mb,
          flip_views, corrupt, batch_size, chunk_mb, workers, decode, device, download, resume, overwrite,
          as_json) -> None:
    """Push a dataset once through the frozen prefix; store the input of block --layer as a Zarr cache."""
    if source_cache and corrupt:
        raise click.UsageError("--corrupt applies to images; a cache built --from another keeps its corruption")
    if source_cache:
        from subcache.derive import DeriveConfig, derive_cache

        refuse_image_options(ctx)
        result = derive_cache(DeriveConfig(source=source_cache, out=out, layers=tuple(layers), dtype=dtype,
                                           codec=codec, shard_mb=shard_mb, batch_size=batch_size,
                                           chunk_mb=chunk_mb, device=device, resume=resume, overwrite=overwrite),
                              progress=True)
    else:
        if (ctx.get_parameter_source("splits") is click.core.ParameterSource.DEFAULT
                and default_split(data) == "train"):
            splits = ("train",)  # a folder of class folders (the ImageFolder layout) is one split
            click.echo(f"note: {data} holds class folders directly: one split, train", err=True)
        config = subcache.BuildConfig(out=out, layers=tuple(layers), model=model, weights=weights, data=data,
                                      splits=tuple(splits), limit=limit, image_size=image_size,
                                      dtype=dtype or "float16", codec=codec, shard_mb=shard_mb,
                                      flip_views=flip_views, corrupt=corrupt, batch_size=batch_size,
                                      chunk_mb=chunk_mb, workers=workers, decode=decode, device=device,
                                      download=download, resume=resume, overwrite=overwrite)
        result = subcache.build_cache(config, progress=True)
    summary = {"paths": result.paths, "layers": result.layers, "images": result.images,
               "seconds": round(result.seconds, 3), "images_per_second": round(result.images_per_second, 1),
               "resumed_units": result.skipped_units}
    if as_json:
        emit_json(summary)
    elif is_main_process():
        console.print(f"[green]complete[/]: {', '.join(result.paths)} — {result.images} images in "
                      f"{result.seconds:.1f}s ({result.images_per_second:.0f} img/s)")


IMAGE_ONLY = ("model", "weights", "data", "splits", "limit", "image_size", "flip_views", "download", "corrupt",
              "workers", "decode")


def refuse_image_options(ctx: click.Context) -> None:
    """`build --from` reads a cache, not images: options about images would be silently ignored, so refuse them."""
    given = [p.opts[0] for p in ctx.command.params if p.name in IMAGE_ONLY
             and ctx.get_parameter_source(p.name) is not click.core.ParameterSource.DEFAULT]
    if given:
        raise click.ClickException(f"{', '.join(given)} cannot be used with --from: the source cache fixes the model, "
                                   f"weights, data, splits, image size and mirrored views")


# -- info --------------------------------------------------------------------------------------------------------
@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True)
@friendly
def info(path: str, as_json: bool) -> None:
    """Describe a cache: backbone, weights, layer, splits, chunking, codec, size on disk, status."""
    d = subcache.cache_info(path)
    if as_json:
        emit_json(d)
        return
    b, layer = d["backbone"], d["layer"]
    status = "[green]complete[/]" if d["status"] == "complete" else f"[red]{d['status']}[/] (resume with --resume)"
    console.print(f"[bold]{path}[/] {status}\n"
                  f"backbone {b['model']}  weights {b['weights']}  sha256 {b['weights_sha256'][:16]}…\n"
                  f"layer    input of block {layer['index']} ({layer['name']}) of {layer['num_blocks']}\n"
                  f"data     {d['data']}, {d['classes']} classes, {d['preprocess']['image_size']}px, {d['dtype']}\n"
                  f"input    {resizing(d['preprocess'])}\n"
                  f"codec    {' → '.join(c['name'] for c in d['codecs'])} "
                  f"{d['codecs'][-1].get('configuration', '')}\n"
                  f"format   {d['format_version']}, checksums {'crc32c' if d['checksums'] else 'none'}\n"
                  f"size     {fmt_int(d['bytes_on_disk'])}B on disk, {fmt_int(d['bytes_float32'])}B as float32 "
                  f"(×{d['compression_ratio'] or 0:.2f})")
    table = Table()
    for col in ("split", "array", "shape", "chunks", "dtype"):
        table.add_column(col)
    for split, arrays in d["splits"].items():
        for name, a in arrays.items():
            table.add_row(split, name, "×".join(map(str, a["shape"])), "×".join(map(str, a["chunks"])), a["dtype"])
    console.print(table)


@main.command()
@click.argument("path")
@click.option("--json", "as_json", is_flag=True)
@friendly
def verify(path: str, as_json: bool) -> None:
    """Decode every chunk of a cache (checksums) and list the damaged or missing ones; exit 1 when any."""
    from subcache.verify import verify_cache

    d = verify_cache(path)
    if as_json:
        emit_json(d)
    else:
        for b in d["bad"]:
            console.print(f"[red]corrupt[/] {b['split']}/{b['array']} chunk {b['chunk']}: {b['error']}")
        for m in d["missing"]:
            console.print(f"[red]missing[/] {m['split']}/{m['array']} object {m['object']}")
        verdict = "[green]ok[/]" if d["ok"] else f"[red]{len(d['bad'])} corrupt, {d['missing_count']} missing[/]"
        console.print(f"{path}: {d['chunks_checked']} chunks decoded, {verdict}"
                      f"{'' if d['checksums'] else ' (format 1: no checksums, only codec errors are caught)'}"
                      f"{'' if d['ok'] else ' — rerun the build with --resume to recompute them'}")
    if not d["ok"]:
        sys.exit(1)


# -- train / evaluate ----------------------------------------------------------------------------------------------
def refuse_limit(_ctx, _param, value):
    if value is not None:
        raise click.BadParameter("al trains on the examples it picks (--budgets); there is no subset to limit")


def renamed(old: str, new: str, new_spelling: str, **option_kw):
    """Keep ``old`` working as a hidden spelling of ``new_spelling`` (parameter ``new``), with a note on stderr."""

    def decorate(fn):
        @functools.wraps(fn)
        def merged(*args, **kw):
            value = kw.pop(f"old_{new}")
            if value is not None:
                click.echo(f"note: {old} is now {new_spelling}", err=True)
                kw[new] = value
            return fn(*args, **kw)

        return click.option(old, f"old_{new}", hidden=True, **option_kw)(merged)

    return decorate


def train_options(fn=None, *, examples: bool = True):
    """Options shared by every command that trains (train, profile, greedy, al; al picks its own examples)."""
    if fn is None:
        return functools.partial(train_options, examples=examples)
    if examples:  # --limit N (the first N images in build and predict) was this option's old spelling
        fn = renamed("--limit", "limit", "--examples", type=int)(fn)
    else:
        fn = click.option("--limit", "refused_limit", hidden=True, expose_value=False, callback=refuse_limit)(fn)
    for decorator in reversed([
        click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True),
        click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True),
        click.option("--weight-decay", type=click.FloatRange(min=0), default=0.01, show_default=True),
        click.option("--batch-size", type=click.IntRange(min=2), default=256, show_default=True),
        click.option("--augment", default="none", show_default=True, help="flip, crop, flip,crop or none"),
        *([click.option("--examples", "limit", type=int, help="a seeded, class-balanced subset of N training "
                                                             "examples [default: all]")] if examples else []),
        click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda"),
        click.option("--loader", type=click.Choice(["auto", "memory", "stream"]), default="auto",
                     show_default=True, help="resident on the device, or streamed by chunks"),
        click.option("--labels", help="train on the cache's extra label set labels/NAME"),
        click.option("--precision", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True,
                     help="bf16: autocast over the trainable part (measured slower than fp32 for Lite0 on an H200)"),
        click.option("--channels-last/--no-channels-last", default=None,
                     help="channels_last memory format [default: on CUDA only]"),
        click.option("--fused/--no-fused", default=None, help="fused AdamW kernel [default: on CUDA only]"),
        click.option("--compile", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
                     help="the training step through torch.compile (CUDA graphs on CUDA); auto: only where "
                          "measured to pay (so far nowhere: off)"),
    ]):
        fn = decorator(fn)
    return fn


def train_config(**kw) -> "subcache.TrainConfig":
    return subcache.TrainConfig(**{k: v for k, v in kw.items() if k in subcache.TrainConfig.__dataclass_fields__})


def history_table(history: list[dict]) -> Table:
    table = Table(title="training")
    cols = ["epoch", "loss", "train_accuracy", "seconds"] + [c for c in ("val_accuracy", "test_accuracy")
                                                             if any(c in h for h in history)]
    for col in cols:
        table.add_column(col.replace("_", " "), justify="right")
    for h in history:
        table.add_row(*[f"{h[c]:.4f}" if isinstance(h.get(c), float) else str(h.get(c, "")) for c in cols])
    return table


@main.command()
@click.option("--cache", required=True, help="a complete cache from `subcache build`")
@click.option("--blocks", required=True, help="13 | 13-14 | 13,15 | layer3.5 | none (linear probe)")
@train_options
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--eval-every", type=click.IntRange(min=0), default=0, show_default=True,
              help="report test accuracy every k epochs (0: at the end); never used to choose")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="hold out this class-balanced fraction of the training examples: validation accuracy every "
                   "epoch, the best epoch's weights kept")
@click.option("--siamese", is_flag=True, help="head sees original + tuned features")
@click.option("--prune", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="channel-prune this fraction of the tuned blocks before training")
@click.option("--prune-norm", type=click.Choice(["l1", "l2"]), default="l1", show_default=True)
@click.option("--prune-scope", type=click.Choice(["local", "global"]), default="local", show_default=True)
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


@main.command()
@click.option("--task", "task_dir", required=True)
@click.option("--cache", required=True)
@click.option("--split", default="test", show_default=True)
@click.option("--device", default="auto", show_default=True)
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


# -- profile / greedy ------------------------------------------------------------------------------------------
def parse_widths(_ctx, _param, value: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of widths, e.g. 1,2") from None
    if any(w < 1 for w in widths):
        raise click.BadParameter("widths must be at least 1")
    return widths


def check_batch_runs(_ctx, _param, value: str) -> str:
    from subcache.batched import parse_batch_runs

    try:
        parse_batch_runs(value)
    except subcache.ConfigError as exc:
        raise click.BadParameter(str(exc).removeprefix("--batch-runs ")) from None
    return value


@main.command()
@click.option("--cache", required=True)
@click.option("--range", "block_range", help="LOW-HIGH: the windows lie inside it [default: cached layer to last "
                                               "block]")
@click.option("--width", "widths", default="1", show_default=True, callback=parse_widths,
              help="window widths, e.g. 1,2,3")
@click.option("--repeats", "seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="runs per window, with seeds 0..K-1 (mean ± std)")
@click.option("--no-probe", is_flag=True, help="skip the linear-probe baseline")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0,
              help="select on this class-balanced fraction of the training split; test only reports "
                   "[default: 0, or 0.2 with --halving]")
@click.option("--halving", is_flag=True, help="successive halving: all windows briefly, the best 1/eta longer, …")
@click.option("--eta", type=click.IntRange(min=2), default=3, show_default=True, help="halving: keep 1/eta per rung")
@click.option("--min-epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="halving: epochs of the first rung")
@click.option("--prior", type=click.Choice(["rank"]), help="halving: start from rank's best 1/eta windows")
@click.option("--batch-runs", default="auto", show_default=True, callback=check_batch_runs,
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
@main.command()
@click.option("--cache", required=True)
@click.option("--range", "block_range", help="range LOW-HIGH of blocks to rank [default: cached layer to last block]")
@click.option("--width", "widths", default="1", show_default=True, callback=parse_widths,
              help="window widths, e.g. 1,2")
@click.option("--method", "methods", default="all", show_default=True,
              help="fisher (+ fisher_pp), fisher_pp, rgn, logme, knn, align, drop, comma-separated, or all; "
                   "the first orders")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="leave out the validation set a profile with this --val-fraction selects on")
@click.option("--samples", type=click.IntRange(min=2), default=256, show_default=True,
              help="training examples for the per-sample gradients")
@click.option("--examples", "limit", type=int, help="seeded class-balanced subset of N training examples (as train)")
@click.option("--labels", help="the cache's extra label set labels/NAME")
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
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


@main.command()
@click.option("--cache", required=True)
@click.option("--range", "block_range", help="LOW-HIGH: the windows lie inside it [default: cached layer to last "
                                               "block]")
@click.option("--width", "widths", default="1", show_default=True, callback=parse_widths,
              help="window widths, e.g. 1,2")
@click.option("--budget", type=click.FloatRange(0, 1, min_open=True), default=0.1, show_default=True,
              help="hard cap on the selection's compute, as a fraction of a full profile's")
@click.option("--val-fraction", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="class-balanced fraction of the training split the racing is judged on")
@click.option("--prior", type=click.Choice(["drop", "align"]), default="drop", show_default=True,
              help="the prior score that picks the candidates")
@click.option("--top", type=click.IntRange(min=1), default=2, show_default=True,
              help="candidates: the prior's best N, + the earliest and the latest window")
@click.option("--samples", type=click.IntRange(min=2), default=256, show_default=True,
              help="training examples for the prior's per-sample gradients")
@click.option("--epochs", type=click.IntRange(min=1), default=10, show_default=True, help="the winner's schedule")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-3, show_default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=0.01, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--examples", "limit", type=int, help="a seeded, class-balanced subset of N training examples")
@click.option("--labels", help="train on the cache's extra label set labels/NAME")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda")
@click.option("--out", required=True, help="task directory for the winner (as `train --out`)")
@click.option("--json", "as_json", is_flag=True)
@friendly
def select(cache, block_range, widths, budget, val_fraction, prior, top, samples, out, as_json, **kw) -> None:
    """Choose a window within a compute budget (a label-aware gradient prior, then racing on validation loss),
    finish training it and save it as a task."""
    from subcache.selection import SelectConfig, select_window

    config = SelectConfig(blocks=block_range, widths=widths, budget=budget, val_fraction=val_fraction, prior=prior,
                          top=top, samples=samples, train=train_config(**kw))
    result = select_window(cache, config, out=out, progress=not as_json)
    if as_json:
        emit_json(result.to_dict())
        return
    table = Table(title="select: candidates (prior score, racing)")
    for col in ("blocks", prior, "steps raced", "val loss"):
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


@main.command()
@click.option("--cache", required=True)
@click.option("--range", "block_range", help="candidate blocks LOW-HIGH [default: cached layer to last block]")
@click.option("--epsilon", type=float, default=0.01, show_default=True, help="stop when the gain is below this")
@click.option("--start", type=click.Choice(["empty", "full"]), default="empty", show_default=True)
@click.option("--consecutive", is_flag=True, help="keep the chosen set a window of consecutive blocks")
@click.option("--max-blocks", type=click.IntRange(min=1))
@click.option("--folds", type=click.IntRange(min=0), default=0, show_default=True,
              help="choose by k-fold CV on the training split (0: by test accuracy)")
@click.option("--val-fraction", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
              help="choose on this class-balanced fraction of the training split (0: by test accuracy)")
@train_options
@click.option("--seed", type=int, default=0, show_default=True, help="seed of every run")
@click.option("--out", required=True)
@click.option("--json", "as_json", is_flag=True)
@renamed("--blocks", "block_range", "--range")
@allows_factories
@friendly
def greedy(cache, block_range, epsilon, start, consecutive, max_blocks, folds, val_fraction, out, as_json,
           **kw) -> None:
    """Greedy block selection: keep adding the block that helps most until the gain is below ε."""
    from subcache.selection import GreedyConfig, greedy_select

    config = GreedyConfig(blocks=block_range, epsilon=epsilon, start=start, consecutive=consecutive,
                          max_blocks=max_blocks, folds=folds, train=train_config(**kw), val_fraction=val_fraction)
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


# -- score / al / labels ----------------------------------------------------------------------------------------
@main.command()
@click.option("--cache", required=True)
@click.option("--task", "task_dir", required=True)
@click.option("--split", default="train", show_default=True)
@click.option("--metric", type=click.Choice(["margin", "entropy", "least-confidence"]), default="margin",
              show_default=True)
@click.option("--top", type=click.IntRange(min=1), help="print the K most uncertain items")
@click.option("--exclude", "exclude_file", type=click.Path(dir_okay=False),
              help="file of ids to leave out (one per line, or a CSV with an id column)")
@click.option("--device", default="auto", show_default=True)
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


@main.command()
@click.option("--cache", required=True)
@click.option("--blocks", required=True)
@click.option("--budgets", required=True, help="labelled-set sizes per round, e.g. 100,500,1000")
@click.option("--strategy", default="margin", show_default=True,
              help="margin | entropy | least-confidence | random, or several: margin,random")
@click.option("--repeats", "seeds", type=click.IntRange(min=1), default=1, show_default=True,
              help="runs with seeds 0..K-1: initial labelled set and training (mean ± std)")
@click.option("--oracle", type=click.Path(dir_okay=False),
              help="CSV id,label filled in by a person; the run stops at each round with OUT/STRATEGY/to_label.csv")
@train_options(examples=False)
@click.option("--out", required=True)
@click.option("--json", "as_json", is_flag=True)
@renamed("--seeds", "seeds", "--repeats", type=click.IntRange(min=1))
@allows_factories
@friendly
def al(cache, blocks, budgets, strategy, seeds, oracle, out, as_json, **kw) -> None:
    """Pool-based active learning on one cache: retrain, score the pool, label the most uncertain, repeat."""
    try:
        budget_list = tuple(int(b) for b in budgets.split(","))
    except ValueError:
        raise click.BadParameter(f"{budgets!r} is not a comma-separated list of sizes",
                                 param_hint="--budgets") from None
    strategies = tuple(s.strip() for s in strategy.split(",") if s.strip())
    config = subcache.ALConfig(blocks=blocks, budgets=budget_list, strategy=strategies[0], seeds=seeds,
                               oracle=oracle, train=train_config(**kw))
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


@main.group()
def labels() -> None:
    """Extra label sets on a cache, so one cache serves several tasks."""


@labels.command("add")
@click.argument("cache")
@click.option("--name", required=True)
@click.option("--file", "file", required=True, help="CSV with columns id,label, every item of the split once")
@click.option("--split", default="train", show_default=True)
@friendly
def labels_add(cache, name, file, split) -> None:
    """Attach labels/NAME to a split of CACHE (use with --labels NAME in train and al)."""
    summary = subcache.add_labels(cache, name, file, split)
    console.print(f"added {summary['name']} to {split}: {summary['items']} items, {len(summary['classes'])} classes")


# -- predict ---------------------------------------------------------------------------------------------------
@main.command()
@click.option("--task", "tasks", multiple=True, required=True, help="task directory; repeat for several tasks")
@click.option("--data", required=True, help="a dataset spec (split --split), an unlabelled folder, or one image file")
@click.option("--split", help="the data's split [default: test; train for a folder of class folders, its one split]")
@click.option("--limit", type=click.IntRange(min=1), help="first N images")
@click.option("--batch-size", type=click.IntRange(min=1), default=128, show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="processes decoding photos [default: the cores, at most "
              "8, on CUDA; 0 on the CPU]; 0: threads of the main process")
@click.option("--device", default="auto", show_default=True)
@click.option("--out", help="write per-item predictions (CSV: id, key, label, then per task its class and _prob)")
@click.option("--show", type=click.IntRange(min=0), default=20, show_default=True, help="items to print")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--top", type=click.IntRange(min=1), default=1, show_default=True,
              help="the K most probable classes per item, with probabilities")
@click.option("--json", "as_json", is_flag=True, help="one JSON object: accuracy and every item's predictions")
@allows_factories
@friendly
def predict(tasks, data, split, limit, batch_size, workers, device, out, show, top, overwrite, as_json) -> None:
    """Run several tasks over a dataset at once: shared prefix once, each task forks at its first tuned block.
    Every item is named by its source key (its path under the folder given) and every class by its name."""
    if out:
        from subcache.task import check_output_file

        check_output_file(out, overwrite=overwrite)
    result = subcache.predict(tasks, data, split=split, limit=limit, batch_size=batch_size, device=device,
                              progress=True, workers=workers)
    if out:
        result.save(out)
    rows = result.rows(top)
    for reason in result.no_accuracy.values():
        click.echo(reason, err=True)
    if as_json:
        emit_json({"items": len(result.ids), "accuracy": result.accuracy, "tasks": list(result.preds),
                   "images_per_second": round(result.images_per_second, 1), "out": out, "predictions": rows})
        return
    table = Table(title=f"predictions on {data} ({result.split}, {len(result.ids)} images)")
    for col in ("key", "label", *result.preds):
        table.add_column(col)
    for row in rows[:show]:
        table.add_row(row["key"], row["label"], *(predicted(row, n, top) for n in result.preds))
    console.print(table)
    for name, acc in result.accuracy.items():
        console.print(f"{name}: accuracy {acc:.4f}")


def predicted(row: dict, name: str, top: int) -> str:
    """``Sneaker (0.65)``, or with --top K: ``Sneaker 0.65, Sandal 0.20, Ankle boot 0.10``."""
    if top == 1:
        return f"{row[name]} ({row[name + '_prob']:.2f})"
    return ", ".join(f"{c} {p:.2f}" for c, p in row[f"{name}_top"])


# -- export ----------------------------------------------------------------------------------------------------
@main.command()
@click.option("--task", "tasks", multiple=True, required=True, help="task directory; repeat for several tasks")
@click.option("--format", "fmt", type=click.Choice(["onnx", "pt2", "torchscript", "timm"]), required=True,
              help="onnx | pt2 | torchscript: the multi-task model; timm: one task as the plain model's state dict")
@click.option("--out", required=True, help="output file (.onnx, .pt2, .pt; .safetensors or .pth for timm)")
@click.option("--overwrite", is_flag=True, help="replace an existing output")
@click.option("--preprocess", is_flag=True,
              help="onnx | pt2 | torchscript: the model takes uint8 RGB images and scales and normalises them")
@click.option("--json", "as_json", is_flag=True, help="print the metadata written with the model")
@allows_factories
@friendly
def export(tasks, fmt, out, preprocess, overwrite, as_json) -> None:
    """Export tasks for deployment: one model, dynamic batch, preprocessing recorded in the file's metadata."""
    from subcache.export import export as export_tasks

    with stage(f"export {fmt} to {out}"):
        meta = export_tasks(tasks, fmt, out, preprocess=preprocess, overwrite=overwrite)
    if as_json:
        emit_json(meta)
    elif fmt == "timm":
        console.print(f"{out}: load it into {meta['model']} built with num_classes={meta['num_classes']} "
                      f"(strict=True)")
    else:
        console.print(f"{out}: input images (batch, 3, {meta['input']['shape'][-1]}, {meta['input']['shape'][-1]}) "
                      f"{meta['input']['dtype']}: {meta['input']['how']}; outputs {', '.join(meta['outputs'])}")


# -- bench -------------------------------------------------------------------------------------------------------
BENCHES = ("build", "train", "profile", "score", "multitask", "distributed", "select")


@main.command()
@click.argument("what", type=click.Choice(BENCHES))
@click.option("--model", default="efficientnet_lite0", show_default=True)
@click.option("--weights", default="imagenet", show_default=True)
@click.option("--data", default="fashion-mnist", show_default=True)
@click.option("--image-size", type=click.IntRange(min=8), default=64, show_default=True)
@click.option("--limit", type=click.IntRange(min=2), default=2000, show_default=True,
              help="first N images of the train split")
@click.option("--layer", default="13", show_default=True, help="cached layer")
@click.option("--blocks", default="13-16", show_default=True, help="tuned blocks (train), profiled range (profile)")
@click.option("--width", type=click.IntRange(min=1), default=1, show_default=True,
              help="window width (profile); widths 1..W (select)")
@click.option("--epochs", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=2), default=256, show_default=True)
@click.option("--device", default="auto", show_default=True)
@click.option("--workers", type=click.IntRange(min=0), help="processes decoding photos (build, score) "
              "[default: as build]")
@click.option("--decode", type=click.Choice(["cpu", "gpu"]), default="cpu", show_default=True, help="(build)")
@click.option("--repeats", type=click.IntRange(min=1), default=1, show_default=True, help="seeds per window (profile)")
@click.option("--batch-runs", default="auto", show_default=True, callback=check_batch_runs,
              help="auto | off | K: a window's repeats as one batched model (profile)")
@click.option("--compile", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
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


if __name__ == "__main__":
    main(sys.argv[1:])
