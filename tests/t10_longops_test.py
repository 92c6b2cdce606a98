"""Long operations run to their end, show progress, and a broken control connection says so.

Real daemons (foreground, ``--debug-faults``), the real control socket, the CLI as a
subprocess. ``inject-fault control:stall:OP seconds=N`` makes an operation take N
seconds longer, and ``P2PFS_CONTROL_DEADLINE_S`` shrinks the short operations'
deadline from 30 s to 1 s, so "longer than the deadline" takes seconds, not minutes.
The CLI's stderr is a pseudo-terminal where progress must show.
"""

from __future__ import annotations

import contextlib
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import force_unmount, run_cli

from p2pfs.errors import EXIT_CONNECTION, EXIT_INTERRUPTED, NotRunning, P2pfsError
from p2pfs.node import control

# The daemon's deadline for short operations here (documented name: docs/cli.md).
DEADLINE_ENV, SHORT_DEADLINE = "P2PFS_CONTROL_DEADLINE_S", "1"
WAIT = 60.0  # the bound of every "within" below; none is a measurement


def _sock(home: Path) -> Path:
    return home / "run" / "control.sock"


def _daemon_log(home: Path) -> str:
    return (home / "log" / "daemon.log").read_text()


@contextlib.contextmanager
def _daemon(home: Path, mnt: Path | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """A foreground daemon (``mount`` passes no --debug-faults) logging where ``mount``
    would, with the short deadline shrunk; killed and unmounted at the end."""
    (home / "log").mkdir(exist_ok=True)
    logf = open(home / "log" / "daemon.log", "ab")  # noqa: SIM115
    cmd = [sys.executable, "-m", "p2pfs", "--home", str(home), "daemon", "--debug-faults"]
    cmd += ["--mount", str(mnt)] if mnt is not None else []
    env = {**os.environ, DEADLINE_ENV: SHORT_DEADLINE}
    proc = subprocess.Popen(cmd, stdout=logf, stderr=logf, env=env)
    logf.close()
    try:
        deadline = time.monotonic() + WAIT
        while True:
            assert proc.poll() is None, _daemon_log(home)[-3000:]
            assert time.monotonic() < deadline, "the daemon did not come up"
            with contextlib.suppress(NotRunning):
                control.call(_sock(home), "status", timeout=5)
                if mnt is None or os.path.ismount(mnt):
                    break
            time.sleep(0.05)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if mnt is not None:
            force_unmount(mnt, home)


def _stall(home: Path, op: str, seconds: float) -> None:
    control.call(_sock(home), "inject-fault", handler=f"control:stall:{op}", seconds=seconds)


class Terminal:
    """The CLI with its stderr on a pseudo-terminal (where progress shows), stdout a pipe."""

    def __init__(self, home: Path, *args: str) -> None:
        master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "p2pfs", "--home", str(home), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=slave,
        )
        os.close(slave)
        self.master = master
        self.seen = ""

    def _read(self, timeout: float) -> bool:
        """Read what the terminal shows; False once the CLI has closed it."""
        if not select.select([self.master], [], [], timeout)[0]:
            return True
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: every writer of the terminal has gone
            return False
        self.seen += data.decode(errors="replace")
        return bool(data)

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + WAIT
        while text not in self.seen:
            assert time.monotonic() < deadline, f"never showed {text!r}: {self.seen!r}"
            assert self._read(0.2) or text in self.seen, f"exited without {text!r}: {self.seen!r}"

    def finish(self) -> tuple[int, str]:
        """Its exit code and standard output, once it has exited (within WAIT)."""
        out, _ = self.proc.communicate(timeout=WAIT)
        while self._read(0.1):
            pass
        os.close(self.master)
        return self.proc.returncode, out.decode()


