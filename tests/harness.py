"""Running nodes from tests: the CLI as a subprocess and real FUSE mounts.

Test modules import these directly (``pythonpath`` in pyproject.toml puts
``tests/`` on the path); conftest.py wraps them in fixtures.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

CLI_TIMEOUT = 600


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read a MiB at a time (through a mount: every byte via FUSE)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1024 * 1024):
            h.update(block)
    return h.hexdigest()


def run_cli(
    home: Path | None,
    *args: str,
    check: bool = False,
    timeout: float = CLI_TIMEOUT,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "p2pfs"]
    if home is not None:
        cmd += ["--home", str(home)]
    cmd += list(args)
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"p2pfs {' '.join(args)} exited {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}"
        )
    return proc


def force_unmount(mountpoint: Path, home: Path | None = None) -> None:
    """Teardown that works whatever state the daemon is in."""
    pid = None
    if home is not None:
        with contextlib.suppress(OSError, ValueError):
            pid = int((home / "run" / "daemon.pid").read_text().strip())
    # Always: the mount of a killed daemon fails stat(), so ismount() cannot see it.
    subprocess.run(["fusermount3", "-u", "-z", str(mountpoint)], capture_output=True)
    if pid:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            for _ in range(100):
                os.kill(pid, 0)
                time.sleep(0.05)
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def mounted(
    home: Path,
    mountpoint: Path,
    *extra: str,
    read_only: bool = False,
    env: dict[str, str] | None = None,
) -> Iterator[Path]:
    """``p2pfs mount`` in a subprocess; always unmounted and stopped afterwards.

    Volumes published by ``home`` are writable unless ``read_only``. With ``extra``
    flags or ``env`` (added to the environment) the daemon runs in the foreground, as
    systemd runs it."""
    mountpoint.mkdir(exist_ok=True)
    try:
        if extra or env:
            flags = (*extra, *(["--read-only"] * read_only))
            yield from _daemon_mount(home, mountpoint, *flags, env=env)
            return
        ro = ["--read-only"] if read_only else []
        run_cli(home, "mount", str(mountpoint), *ro, check=True, timeout=120)
        assert os.path.ismount(mountpoint)
        yield mountpoint
        proc = run_cli(home, "umount", str(mountpoint), timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not os.path.ismount(mountpoint)
    finally:
        force_unmount(mountpoint, home)


def _daemon_mount(
    home: Path, mountpoint: Path, *extra: str, env: dict[str, str] | None = None
) -> Iterator[Path]:
    """A foreground ``p2pfs daemon`` (for flags ``mount`` does not pass on)."""
    log = open(home / "log" / "test-daemon.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "p2pfs",
            "--home",
            str(home),
            "daemon",
            "--mount",
            str(mountpoint),
            *extra,
        ],
        stdout=log,
        stderr=log,
        env={**os.environ, **(env or {})},
    )
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mountpoint):
            assert proc.poll() is None, (home / "log" / "test-daemon.log").read_text()
            assert time.monotonic() < deadline, "daemon did not mount"
            time.sleep(0.05)
        yield mountpoint
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def require_lab() -> None:
    """Skip without the lab (namespaces need root) on a laptop; in CI, fail instead."""
    import pytest

    from p2pfs.lab.netns import lab_unavailable

    reason = lab_unavailable()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the lab must run in CI: {reason}")
        pytest.skip(f"lab unavailable: {reason}")


# A member node's peer, run as a script in a lab host: it offers one volume head in its
# hello and answers the target's snapshot request with the given bytes (a forged,
# unendorsed or replayed snapshot). Arguments: HOME TARGET NAME VOLUME_ID SEQ HEAD
# ENDORSEMENT|- SNAPSHOT_FILE. Prints "served" or "not asked".
SNAPSHOT_PEER = textwrap.dedent(
    """
    import socket, ssl, sys
    from pathlib import Path
    from p2pfs.net import wire
    from p2pfs.net import messages
    from p2pfs.trust.estate import Estate
    from p2pfs.home import Home
    home, target, name, vid, seq, head, endorsement, snap_file = sys.argv[1:9]
    est = Estate.load(Home(Path(home)))
    payload = Path(snap_file).read_bytes()
    raw = socket.create_connection((target, 7420), timeout=10)
    s = est.client_context().wrap_socket(raw)
    vol = messages.VolumeHead(
        name, bytes.fromhex(vid), int(seq), bytes.fromhex(head),
        bytes.fromhex(endorsement) if endorsement != "-" else None, None,
    )
    hello = messages.Hello(est.node_id, est.estate_id, 1, (vol,), est.revocation_number)
    s.sendall(wire.encode(hello.to_wire()))
    dec = wire.Decoder()
    s.settimeout(15)
    served = False
    try:
        while not served:
            data = s.recv(65536)
            if not data:
                break
            for h, _ in dec.feed(data):
                if h["t"] == "snapshot":
                    s.sendall(wire.encode(messages.answer(h["id"], vol=vol.to_wire()), payload))
                    served = True
    except (OSError, ssl.SSLError):
        pass
    print("served" if served else "not asked")
    """
)
