"""What every command shares: errors as one line, JSON on stdout and tables on stderr, options declared once with
their defaults taken from the library's config dataclasses (or function signatures)."""
from __future__ import annotations

import dataclasses
import functools
import inspect
import json
import os

import click
from rich.console import Console

import subcache
from subcache.config import TrainConfig
from subcache.errors import SubcacheError

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




def default_of(owner, name: str):
    """The default of ``name`` where the library declares it: a config dataclass's field, or a function's
    parameter. Options take their defaults from here, so each default is written once."""
    if dataclasses.is_dataclass(owner):
        f = owner.__dataclass_fields__[name]
        return f.default if f.default is not dataclasses.MISSING else f.default_factory()
    return inspect.signature(owner).parameters[name].default


def option(*decls: str, of=None, **kw):
    """`click.option`; with ``of`` (a config dataclass or a library function), its default is the field or
    parameter of the option's own name there, shown in ``--help``."""
    if of is not None:
        name = next((d for d in decls if not d.startswith("-")), decls[0].split("/")[0].lstrip("-").replace("-", "_"))
        kw["default"] = default_of(of, name)
        kw.setdefault("show_default", kw["default"] is not None)
    return click.option(*decls, **kw)


device_option = option("--device", of=TrainConfig, help="auto | cpu | cuda")


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
        option("--epochs", type=click.IntRange(min=1), of=TrainConfig),
        option("--lr", type=click.FloatRange(min=0, min_open=True), of=TrainConfig),
        option("--weight-decay", type=click.FloatRange(min=0), of=TrainConfig),
        option("--batch-size", type=click.IntRange(min=2), of=TrainConfig),
        option("--augment", of=TrainConfig, help="flip, crop, flip,crop or none"),
        *([click.option("--examples", "limit", type=int, help="a seeded, class-balanced subset of N training "
                                                             "examples [default: all]")] if examples else []),
        device_option,
        option("--loader", type=click.Choice(["auto", "memory", "stream"]), of=TrainConfig,
               help="resident on the device, or streamed by chunks"),
        click.option("--labels", help="train on the cache's extra label set labels/NAME"),
        option("--precision", type=click.Choice(["fp32", "bf16"]), of=TrainConfig,
               help="bf16: autocast over the trainable part (measured slower than fp32 for Lite0 on an H200)"),
        option("--channels-last/--no-channels-last", of=TrainConfig,
               help="channels_last memory format [default: on CUDA only]"),
        option("--fused/--no-fused", of=TrainConfig, help="fused AdamW kernel [default: on CUDA only]"),
        option("--compile", type=click.Choice(["auto", "on", "off"]), of=TrainConfig,
               help="the training step through torch.compile (CUDA graphs on CUDA); auto: only where "
                    "measured to pay (so far nowhere: off)"),
    ]):
        fn = decorator(fn)
    return fn


def train_config(**kw) -> "subcache.TrainConfig":
    return subcache.TrainConfig(**{k: v for k, v in kw.items() if k in subcache.TrainConfig.__dataclass_fields__})


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


def window_options(fn):
    """``--range LOW-HIGH`` and ``--width W[,W…]``: where the windows lie and how wide they are (profile, rank,
    select)."""
    fn = click.option("--width", "widths", default="1", show_default=True, callback=parse_widths,
                      help="window widths, e.g. 1,2,3")(fn)
    return click.option("--range", "block_range", help="LOW-HIGH: the windows lie inside it [default: the cached "
                                                         "layer to the last block]")(fn)
