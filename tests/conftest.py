"""Shared fixtures: node homes, the CLI as a subprocess, and real FUSE mounts.

FUSE may be missing on a contributor's laptop: tests marked ``fuse`` skip there
with the reason. In CI (``CI=true``) FUSE exists, so a skipped FUSE test fails
the run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import mounted, run_cli


def fuse_unavailable() -> str | None:
    if not os.path.exists("/dev/fuse"):
        return "/dev/fuse is missing"
    if shutil.which("fusermount3") is None:
        return "fusermount3 is not installed (Debian package fuse3)"
    if os.geteuid() != 0 and not os.access("/dev/fuse", os.R_OK | os.W_OK):
        return "/dev/fuse is not accessible"
    return None


_skipped_fuse: list[str] = []


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fuse") is not None:
        reason = fuse_unavailable()
        if reason:
            pytest.skip(f"FUSE test: {reason}")
    if item.get_closest_marker("slow") is not None and not os.environ.get("P2PFS_SLOW"):
        pytest.skip("slow soak test: set P2PFS_SLOW=1")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and "fuse" in report.keywords:
        _skipped_fuse.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") and _skipped_fuse:
        print(f"\nCI: {len(_skipped_fuse)} FUSE test(s) were skipped; failing the run:")
        for nodeid in _skipped_fuse:
            print(f"  {nodeid}")
        session.exitstatus = 1


@pytest.fixture
def home(tmp_path: Path) -> Path:
    h = tmp_path / "home"
    run_cli(h, "init", check=True)
    return h


@pytest.fixture
def mount(tmp_path: Path, home: Path) -> Iterator[Path]:
    with mounted(home, tmp_path / "mnt") as mp:
        yield mp
