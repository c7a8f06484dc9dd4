"""Fault injection for the kill-and-resume trials: ``SUBCACHE_FAULT=POINT[:N]`` ends the process abruptly
(``os._exit``, no cleanup, like a kill) the N-th time (default 1st) execution passes ``fault(POINT)``.

Points: ``store-created`` (a store's metadata half written), ``unit-written`` (after a unit's chunks are on
disk), ``before-finish`` (every unit written, nothing marked complete), ``labels-created`` (a label set created,
its values not written), ``task-weights`` (a task's new weights renamed into place, its task.json not yet), ``before-rename`` (an
output file's temp copy written and flushed, not yet renamed into place).
"""
from __future__ import annotations

import os
from collections import Counter

KILLED_EXIT = 86
_passes: Counter = Counter()


def fault(point: str) -> None:
    spec = os.environ.get("SUBCACHE_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != point:
        return
    _passes[point] += 1
    if _passes[point] == int(nth or 1):
        os._exit(KILLED_EXIT)
