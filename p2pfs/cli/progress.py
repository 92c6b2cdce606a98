"""Progress on a terminal: bars (``rich``, imported here only, and only when a bar shows)
and the status line of a long operation of the daemon."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any

from p2pfs.sizes import format_size


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


@contextlib.contextmanager
def op_status(enabled: bool, label: str) -> Iterator[Callable[[dict[str, Any]], None] | None]:
    """One status line on stderr for a long operation of the daemon (commit, scrub, ...):
    yields the handler of its progress lines, or None when not shown. The line is
    rewritten in place and cleared at the end, so nothing of it stays in the output."""
    if not enabled:
        yield None
        return
    shown = False

    def show(progress: dict[str, Any]) -> None:
        nonlocal shown
        sys.stderr.write("\r\x1b[K" + describe_progress(label, progress))
        sys.stderr.flush()
        shown = True

    try:
        yield show
    finally:
        if shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


def describe_progress(label: str, p: dict[str, Any]) -> str:
    """``commit tools: chunking, 3 files staged (12.0 MiB), 41 s`` from a progress line."""
    parts = [str(p.get("stage") or "running")]
    if isinstance(p.get("total"), int) and p["total"]:
        parts[0] += f" {p.get('done', 0)}/{p['total']} {p.get('unit', '')}".rstrip()
    if p.get("staged_files"):
        size = format_size(int(p.get("staged_bytes") or 0))
        parts.append(f"{p['staged_files']} files staged ({size})")
    if isinstance(p.get("elapsed_s"), int | float):
        parts.append(f"{p['elapsed_s']:.0f} s")
    return f"{label}: {', '.join(parts)}"
