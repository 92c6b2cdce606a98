"""Routing to the publisher's writable volumes: which volume an inode or handle is
in (the high bits of its number), and the handlers that change one, delegated to its
view (``writable.py``). Everything that is not in a writable volume is a snapshot:
EROFS. ``vfs.FileSystem`` builds on this; it keeps the snapshots' own handlers.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING

from p2pfs.objects.model import (
    MAX_XATTR_VALUE,
    MAX_XATTRS_BYTES,
    RESERVED_XATTR_PREFIX,
    XATTR_PREFIX,
    Kind,
)

from .api import Attr, FsError, Opened, attr_timeout, check_name_length
from .writable import SLOT_SHIFT, WRITABLE_TIMEOUT, WAttr, WritableVolume


class WritableRouting:
    if TYPE_CHECKING:  # the filesystem's (vfs.FileSystem), as store/fsck.py's mixin does

        def _shows_snapshots(self, volume: str) -> bool: ...

    def __init__(self) -> None:
        # The publisher's writable volumes, by name and by slot (the high bits of
        # their inode numbers and file handles).
        self.writable: dict[str, WritableVolume] = {}
        self._slots: dict[int, WritableVolume] = {}

    def _wattr(self, w: WritableVolume, a: WAttr) -> Attr:
        t = WRITABLE_TIMEOUT
        nlink = a.nlink
        if a.ino == w.root_ino and nlink >= 2 and self._shows_snapshots(w.name):
            nlink += 1  # the hidden .snapshots/ is a subdirectory too (its ".." is the root)
        return Attr(
            a.ino,
            a.mode,
            a.size,
            a.mtime_ns,
            nlink,
            a.uid,
            a.gid,
            t,
            attr_timeout(a.mode, nlink, t),
            a.ctime_ns,
            a.atime_ns,
            allocated=a.blocks,
            rdev=a.rdev,
        )

    def add_writable(self, volume: WritableVolume) -> None:
        self.writable[volume.name] = volume
        self._slots[volume.slot] = volume

    def _w(self, ino_or_fh: int) -> WritableVolume | None:
        """The writable volume an inode number or file handle belongs to."""
        if ino_or_fh >> SLOT_SHIFT == 0:
            return None
        w = self._slots.get(ino_or_fh >> SLOT_SHIFT)
        if w is None:
            raise FsError(errno.ENOENT)
        return w

    def _rw(self, ino: int) -> WritableVolume:
        """The writable volume of ``ino``, or EROFS: everything else is a snapshot."""
        w = self._w(ino)
        if w is None:
            raise FsError(errno.EROFS)
        return w

    # -- changes (writable volumes only) --------------------------------------------

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
        check_name_length(name)  # first, as in a lookup: on a read-only view too
        w = self._rw(parent)
        return self._wattr(w, await w.make(parent, name, kind, mode, uid, gid, target))

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[Opened, Attr]:
        check_name_length(name)
        w = self._rw(parent)
        fh, attr = await w.create(parent, name, mode, flags, uid, gid)
        # A new file's cached pages are all this kernel's own writes: they may stay.
        return Opened(fh, keep_cache=True), self._wattr(w, attr)

    async def link(self, ino: int, parent: int, name: bytes) -> Attr:
        check_name_length(name)
        w = self._rw(parent)
        if self._w(ino) is not w:
            raise FsError(errno.EXDEV)
        return self._wattr(w, await w.link(ino, parent, name))

    async def unlink(self, parent: int, name: bytes) -> None:
        check_name_length(name)
        await self._rw(parent).unlink(parent, name)

    async def rmdir(self, parent: int, name: bytes) -> None:
        check_name_length(name)
        await self._rw(parent).rmdir(parent, name)

    async def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int) -> None:
        check_name_length(n1)
        check_name_length(n2)
        w = self._rw(p1)
        if self._w(p2) is not w:
            raise FsError(errno.EROFS if self._w(p2) is None else errno.EXDEV)
        await w.rename(p1, n1, p2, n2, flags)

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
        w = self._rw(ino)
        return self._wattr(
            w,
            await w.setattr(
                ino, mode=mode, uid=uid, gid=gid, size=size, mtime_ns=mtime_ns, atime_ns=atime_ns
            ),
        )

    def write(self, fh: int, offset: int, data: bytes) -> int:
        return self._rw(fh).write(fh, offset, data)

    async def fsync(self, fh: int) -> None:
        w = self._w(fh)
        if w is not None:
            await w.fsync(fh)

    async def fsyncdir(self, fh: int) -> None:
        w = self._w(fh)
        if w is not None:
            await w.fsyncdir()

    async def mknod(
        self, parent: int, name: bytes, mode: int, rdev: int, uid: int, gid: int
    ) -> Attr:
        check_name_length(name)
        w = self._rw(parent)
        kind = _MKNOD_KINDS.get(stat.S_IFMT(mode))
        if kind is None:
            raise FsError(errno.EINVAL)  # no such file type (as mknod(2) says)
        if kind is not Kind.CHR and kind is not Kind.BLK:
            rdev = 0  # mknod(2): ignored unless a device
        # FUSE passes the kernel's 32-bit encoding (new_encode_dev: 12 bits of major, 20 of
        # minor), which is glibc's makedev for every number the kernel has: the tree's too.
        if kind is Kind.FILE:
            return await self.make(parent, name, Kind.FILE, mode, uid, gid)
        a = await w.make(parent, name, kind, mode, uid, gid, rdev=rdev)
        return self._wattr(w, a)

    def access(self, ino: int, mode: int) -> None:
        # default_permissions makes the kernel check modes; only writes to snapshots
        # are refused here.
        if mode & os.W_OK and not self.writable_ino(ino):
            raise FsError(errno.EROFS)

    async def setxattr(self, ino: int, name: bytes, value: bytes) -> None:
        w = self._rw(ino)
        _check_xattr_name(name)
        if len(value) > MAX_XATTR_VALUE:
            raise FsError(errno.E2BIG)  # the kernel's own limit (XATTR_SIZE_MAX)
        held = w.node(ino).xattrs
        total = sum(len(k) + len(v) for k, v in held.items() if k != name)
        if total + len(name) + len(value) > MAX_XATTRS_BYTES:
            raise FsError(errno.ENOSPC)  # as ext4 answers when an inode's room is full
        await w.setxattr(ino, name, value)

    async def removexattr(self, ino: int, name: bytes) -> None:
        w = self._rw(ino)
        _check_xattr_name(name)
        await w.setxattr(ino, name, None)

    def writable_ino(self, ino: int) -> bool:
        return self._w(ino) is not None

    @property
    def read_only(self) -> bool:
        return not self.writable


_MKNOD_KINDS = {
    0: Kind.FILE,  # mknod(2): a file type of 0 makes a regular file
    stat.S_IFREG: Kind.FILE,
    stat.S_IFIFO: Kind.FIFO,
    stat.S_IFSOCK: Kind.SOCKET,
    stat.S_IFCHR: Kind.CHR,
    stat.S_IFBLK: Kind.BLK,
}


def _check_xattr_name(name: bytes) -> None:
    """Only user.* attributes are stored (and carried in snapshots): any other namespace
    is EOPNOTSUPP, as a filesystem without that handler answers."""
    if not name.startswith(XATTR_PREFIX):
        raise FsError(errno.EOPNOTSUPP)
    if name == XATTR_PREFIX:
        raise FsError(errno.EINVAL)  # the kernel's answer for a bare prefix
    if name.startswith(RESERVED_XATTR_PREFIX):
        raise FsError(errno.EPERM)  # vfs.py's synthetic attributes are not the user's
