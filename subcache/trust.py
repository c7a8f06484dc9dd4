"""What code a file may make subcache run: none. A store's or task's attrs may name a model as
``package.module:factory``; subcache imports and calls it only when the user allows that exact name, by
``--allow-factory SPEC`` on the command line, `allow_factories` in Python, or the environment variable
``SUBCACHE_ALLOW_FACTORY`` (comma-separated specs). Naming it as ``--model`` for a build allows it too."""
from __future__ import annotations

import contextlib
import os
import re
from typing import Iterable, Iterator

from .errors import UntrustedCodeError

ENV = "SUBCACHE_ALLOW_FACTORY"
FACTORY = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*")
_allowed: list[str] = []


def allowed() -> set[str]:
    """The factories the user allowed: this process's `allow_factories` and ``$SUBCACHE_ALLOW_FACTORY``."""
    return set(_allowed) | {s.strip() for s in os.environ.get(ENV, "").split(",") if s.strip()}


@contextlib.contextmanager
def allow_factories(specs: Iterable[str]) -> Iterator[None]:
    """Within the block, records may name these factories and subcache will run them."""
    specs = [str(s) for s in specs]
    _allowed.extend(specs)
    try:
        yield
    finally:
        for s in specs:
            _allowed.remove(s)


def names_code(model: str) -> bool:
    """Whether building ``model`` would import or run code the name chooses: a ``package.module:factory``, or a
    timm name that timm resolves through a hub or a local folder (``timm:hf-hub:…``, ``timm:local-dir:…``)."""
    return bool(FACTORY.fullmatch(model)) and not model.startswith("timm:") or model.count(":") > 1


def check_record(model: str, source: str) -> None:
    """Refuse a model name read from a file (``source``) that would run code, unless the user allowed it."""
    if names_code(model) and model not in allowed():
        raise UntrustedCodeError(f"{source} names the model factory {model!r}; subcache never imports or runs code "
                                 f"a file names. If you trust that code, allow it: --allow-factory {model} (or "
                                 f"{ENV}={model})")
