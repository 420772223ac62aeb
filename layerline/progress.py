"""Progress bars for long work (building, hashing, downloading, loading), on stderr."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

console = Console(stderr=True)


@contextmanager
def byte_progress(label: str, total: int, *, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A bar over `total` bytes; yields a function that advances it."""
    if quiet:
        yield lambda n: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
               TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n: progress.advance(task, n)


@contextmanager
def step_progress(label: str, total: int, *, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A bar over `total` items (layers, files); yields a function that advances it."""
    if quiet:
        yield lambda n=1: None
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(label, total=total)
        yield lambda n=1: progress.advance(task, n)
