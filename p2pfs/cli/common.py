"""What every command group shares: the node home, JSON output, files, detached mounts."""

from __future__ import annotations

import argparse
import json
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeAlias

from p2pfs.errors import ConnectionLost, Interrupted, NotFound, NotRunning, P2pfsError
from p2pfs.fsutil import pid_alive, read_bounded, write_atomic
from p2pfs.home import Home, default_home
from p2pfs.node import control

from .progress import op_status

# A command's handler: parsed arguments in, exit code out (user errors raised as P2pfsError).
Handler = Callable[[argparse.Namespace], int]
Subparsers: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"

MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 30.0
STDIO = "-"


def node_home(args: argparse.Namespace) -> Home:
    """The home ``--home`` (or $P2PFS_HOME, or the default) names; not checked."""
    return Home((args.home or default_home()).absolute())


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


def tell_daemon(home: Home) -> None:
    """Ask a running daemon to pick up what a command changed on disk."""
    try:
        control.call(home.control_socket, "reload", timeout=30)
    except NotRunning:
        pass
    except ConnectionLost as e:
        # The command's own work is done and on disk; the daemon's trouble is its own.
        print(f"p2pfs: warning: {e}", file=sys.stderr)


def call_long(
    home: Home, op: str, *, label: str, quiet: bool, on_interrupt: str, **args: Any
) -> Any:
    """Run a long operation of the daemon (commit, scrub, fsck, pin, log) to its end: no
    deadline, its progress on a terminal's stderr (not with ``quiet``, e.g. ``--json``).
    Ctrl-C closes the connection (the daemon cancels the operation, or lets one that
    must not be cut finish) and raises Interrupted with ``on_interrupt``, which says
    which of the two happened."""
    with op_status(sys.stderr.isatty() and not quiet, label) as update:
        try:
            return control.call(home.control_socket, op, timeout=None, on_progress=update, **args)
        except KeyboardInterrupt:
            raise Interrupted(on_interrupt) from None


def read_input(name: str, limit: int, what: str) -> bytes:
    """A file's bytes (at most ``limit``), or standard input's for ``-``."""
    if name != STDIO:
        return read_bounded(name, limit, what)
    data = sys.stdin.buffer.read(limit + 1)
    if len(data) > limit:
        raise P2pfsError(f"{what} {name} is larger than the limit of {limit} bytes")
    return data


def write_output(name: str, data: bytes) -> None:
    if name == STDIO:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
        return
    path = Path(name).absolute()
    if path.is_dir():
        raise P2pfsError(f"{path} is a directory")
    if not path.parent.is_dir():
        raise NotFound(f"cannot write {path}: {path.parent} is not a directory")
    try:
        write_atomic(path, data, 0o644)
    except PermissionError:
        raise P2pfsError(f"cannot write {path} (permission denied)") from None


def start_until_ready(cmd: list[str], log_path: Path, what: str) -> int:
    """Start ``cmd`` (plus ``--ready-fd N``) detached, logging to ``log_path``, and wait
    for the line it writes once its mount is usable; its pid, or its error raised here."""
    r, w = os.pipe()
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [*cmd, "--ready-fd", str(w)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            pass_fds=(w,),
            start_new_session=True,
        )
    os.close(w)
    line = read_line(r, MOUNT_TIMEOUT)
    os.close(r)
    if line == "ok":
        return proc.pid
    if line.startswith("error "):
        _, code, msg = line.split(" ", 2)
        err = P2pfsError(msg)
        err.exit_code = int(code)
        raise err
    rc = proc.poll()
    if rc is None:
        proc.terminate()
        raise P2pfsError(
            f"{what} did not become ready within {MOUNT_TIMEOUT:.0f} s; see {log_path}"
        )
    raise P2pfsError(f"{what} exited with code {rc} before mounting; see {log_path}")


def read_line(fd: int, timeout: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        data = os.read(fd, 4096)
        if not data:
            break
        buf += data
    return buf.decode(errors="replace").strip()


def wait_stopped(pid: int, mountpoint: Path, what: str) -> None:
    """Wait until process ``pid`` is gone and ``mountpoint`` unmounted (UMOUNT_TIMEOUT)."""
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if not pid_alive(pid) and not os.path.ismount(mountpoint):
            return
        time.sleep(0.05)
    raise P2pfsError(f"{what} (pid {pid}) did not stop within {UMOUNT_TIMEOUT:.0f} s")