@pytest.mark.unit
def test_a_long_operation_outlives_the_short_deadline_that_cuts_a_short_one_off(
    home: Path,
) -> None:
    """With a 1 s deadline, a scrub (long) stalled 3 s answers; a status (short)
    stalled as long is cut off with an error that says so, and the daemon logs it.
    Before: scrub and status were alike, both under one 30 s deadline."""
    with _daemon(home):
        _stall(home, "status", 3)
        _stall(home, "scrub", 3)
        cut = run_cli(home, "status", "--json", timeout=WAIT)
        assert cut.returncode == 1, cut
        assert "the daemon cut 'status' off: it did not finish within 1 s" in cut.stderr
        assert "'status' did not finish within 1 s: cut off" in _daemon_log(home)
        scrub = json.loads(run_cli(home, "scrub", "--json", check=True, timeout=WAIT).stdout)
        assert scrub["chunks_checked"] == 0 and scrub["unhealed"] == 0
        progress: list[dict[str, Any]] = []
        control.call(_sock(home), "scrub", timeout=WAIT, on_progress=progress.append)
        assert progress and progress[0]["op"] == "scrub"
        assert progress[0]["stage"] == "stalled by a debug fault"
        control.call(_sock(home), "inject-fault", handler="control:stall:status", clear=True)
        assert run_cli(home, "status", "--json", check=True).returncode == 0


@pytest.mark.unit
def test_ctrl_c_on_a_scrub_exits_130_and_the_daemon_cancels_it_cleanly(home: Path) -> None:
    """SIGINT to `p2pfs scrub` while it runs: exit 130 with a message saying what the
    daemon did; the daemon logs the cancel, stays healthy, and the next scrub runs."""
    with _daemon(home) as daemon:
        _stall(home, "scrub", 600)
        cli = Terminal(home, "scrub")
        cli.wait_for("scrub: stalled by a debug fault")  # progress on the terminal
        cli.proc.send_signal(signal.SIGINT)
        rc, out = cli.finish()
        assert rc == EXIT_INTERRUPTED, (out, cli.seen)
        assert "interrupted: the daemon stopped the scrub" in cli.seen
        deadline = time.monotonic() + WAIT
        while "the client of 'scrub' closed the connection" not in _daemon_log(home):
            assert time.monotonic() < deadline, _daemon_log(home)[-3000:]
            time.sleep(0.05)
        assert "cancelled" in _daemon_log(home)
        assert daemon.poll() is None
        control.call(_sock(home), "inject-fault", handler="control:stall:scrub", clear=True)
        assert json.loads(run_cli(home, "scrub", "--json", check=True).stdout)["unhealed"] == 0


@pytest.fixture
def volume(home: Path, tmp_path: Path) -> tuple[Path, Path]:
    run_cli(home, "volume", "create", "tools", check=True)
    (home / "config.toml").write_text("[publish]\nsettle_s = 0\n")  # commits on request only
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    return home, mnt


@pytest.mark.mount
@pytest.mark.fuse
def test_a_commit_longer_than_the_deadline_answers_and_shows_progress(
    volume: tuple[Path, Path],
) -> None:
    """A commit stalled past the short deadline answers (it was cut off at 30 s before):
    on a terminal its progress shows on stderr; with --json, stdout is the answer only."""
    home, mnt = volume
    with _daemon(home, mnt):
        (mnt / "tools" / "a.txt").write_text("one\n")
        _stall(home, "commit", 3)
        cli = Terminal(home, "commit", "tools")
        cli.wait_for("commit tools: stalled by a debug fault")
        rc, out = cli.finish()
        assert rc == 0, (out, cli.seen)
        assert out.startswith("snapshot ") and "seq 1" in out
        (mnt / "tools" / "b.txt").write_text("two\n")
        cli = Terminal(home, "commit", "tools", "--json")
        rc, out = cli.finish()
        assert rc == 0, (out, cli.seen)
        answer = json.loads(out)
        assert answer["seq"] == 2 and answer["changed"]
        assert "stalled" not in cli.seen  # --json: no progress, even on a terminal


