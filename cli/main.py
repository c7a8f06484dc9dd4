"""`subcache` commands. Each parses options, calls the library, and renders; the library raises, only the CLI
turns errors into one clean line and a non-zero exit. The commands live in one module per area (`cache`,
`training`, `selection`, `deploy`, `bench`); this is the group that holds them."""
from __future__ import annotations

import sys

import click

import subcache

from . import bench as _bench
from . import cache as _cache
from . import deploy as _deploy
from . import selection as _selection
from . import training as _training


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(subcache.__version__, prog_name="subcache")
def main() -> None:
    """SubTuning from a cache: run the frozen prefix once, train chosen blocks + a head from its activations."""


for _command in (_cache.blocks, _cache.build, _cache.info, _cache.verify, _training.train, _training.evaluate,
                 _selection.profile, _selection.rank, _selection.select, _selection.greedy, _training.score,
                 _training.al, _cache.labels, _deploy.predict, _deploy.export, _bench.bench):
    main.add_command(_command)


if __name__ == "__main__":
    main(sys.argv[1:])
