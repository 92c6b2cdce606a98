"""The publisher killed with SIGKILL mid-write and mid-commit loses nothing it promised.

Promises: every byte whose fsync returned, every snapshot whose commit returned.
Each test kills the real daemon (``kill -9``) through the real mount, clears the
stale mount, mounts again and checks the bytes, the snapshots and ``fsck``.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from harness import force_unmount, run_cli

from p2pfs.node import control

pytestmark = [pytest.mark.mount, pytest.mark.fuse]
MIB = 1024 * 1024


def _daemon_pid(home: Path) -> int:
    return int((home / "run" / "daemon.pid").read_text().strip())


def _kill9(home: Path, mnt: Path) -> None:
    pid = _daemon_pid(home)
    os.kill(pid, signal.SIGKILL)
    for _ in range(200):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.02)
    subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def _mount(home: Path, mnt: Path) -> None:
    run_cli(home, "mount", str(mnt), check=True, timeout=120)


def _fsck_clean(home: Path) -> None:
    r = json.loads(run_cli(home, "fsck", "--json", check=True).stdout)
    assert r["clean"], r


def _settle_off(home: Path) -> None:
    (home / "config.toml").write_text("[publish]\nsettle_s = 0\n")


@pytest.fixture
def volume(home: Path, tmp_path: Path) -> tuple[Path, Path]:
    run_cli(home, "volume", "create", "tools", check=True)
    _settle_off(home)  # commits happen when the test says so
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return home, mnt


def test_kill_during_writes_keeps_every_fsynced_byte(volume: tuple[Path, Path]) -> None:
    home, mnt = volume
    _mount(home, mnt)
    try:
        rng = random.Random(5)
        synced = rng.randbytes(24 * MIB)
        # A writer in another process: writes, fsyncs, then keeps writing (unsynced)
        # until the daemon dies under it.
        script = f"""
import os, sys
fd = os.open({str(mnt / "tools" / "log.bin")!r}, os.O_CREAT | os.O_WRONLY, 0o644)
data = open({str(mnt.parent / "synced.bin")!r}, "rb").read()
for i in range(0, len(data), 1 << 20):
    os.write(fd, data[i : i + (1 << 20)])
os.fsync(fd)
sys.stdout.write("synced\\n"); sys.stdout.flush()
try:
    while True:
        os.write(fd, b"u" * (1 << 20))
except OSError:
    pass
