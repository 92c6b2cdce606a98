"""Progress bars on a terminal (``rich``, imported here only, and only when a bar shows)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator


@contextlib.contextmanager
def import_bar(enabled: bool, total: int) -> Iterator[Callable[[int, int], None] | None]:
    """An import's bar: yields ``advance(files, bytes)``, or None when not shown."""
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    files = 0
    with Progress(
        TextColumn("[bold]importing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[files]} files"),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("import", total=total or None, files=0)

        def advance(nfiles: int, nbytes: int) -> None:
            nonlocal files
            files += nfiles
            bar.update(task, advance=nbytes, files=files)

        yield advance


@contextlib.contextmanager
def transfer_bar(enabled: bool, description: str) -> Iterator[Callable[[int, int], None]]:
    """A bar for bytes on their way (a pin): yields ``update(total, done)``; a no-op
    when not shown."""
    if not enabled:
        yield lambda total, done: None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with Progress(
        "{task.description}",
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=None)

        def update(total: int, done: int) -> None:
            progress.update(task, total=total or None, completed=done)

        yield update
