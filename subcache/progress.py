"""Rich progress bars on stderr for every long loop (disabled in quiet/JSON mode and in tests)."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
from rich.text import Text

stderr = Console(stderr=True)


class RateColumn(ProgressColumn):
    """Items per second, e.g. ``391 img/s``."""

    def __init__(self, unit: str = "img/s"):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} {self.unit}" if speed else f"– {self.unit}", style="progress.data.speed")


def progress_bar(enabled: bool, unit: str = "img/s", console: Console | None = None) -> Progress:
    return Progress(TextColumn("[progress.description]{task.description}"), BarColumn(), MofNCompleteColumn(),
                    RateColumn(unit), TimeRemainingColumn(), console=console or stderr, disable=not enabled,
                    transient=False)
