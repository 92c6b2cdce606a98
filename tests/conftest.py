"""Shared fixtures: node homes, the CLI as a subprocess, and real FUSE mounts.

Every test names its tier with a marker: ``unit`` (no mount, no namespaces, no
root: ``pytest -m unit`` runs anywhere), ``mount`` (real FUSE mounts), ``lab``
(hosts in network namespaces) or ``vm`` (the appliance under QEMU). FUSE or the
lab may be missing on a contributor's laptop: those tests skip there with the
reason. In CI (``CI=true``) they exist, so a skipped mount, lab or vm test fails
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


TIERS = ("unit", "mount", "lab", "vm")
MUST_RUN_IN_CI = {"mount", "lab", "vm", "fuse"}
_skipped_fuse: list[str] = []


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    untiered = []
    for item in items:
        tiers = {m.name for m in item.iter_markers() if m.name in TIERS}
        if len(tiers) != 1:
            untiered.append(f"{item.nodeid}: {sorted(tiers) or 'no tier'}")
    if untiered:
        raise pytest.UsageError(
            "every test is marked with exactly one tier of "
            + ", ".join(TIERS)
            + ":\n  "
            + "\n  ".join(untiered)
        )


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("fuse") is not None or item.get_closest_marker("mount"):
        reason = fuse_unavailable()
        if reason:
            pytest.skip(f"FUSE test: {reason}")
    if item.get_closest_marker("slow") is not None and not os.environ.get("P2PFS_SLOW"):
        pytest.skip("slow soak test: set P2PFS_SLOW=1")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.skipped and MUST_RUN_IN_CI & set(report.keywords):
        _skipped_fuse.append(report.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if os.environ.get("CI") and _skipped_fuse:
        print(f"\nCI: {len(_skipped_fuse)} mount, lab or vm test(s) were skipped; failing the run:")
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
