"""Commands about caches: `blocks` (where to cache), `build` (make one), `info`, `verify`, `labels add`."""
from __future__ import annotations

import sys

import click
from rich.table import Table

import subcache
from subcache.build import BuildConfig
from subcache.data import default_split
from subcache.inputs import resizing
from subcache.labels import add_labels
from subcache.progress import stage

from .common import allows_factories, console, device_option, emit_json, fmt_int, friendly, is_main_process, option


# -- blocks ------------------------------------------------------------------------------------------------------
@click.command()
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
@click.command()
@option("--model", of=BuildConfig, help="see `subcache blocks`")
@option("--weights", of=BuildConfig, help="imagenet | torchvision enum | PATH | none")
@option("--data", of=BuildConfig,
        help="fashion-mnist | cifar10 | cifar100 | flowers102 | ImageFolder dir | file.npz")
@option("--split", "splits", multiple=True, of=BuildConfig)
@click.option("--limit", type=int, help="first N images of each split")
@click.option("--image-size", type=click.IntRange(min=8), help="pixels [default: the weights' native size]")
@click.option("--layer", "layers", multiple=True, required=True,
              help="first block to train (index or name); repeat for several caches in one pass")
@click.option("--from", "source_cache", help="derive from an existing cache instead of images")
@click.option("--out", required=True, help="store path (one layer) or folder of blockNN.zarr stores")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32", "int8"]),
              help="[default: float16; with --from, the source's] int8: symmetric per-channel codes, scales in x_scale")
@option("--codec", type=click.Choice(["auto", "zstd", "lz4", "none"]), of=BuildConfig,
        help="auto: zstd only where it saves ≥ 15 % over lz4 on the first chunk")
@click.option("--shard-mb", type=click.FloatRange(min=0, min_open=True),
              help="pack chunks into shards of about N MiB (fewer objects on object stores)")
@click.option("--flip-views", is_flag=True, help="also store exact activations of mirrored images")
@click.option("--corrupt", help="NAME:SEVERITY, a deterministic CIFAR-10-C style corruption, e.g. gaussian_noise:3")
@option("--batch-size", type=click.IntRange(min=1), of=BuildConfig)
@option("--chunk-mb", type=click.FloatRange(min=0, min_open=True), of=BuildConfig,
        help="target uncompressed chunk size in MiB")
@click.option("--workers", type=click.IntRange(min=0), help="processes decoding photos [default: the cores, at most "
              "8, on CUDA; 0 on the CPU]; 0: threads of the main process. The store's bits do not depend on it")
@option("--decode", type=click.Choice(["cpu", "gpu"]), of=BuildConfig,
        help="gpu: decode JPEGs in batches on CUDA (nvjpeg); other pixels than cpu (Pillow), so recorded")
@device_option
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
@click.command()
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


@click.command()
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


@click.group()
def labels() -> None:
    """Extra label sets on a cache, so one cache serves several tasks."""


@labels.command("add")
@click.argument("cache")
@click.option("--name", required=True)
@click.option("--file", "file", required=True, help="CSV with columns id,label, every item of the split once")
@option("--split", of=add_labels)
@friendly
def labels_add(cache, name, file, split) -> None:
    """Attach labels/NAME to a split of CACHE (use with --labels NAME in train and al)."""
    summary = subcache.add_labels(cache, name, file, split)
    console.print(f"added {summary['name']} to {split}: {summary['items']} items, {len(summary['classes'])} classes")
