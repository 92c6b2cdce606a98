"""Mountpoints: checked before a mount, tuned after it, found in the mount table.

Shared by the node's daemon and the desktop's thin client, which mount alike.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path

from p2pfs.errors import Busy, NotFound, P2pfsError

log = logging.getLogger(__name__)

READAHEAD_KB = 1024


def check_mountpoint(mountpoint: Path) -> None:
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise Busy(
                f"mountpoint {mountpoint} holds a stale mount (its daemon died): "
                f"clear it with 'p2pfs umount {mountpoint}' or 'fusermount3 -u {mountpoint}'"
            ) from None
        if e.errno != errno.ENOENT:
            raise P2pfsError(f"mountpoint {mountpoint}: {e.strerror}") from None
    if not mountpoint.exists():
        raise NotFound(f"mountpoint {mountpoint} does not exist")
    if not mountpoint.is_dir():
        raise P2pfsError(f"mountpoint {mountpoint} is not a directory")
    if os.path.ismount(mountpoint):
        raise Busy(f"mountpoint {mountpoint} is busy: something is already mounted there")


def mount_answers(mountpoint: Path) -> None:
    """Blocks until the kernel answers stat() on ``mountpoint`` through the session just
    mounted (a FUSE getattr); P2pfsError if what answers is not a mount."""
    try:
        os.stat(mountpoint)
    except OSError as e:
        raise P2pfsError(f"mountpoint {mountpoint} does not answer: {e.strerror}") from None
    if not os.path.ismount(mountpoint):
        raise P2pfsError(f"mountpoint {mountpoint} is not mounted")


def set_readahead(mountpoint: Path, kb: int = READAHEAD_KB) -> bool:
    """Raise the mount's readahead: with the default 128 KiB, FUSE sequential reads run at ~0.7
    of a native filesystem; at 1 MiB they match it (DESIGN.md, performance facts). Root only."""
    dev = os.stat(mountpoint).st_dev
    path = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        path.write_text(str(kb))
    except OSError as e:
        log.info(
            "could not set readahead of %s (%s): sequential reads will be slower", mountpoint, e
        )
        return False
    return True


def is_p2pfs_mount(mp: Path) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                # The mount table escapes spaces and such as octal (\040).
                where = fields[1].encode().decode("unicode_escape").encode("latin-1")
                if where == os.fsencode(mp) and fields[2] == "fuse.p2pfs":
                    return True
            return False
    except OSError:
        return False


class ReadyLine:
    """The line a detached mount process writes once its mount is usable ("ok") or it
    failed ("error CODE MESSAGE"), on the fd ``p2pfs mount`` waits on (cli/common.py)."""

    def __init__(self, fd: int | None) -> None:
        self.fd = fd

    def send(self, line: str) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.write(self.fd, line.encode() + b"\n")
                os.close(self.fd)
            self.fd = None

    def ok(self) -> None:
        self.send("ok")

    def failed(self, e: P2pfsError) -> None:
        self.send(f"error {e.exit_code} {e}")