"""
        (mnt.parent / "synced.bin").write_bytes(synced)
        # A second file, synced and closed; and a directory made and fsynced.
        with open(mnt / "tools" / "closed.txt", "wb") as f:
            f.write(b"closed and synced\n")
            f.flush()
            os.fsync(f.fileno())
        (mnt / "tools" / "dir").mkdir()
        dfd = os.open(mnt / "tools" / "dir", os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
        with subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        ) as writer:
            assert writer.stdout is not None
            line = writer.stdout.readline()
            assert line == b"synced\n", writer.stderr.read() if writer.stderr else ""
            time.sleep(0.3)  # some unsynced writes go on
            _kill9(home, mnt)
            writer.communicate(timeout=30)
        _mount(home, mnt)
        data = (mnt / "tools" / "log.bin").read_bytes()
        assert data[: len(synced)] == synced
        assert set(data[len(synced) :]) <= {ord("u")}  # what followed is whole or absent
        assert (mnt / "tools" / "closed.txt").read_bytes() == b"closed and synced\n"
        assert (mnt / "tools" / "dir").is_dir()
        # The crash's leftovers commit like anything else.
        r = json.loads(run_cli(home, "commit", "tools", "--json", check=True).stdout)
        assert r["changed"] and r["seq"] == 1
        snap = mnt / "tools" / ".snapshots" / "1"
        assert (snap / "log.bin").read_bytes()[: len(synced)] == synced
    finally:
        force_unmount(mnt, home)
    _fsck_clean(home)


def _tree_digest(root: Path) -> dict[str, str]:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != ".snapshots"]
        for name in filenames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def test_kill_during_commits_leaves_a_whole_snapshot(volume: tuple[Path, Path]) -> None:
    home, mnt = volume
    rng = random.Random(11)
    _mount(home, mnt)
    try:
        (mnt / "tools" / "base.txt").write_text("committed before any crash\n")
        first = json.loads(run_cli(home, "commit", "tools", "--json", check=True).stdout)
        assert first["seq"] == 1
        committed = {1: _tree_digest(mnt / "tools")}
        for round_ in range(4):
            # A change big enough that the commit takes a while: a large file still
            # staged (written, closed, not yet absorbed) and many small ones.
            big = mnt / "tools" / f"big-{round_}.bin"
            with open(big, "wb") as f:
                for _ in range(48):
                    f.write(rng.randbytes(MIB))
            d = mnt / "tools" / f"small-{round_}"
            d.mkdir()
            for i in range(300):
                (d / f"f{i}").write_bytes(rng.randbytes(rng.randint(0, 4000)))
            expected = _tree_digest(mnt / "tools")
            with subprocess.Popen(
                [sys.executable, "-m", "p2pfs", "--home", str(home), "commit", "tools", "--json"],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            ) as commit:
                time.sleep(rng.uniform(0.0, 0.8))
                _kill9(home, mnt)
                out, _ = commit.communicate(timeout=60)
            if commit.returncode == 0:
                done = json.loads(out)
                committed[done["seq"]] = expected
            _mount(home, mnt)
            # Everything written is there, whatever the commit got to.
            assert _tree_digest(mnt / "tools") == expected
            status = json.loads(run_cli(home, "status", "--json", check=True).stdout)
            seq = status["volumes"][0]["seq"]
            assert seq >= max(committed)  # a commit that returned is never lost
            # Every snapshot that exists is whole: readable and as it was written.
            for s in range(1, seq + 1):
                snap = _tree_digest(mnt / "tools" / ".snapshots" / str(s))
                if s in committed:
                    assert snap == committed[s]
            if seq not in committed:  # the head moved just before the kill
                assert _tree_digest(mnt / "tools" / ".snapshots" / str(seq)) == expected
                committed[seq] = expected
            log = json.loads(run_cli(home, "log", "tools", "--json", check=True).stdout)
            assert [e["seq"] for e in log] == list(range(seq, 0, -1))
            assert all(e["available"] for e in log)
        final = json.loads(run_cli(home, "commit", "tools", "--json", check=True).stdout)
        assert _tree_digest(mnt / "tools" / ".snapshots" / str(final["seq"])) == expected
    finally:
        force_unmount(mnt, home)
    _fsck_clean(home)


def _daemon(home: Path, mnt: Path, *extra: str) -> subprocess.Popen[bytes]:
    """A foreground daemon (for --debug-faults, which `mount` does not pass on)."""
    log = open(home / "log" / "crash-daemon.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [sys.executable, "-m", "p2pfs", "--home", str(home), "daemon", "--mount", str(mnt), *extra],
        stdout=log,
        stderr=log,
    )
    log.close()
    for _ in range(1200):
        if os.path.ismount(mnt):
            return proc
        assert proc.poll() is None, (home / "log" / "crash-daemon.log").read_text()[-3000:]
        time.sleep(0.05)
    raise AssertionError("the daemon did not mount")


def test_kill_while_a_commit_has_stored_its_trees_but_not_moved_the_head(
    volume: tuple[Path, Path],
) -> None:
    """The one window a commit has: everything stored, the head not yet moved. A fault
    holds the commit exactly there; kill -9; the old head stands, nothing is lost, and
    the next commit makes the snapshot."""
    home, mnt = volume
    (home / "log").mkdir(exist_ok=True)
    proc = _daemon(home, mnt, "--debug-faults")
    try:
        (mnt / "tools" / "one.txt").write_text("in snapshot 1\n")
        assert json.loads(run_cli(home, "commit", "tools", "--json", check=True).stdout)["seq"] == 1
        (mnt / "tools" / "two.txt").write_text("written for snapshot 2\n")
        (mnt / "tools" / "one.txt").write_text("changed for snapshot 2\n")
        sock = home / "run" / "control.sock"
        control.call(sock, "inject-fault", handler="publish:stall-before-head")
        with subprocess.Popen(
            [sys.executable, "-m", "p2pfs", "--home", str(home), "commit", "tools"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        ) as commit:

            def stalled() -> bool:
                st = json.loads(run_cli(home, "status", "--json", check=True).stdout)
                return st["volumes"][0]["live"]["committing"] == "stalled before the head moved"

            for _ in range(600):
                if stalled():
                    break
                time.sleep(0.05)
            else:
                raise AssertionError("the commit never reached the stall")
            proc.kill()
            proc.wait()
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
            commit.communicate(timeout=60)
            assert commit.returncode != 0  # it never answered
        _mount(home, mnt)
        status = json.loads(run_cli(home, "status", "--json", check=True).stdout)
        assert status["volumes"][0]["seq"] == 1  # the old head stands
        snap1 = mnt / "tools" / ".snapshots" / "1"
        assert sorted(os.listdir(snap1)) == ["one.txt"]
        assert (snap1 / "one.txt").read_text() == "in snapshot 1\n"
        assert (mnt / "tools" / "one.txt").read_text() == "changed for snapshot 2\n"
        assert (mnt / "tools" / "two.txt").read_text() == "written for snapshot 2\n"
        done = json.loads(run_cli(home, "commit", "tools", "--json", check=True).stdout)
        assert done["changed"] and done["seq"] == 2
        snap2 = mnt / "tools" / ".snapshots" / "2"
        assert (snap2 / "one.txt").read_text() == "changed for snapshot 2\n"
        assert (snap2 / "two.txt").read_text() == "written for snapshot 2\n"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        force_unmount(mnt, home)
    _fsck_clean(home)
