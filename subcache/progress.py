"""Progress on stderr for every long loop (the library default is off; the CLI turns it on, --json or not).

On a terminal: rich bars. Anywhere else (a log file, a pipe, a batch scheduler): plain lines, each flushed at once —
every ``every`` of the total (10 % by default), one per step when ``every=0``, or only the lines a loop writes
itself with ``line()`` (``every=None``; training writes one per epoch).
"""
from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

stderr = Console(stderr=True)


def warn(text: str) -> None:
    """One line on stderr (a note or a warning), flushed at once, whatever the progress settings."""
    print(text, file=sys.stderr, flush=True)


def rate_text(per_second: float | None, unit: str = "img/s") -> str:
    """``1,234 img/s``, ``2.5 runs/s``, or for slow work the time per item: ``14 s/run``, ``3.2 min/run``."""
    if not per_second or per_second <= 0:
        return f"– {unit}"
    if per_second >= 10:
        return f"{per_second:,.0f} {unit}"
    if per_second >= 1:
        return f"{per_second:.1f} {unit}"
    item = unit.removesuffix("/s")
    item = item[:-1] if item.endswith("s") and len(item) > 3 else item  # runs → run; keeps img
    seconds = 1 / per_second
    return f"{seconds:.1f} s/{item}" if seconds < 120 else f"{seconds / 60:.1f} min/{item}"


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``391 img/s``, or seconds per item when slower than one a second."""

    def __init__(self, unit: str = "img/s"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        return Text(rate_text(task.finished_speed or task.speed, self.unit), style="progress.data.speed")


class BarProgress(Progress):
    """A rich bar that accepts the plain-line API too (notes and lines are the log's business, not the bar's)."""

    def advance(self, task_id, advance: float = 1, note: str = "") -> None:
        super().advance(task_id, advance)

    def line(self, text: str) -> None:
        """A line for logs; the bar already shows it."""


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float
    start_completed: float
    started: float = field(default_factory=time.perf_counter)
    printed: float = -1.0  # the completed count of the last line


class LineProgress:
    """The same calls as a rich ``Progress`` (add_task, advance, update), written as plain flushed lines."""

    def __init__(self, enabled: bool, unit: str = "img/s", every: float | None = 0.1, console: Console = stderr):
        self.enabled, self.unit, self.every, self.console = enabled, unit, every, console
        self.tasks: dict[int, _Task] = {}

    def __enter__(self) -> "LineProgress":
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None and self.every is not None:
            for t in self.tasks.values():
                if t.completed != t.printed and t.completed > t.start_completed:
                    self._write(t, "")

    def add_task(self, description: str, total: float | None = None, completed: float = 0, **_) -> int:
        self.tasks[len(self.tasks)] = _Task(description, total, completed, completed)
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1, note: str = "") -> None:
        self.update(task_id, advance=advance, note=note)

    def update(self, task_id: int, *, advance: float = 0, completed: float | None = None, note: str = "",
               **_) -> None:
        t = self.tasks[task_id]
        t.completed = t.completed + advance if completed is None else completed
        if self.every is not None and self._due(t):
            self._write(t, note)

    def line(self, text: str) -> None:
        if self.enabled:
            print(text, file=self.console.file, flush=True)

    def _due(self, t: _Task) -> bool:
        if not self.every or not t.total:
            return True
        step = self.every * t.total
        return int(t.completed / step) > int(max(t.printed, t.start_completed) / step) or t.completed >= t.total

    def _write(self, t: _Task, note: str) -> None:
        t.printed = t.completed
        elapsed = time.perf_counter() - t.started
        rate = (t.completed - t.start_completed) / elapsed if elapsed > 0 else None
        done = f"{t.completed:,.0f}/{t.total:,.0f} ({t.completed / t.total:.0%})" if t.total else f"{t.completed:,.0f}"
        self.line(" ".join(filter(None, [t.description, done, note, rate_text(rate, self.unit)])))


def progress_bar(enabled: bool, unit: str = "img/s", console: Console | None = None, *,
                 every: float | None = 0.1) -> BarProgress | LineProgress:
    """A rich bar when ``console`` (stderr) is a terminal, plain lines otherwise; nothing when not ``enabled``."""
    console = console or stderr
    if enabled and not console.is_terminal:
        return LineProgress(enabled, unit, every, console)
    return BarProgress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       RateColumn(unit), TimeRemainingColumn(), console=console, disable=not enabled,
                       transient=False)


def epoch_line(row: dict, epochs: int, samples_per_second: float) -> str:
    """``epoch 3/10 loss 0.4123 acc 0.8512 val 0.8400 test 0.8390 12,345 samples/s`` (val with validation
    monitoring, test only when evaluated that epoch)."""
    test = "".join(f" {name} {row[key]:.4f}" for name, key in (("val", "val_accuracy"), ("test", "test_accuracy"))
                   if row.get(key) is not None)
    return (f"epoch {row['epoch']}/{epochs} loss {row['loss']:.4f} acc {row['train_accuracy']:.4f}{test} "
            f"{rate_text(samples_per_second, 'samples/s')}")


@contextlib.contextmanager
def stage(text: str, enabled: bool = True, console: Console | None = None, after: float = 2.0):
    """One step of unknown length (an export, a model load): a spinner on a terminal; in logs a line once it has run
    for ``after`` seconds (so a quick failure prints only its error) and one with its time when it ends
    (``export onnx done in 12.3 s``)."""
    console = console or stderr
    start = time.perf_counter()
    if not enabled:
        yield
    elif console.is_terminal:
        with console.status(text):
            yield
        console.print(f"{text} done in {time.perf_counter() - start:.1f} s")
    else:
        file = console.file
        timer = threading.Timer(after, lambda: print(f"{text} …", file=file, flush=True))
        timer.daemon = True
        timer.start()
        try:
            yield
        finally:
            timer.cancel()
        print(f"{text} done in {time.perf_counter() - start:.1f} s", file=file, flush=True)
