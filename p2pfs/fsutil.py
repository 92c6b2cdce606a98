"""Files and processes, done once: atomic writes, lock files, whether a process lives,
which file system holds a path.

Everything here blocks (fsync, flock): trio callers run it in a worker thread, or
accept a short block at start-up where the daemon is not serving yet.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import fcntl
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

from p2pfs.errors import NotFound, P2pfsError


def read_bounded(
    path: Path | str, limit: int, what: str, *, too_large: type[P2pfsError] = P2pfsError
) -> bytes:
    """A small file's bytes, at most ``limit`` of them; a one-line error naming ``what``
    and the file when it is missing (NotFound), unreadable or larger (``too_large``)."""
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise P2pfsError(f"{what} {path} is a directory") from None
    except PermissionError:
        raise P2pfsError(f"{what} {path} is not readable (permission denied)") from None
    except OSError as e:
        raise P2pfsError(f"cannot read {what} {path}: {e.strerror}") from None
    if len(data) > limit:
        raise too_large(f"{what} {path} is larger than the limit of {limit} bytes")
    return data


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """Write every byte of ``data`` to ``fd`` (os.write may take fewer)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new name in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, mode: int = 0o644, *, overwrite: bool = True) -> None:
    """Replace ``path`` with ``data`` so a crash leaves the old or the new file, never half.

    The file gets exactly ``mode`` whatever the umask (a key file's 0600 must hold).
    With ``overwrite=False`` an existing file is refused (FileExistsError).
    """
    path = Path(path)
    if not overwrite and path.exists():
        raise FileExistsError(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    try:
        try:
            os.fchmod(fd, mode)
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


@contextlib.contextmanager
def locked(path: Path, *, blocking: bool = True, mode: int = 0o644) -> Iterator[int]:
    """Hold an exclusive flock on ``path`` (created if missing); yields its fd.

    The kernel drops the lock when the process dies, so a crash never leaves it
    held. ``blocking=False`` raises BlockingIOError at once if another holds it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        yield fd
    finally:
        os.close(fd)


def process_start(pid: int) -> str | None:
    """A running process's start time (clock ticks since boot, as text); None if it is
    gone or a zombie. Raises OSError when /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return None
    fields = stat[stat.rindex(b")") + 2 :].split()
    if fields[0] in (b"Z", b"X"):
        return None
    return fields[19].decode()


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie counts as gone)."""
    try:
        return process_start(pid) is not None
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def process_token(pid: int | None = None) -> str:
    """``pid:start``: names a process so that a later process reusing its pid differs."""
    pid = os.getpid() if pid is None else pid
    try:
        start = process_start(pid) or ""
    except OSError:
        start = ""
    return f"{pid}:{start}"


def token_alive(token: str) -> bool:
    """Whether the process a ``process_token`` names still runs."""
    pid_text, _, start = token.partition(":")
    if not pid_text.isdigit():
        return False
    pid = int(pid_text)
    try:
        now = process_start(pid)
    except OSError:
        return pid_alive(pid)
    return now is not None and (not start or now == start)


_libc: ctypes.CDLL | None = None


def syncfs(fd: int) -> None:
    """syncfs(2) on the file system holding ``fd``: one barrier for many files."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs failed: {os.strerror(err)}")


def filesystem_of(path: Path | str) -> tuple[str, str]:
    """(type, block device name) of the file system holding ``path``, from
    /proc/self/mountinfo and /sys/dev/block ("" for a device that has no block device,
    as tmpfs); ("", "") if the mount is not found."""
    dev = os.stat(path).st_dev
    number = f"{os.major(dev)}:{os.minor(dev)}"
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return "", ""
    for line in lines:
        fields = line.split()
        # id parent major:minor root mountpoint options [optional...] - type source ...
        if len(fields) > 7 and fields[2] == number and "-" in fields[6:]:
            fstype = fields[fields.index("-", 6) + 1]
            block = Path(f"/sys/dev/block/{number}")
            return fstype, block.resolve().name if block.exists() else ""
    return "", ""


def ext4_has_journal(device: str) -> bool | None:
    """Whether the mounted ext4 on ``device`` (a name as in /sys/fs/ext4) keeps a
    journal; None when the kernel does not say."""
    try:
        task = Path(f"/sys/fs/ext4/{device}/journal_task").read_text().strip()
    except OSError:
        return None
    return task != "<none>"
