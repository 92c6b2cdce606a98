"""Helpers shared by the benchmarks: temp dirs, timing, the CLI, page-cache control."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(os.environ.get("P2PFS_BENCH_DIR", "/var/tmp"))


def workdir(prefix: str) -> tempfile.TemporaryDirectory[str]:
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    return tempfile.TemporaryDirectory(prefix=f"p2pfs-{prefix}-", dir=BENCH_DIR)


def best_of(n: int, fn: Callable[[], object]) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def p2pfs(home: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "p2pfs", "--home", str(home), *args], capture_output=True, text=True
    )
    if proc.returncode != 0:
        raise SystemExit(f"p2pfs {' '.join(args)} failed: {proc.stderr}")
    return proc.stdout


def drop_caches() -> bool:
    """Empty the kernel's page cache (root only), so a read comes from storage."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


@dataclass(frozen=True)
class Row:
    """One measured goal, for the summary ``make bench`` prints at its end."""

    label: str
    measured: str
    goal: str
    met: bool


ROWS: list[Row] = []


def ratio_line(
    label: str, value: float, reference: float, unit: str, goal: float | None = None
) -> str:
    r = value / reference if reference else float("nan")
    g = f" (goal >= {goal:.2f}: {'met' if r >= goal else 'MISSED'})" if goal is not None else ""
    if goal is not None:
        ROWS.append(
            Row(
                label,
                f"{value:.3g} vs {reference:.3g} {unit} = {r:.2f}",
                f">= {goal:.2f}",
                r >= goal,
            )
        )
    return f"  {label}: {value:.3f} {unit}, ratio {r:.2f}{g}"


def unmeasured_line(label: str, goal: str, why: str) -> str:
    """A goal this run could not measure: in the summary as missed, not left out."""
    ROWS.append(Row(label, f"not measured: {why}", goal, False))
    return f"  {label}: not measured ({why})"


def ceiling_line(label: str, value: float, unit: str, most: float) -> str:
    """A measure with an upper bound (memory): recorded for the summary like a ratio."""
    met = value <= most
    ROWS.append(Row(label, f"{value:.0f} {unit}", f"<= {most:g} {unit}", met))
    return f"  {label}: {value:.0f} {unit} (goal <= {most:g} {unit}: {'met' if met else 'MISSED'})"
