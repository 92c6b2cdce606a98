"""What the FUSE adapter drives: the filesystem interface, its records and its errors.

``fuse.Operations`` unpacks pyfuse3's arguments and calls one method of a
``Filesystem``; everything a filesystem decides (errno choices, whether the kernel
may keep a file's pages, what a write to a snapshot answers) is the filesystem's.
Two implement it: the node's ``vfs.FileSystem`` and the desktop's thin client.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from p2pfs.errors import ErrnoError
from p2pfs.objects.model import Kind

# The block size st_blksize and statfs report: I/O in these units is efficient.
BLOCK_SIZE = 128 * 1024


class FsError(ErrnoError):
    """An errno for the caller; the adapter turns it into FUSEError."""


# The longest name a directory entry may have (NAME_MAX, statfs's f_namemax).
NAME_MAX = 255

# The st_mode file type of each kind of entry.
TYPE_BITS = {
    Kind.FILE: stat.S_IFREG,
    Kind.DIR: stat.S_IFDIR,
    Kind.SYMLINK: stat.S_IFLNK,
    Kind.FIFO: stat.S_IFIFO,
    Kind.SOCKET: stat.S_IFSOCK,
    Kind.CHR: stat.S_IFCHR,
    Kind.BLK: stat.S_IFBLK,
}


def check_name_length(name: bytes) -> None:
    """ENAMETOOLONG for a name longer than NAME_MAX, as Linux filesystems answer in lookup
    (so before EEXIST, ENOENT or EROFS: every operation taking a name looks it up first)."""
    if len(name) > NAME_MAX:
        raise FsError(errno.ENAMETOOLONG)


@dataclass(frozen=True)
class FuseStats:
    """FUSE requests by operation (the handler's name): how many came, and how many were
    answered with an errno (ENOENT from a lookup of a missing name counts too)."""

    calls: tuple[tuple[str, int], ...]
    errors: tuple[tuple[str, int], ...]
    # Bytes of verified chunks handed to the page cache after random reads, and the
    # offers dropped because the thread handing them was behind (fs/page_cache.py).
    page_cache_pushed_bytes: int = 0
    page_cache_dropped: int = 0


@dataclass(frozen=True)
class Attr:
    ino: int
    mode: int  # type and permission bits
    size: int
    mtime_ns: int
    nlink: int
    uid: int
    gid: int
    entry_timeout: float
    attr_timeout: float
    ctime_ns: int | None = None  # None: the mtime (snapshots keep no ctime)
    atime_ns: int | None = None  # None: the mtime (snapshots keep no atime)
    blksize: int = BLOCK_SIZE
    # 512-byte blocks allocated, when the filesystem knows them (a sparse staging file's);
    # None: the apparent size rounded up (content in the store, where a hole is not known).
    allocated: int | None = None
    rdev: int = 0  # a device's number

    @property
    def blocks(self) -> int:
        return (self.size + 511) // 512 if self.allocated is None else self.allocated


@dataclass(frozen=True)
class Opened:
    """An open file: its handle, and whether the kernel may keep its cached pages
    (content under a snapshot's inode never changes)."""

    fh: int
    keep_cache: bool


class Filesystem(Protocol):
    """Every call ``fuse.Operations`` makes. Errors leave as ``ErrnoError`` or
    ``P2pfsError`` (mapped by ``errors.errno_of``); anything else is a bug."""

    @property
    def read_only(self) -> bool:
        """Whether nothing here may change (then the mount is read-only too)."""

    def unexpected(self, handler: str) -> None:
        """A handler failed with a bug (answered EIO): count it."""

    async def lookup(self, parent: int, name: bytes) -> Attr: ...
    def forget(self, ino: int, count: int) -> None: ...
    async def getattr(self, ino: int) -> Attr: ...
    async def readlink(self, ino: int) -> bytes: ...
    async def opendir(self, ino: int) -> int: ...
    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Attr, int]]: ...
    def releasedir(self, fh: int) -> None: ...
    async def open(self, ino: int, flags: int) -> Opened: ...
    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview: ...
    def release(self, fh: int) -> None: ...
    def statfs(self) -> dict[str, int]: ...
    async def getxattr(self, ino: int, name: bytes) -> bytes: ...
    async def listxattr(self, ino: int) -> list[bytes]: ...
    def access(self, ino: int, mode: int) -> None: ...
    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        mtime_ns: int | None = None,
        atime_ns: int | None = None,
    ) -> Attr: ...
    async def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Attr: ...
    async def make(
        self,
        parent: int,
        name: bytes,
        kind: Kind,
        mode: int,
        uid: int,
        gid: int,
        target: bytes | None = None,
    ) -> Attr: ...
    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[Opened, Attr]: ...
    async def link(self, ino: int, parent: int, name: bytes) -> Attr: ...
    async def unlink(self, parent: int, name: bytes) -> None: ...
    async def rmdir(self, parent: int, name: bytes) -> None: ...
    async def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int) -> None: ...
    def write(self, fh: int, offset: int, data: bytes) -> int: ...
    async def fsync(self, fh: int) -> None: ...
    async def fsyncdir(self, fh: int) -> None: ...
    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None: ...
    async def removexattr(self, ino: int, name: bytes) -> None: ...


class ReadOnlyChanges:
    """The answers of a filesystem where nothing changes: every change is EROFS."""

    @property
    def read_only(self) -> bool:
        return True

    def access(self, ino: int, mode: int) -> None:
        # default_permissions makes the kernel check modes; only writes are refused here.
        if mode & os.W_OK:
            raise FsError(errno.EROFS)

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        mtime_ns: int | None = None,
        atime_ns: int | None = None,
    ) -> Attr:
        raise FsError(errno.EROFS)

    async def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Attr:
        raise FsError(errno.EROFS)

    async def make(
        self,
        parent: int,
        name: bytes,
        kind: Kind,
        mode: int,
        uid: int,
        gid: int,
        target: bytes | None = None,
    ) -> Attr:
        raise FsError(errno.EROFS)

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[Opened, Attr]:
        raise FsError(errno.EROFS)

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        raise FsError(errno.EROFS)

    async def unlink(self, parent: int, name: bytes) -> None:
        raise FsError(errno.EROFS)

    async def rmdir(self, parent: int, name: bytes) -> None:
        raise FsError(errno.EROFS)

    async def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int) -> None:
        raise FsError(errno.EROFS)

    def write(self, fh: int, offset: int, data: bytes) -> int:
        raise FsError(errno.EROFS)

    async def fsync(self, fh: int) -> None:
        return None

    async def fsyncdir(self, fh: int) -> None:
        return None

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        raise FsError(errno.EROFS)

    async def removexattr(self, ino: int, name: bytes) -> None:
        raise FsError(errno.EROFS)


def attr_timeout(mode: int, nlink: int, timeout: float) -> float:
    """A directory whose nlink is not counted yet (1) is not kept by the kernel (readdir
    hands out such attributes): the next stat comes back and gets the count."""
    return 0.0 if stat.S_ISDIR(mode) and nlink < 2 else timeout
