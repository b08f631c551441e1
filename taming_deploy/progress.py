"""Progress bars for long loops, on stderr (stdout stays clean for scripts): shown when stderr is an
interactive terminal, silent otherwise."""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeRemainingColumn
from rich.text import Text


class RateColumn(ProgressColumn):
    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        return Text(f"{task.speed:,.1f} {self.unit}/s" if task.speed else f"- {self.unit}/s")


class CountColumn(ProgressColumn):
    """``done/total``; nothing until the total is known (rich's own column shows ``0/?``)."""

    def render(self, task: Task) -> Text:
        return Text("" if task.total is None else f"{int(task.completed)}/{int(task.total)}")


ProgressCallback = Callable[..., None]  # (done, total, info="")


@contextlib.contextmanager
def progress_bar(description: str, unit: str, enabled: bool | None = None) -> Iterator[ProgressCallback]:
    """Yield ``update(done, total, info="")``; draws a bar with rate, ETA and ``info`` (e.g. the loss)
    on stderr when it is a terminal (or ``enabled``)."""
    if enabled is None:
        enabled = sys.stderr.isatty()
    if not enabled:
        yield lambda done, total, info="": None
        return
    columns = (
        TextColumn("{task.description}"), BarColumn(), CountColumn(), RateColumn(unit), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
    )
    with Progress(*columns, transient=False, console=Console(stderr=True)) as progress:
        task = progress.add_task(description, total=None, info="")
        yield lambda done, total, info="": progress.update(task, completed=done, total=total, info=info)