@pytest.mark.mount
@pytest.mark.fuse
def test_a_daemon_killed_mid_commit_is_a_broken_connection_with_its_own_exit_code(
    volume: tuple[Path, Path],
) -> None:
    """kill -9 while a commit runs: the CLI says the connection broke while running
    'commit' and points at the log, exit 7; before, it claimed no daemon ran (6). With
    the daemon gone, the next command is exit 6."""
    home, mnt = volume
    with _daemon(home, mnt) as daemon:
        (mnt / "tools" / "a.txt").write_text("one\n")
        _stall(home, "commit", 600)
        cli = Terminal(home, "commit", "tools")
        cli.wait_for("commit tools: stalled")
        daemon.kill()
        daemon.wait()
        rc, out = cli.finish()
    assert rc == EXIT_CONNECTION, (out, cli.seen)
    assert "the daemon closed the control connection while running 'commit'" in cli.seen
    assert str(home / "log" / "daemon.log") in cli.seen
    # Exit 6 stays what it says: nothing listens (the dead daemon's socket file remains).
    again = run_cli(home, "commit", "tools")
    assert again.returncode == 6 and "no p2pfs daemon is running" in again.stderr, again


@pytest.mark.mount
@pytest.mark.fuse
def test_ctrl_c_on_a_commit_exits_130_and_the_daemon_finishes_the_commit(
    volume: tuple[Path, Path],
) -> None:
    """SIGINT to `p2pfs commit`: exit 130, saying the daemon finishes the commit; the
    daemon does (the snapshot appears), logs it, and takes the next commit."""
    home, mnt = volume
    with _daemon(home, mnt) as daemon:
        (mnt / "tools" / "a.txt").write_text("one\n")
        _stall(home, "commit", 3)
        cli = Terminal(home, "commit", "tools")
        cli.wait_for("commit tools: stalled")
        cli.proc.send_signal(signal.SIGINT)
        rc, out = cli.finish()
        assert rc == EXIT_INTERRUPTED, (out, cli.seen)
        assert "interrupted: the daemon finishes the commit it started" in cli.seen
        deadline = time.monotonic() + WAIT
        while "'commit' succeeded after" not in _daemon_log(home):
            assert time.monotonic() < deadline, _daemon_log(home)[-3000:]
            time.sleep(0.1)
        assert "the client of 'commit' closed the connection" in _daemon_log(home)
        status = json.loads(run_cli(home, "status", "--json", check=True).stdout)
        assert status["volumes"][0]["seq"] == 1
        assert sorted(os.listdir(mnt / "tools" / ".snapshots" / "1")) == ["a.txt"]
        control.call(_sock(home), "inject-fault", handler="control:stall:commit", clear=True)
        (mnt / "tools" / "b.txt").write_text("two\n")
        done = json.loads(run_cli(home, "commit", "tools", "--json", check=True).stdout)
        assert done["seq"] == 2
        assert daemon.poll() is None


@pytest.mark.unit
def test_a_connection_that_breaks_before_the_answer_raises_connection_lost(
    tmp_path: Path,
) -> None:
    """The client alone: a listener that takes the request, sends a progress line and
    closes without an answer is ConnectionLost (7), not NotRunning (6)."""
    import socket
    import threading

    path = tmp_path / "run" / "control.sock"
    path.parent.mkdir()
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen(1)

    def hang_up() -> None:
        conn, _ = server.accept()
        conn.recv(65536)
        conn.sendall(b'{"progress": {"op": "commit", "elapsed_s": 1.0}}\n')
        conn.close()

    t = threading.Thread(target=hang_up)
    t.start()
    try:
        with pytest.raises(P2pfsError) as e:
            control.call(path, "commit", timeout=WAIT, volume="v")
        assert e.value.exit_code == EXIT_CONNECTION
        assert "closed the control connection while running 'commit'" in str(e.value)
    finally:
        t.join()
        server.close()
