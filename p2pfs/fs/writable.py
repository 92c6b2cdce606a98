"""The publisher's writable volume as a filesystem, free of FUSE.

``vfs.FileSystem`` hands every inode and handle of a writable volume to its
``WritableVolume``: FUSE inode numbers are ``slot << SLOT_SHIFT | work-tree ino``
and file handles carry the slot the same way, so dispatch is a shift.

Reads of a clean file come from its blob's chunks; a file opened for writing is
first copied into its staging file (unless truncated), then read and written there.
Changed files are handed to the publisher when their last writer closes them.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import trio

from p2pfs.errors import IntegrityError
from p2pfs.objects.model import Kind
from p2pfs.volume.content import SEQUENTIAL_SLACK, Content, read_ahead, read_span
from p2pfs.volume.wnodes import ROOT, TreeError, WNode
from p2pfs.volume.worktree import WorkTree

from .api import TYPE_BITS, check_name_length

log = logging.getLogger(__name__)

SLOT_SHIFT = 40
LOCAL_MASK = (1 << SLOT_SHIFT) - 1
# The kernel sees every change (all go through it), but keep attributes short anyway:
# a commit replaces the tree that unchanged names resolve to.
WRITABLE_TIMEOUT = 1.0
COPY_BATCH = 8 * 1024 * 1024


@dataclass
class WOpenFile:
    node: WNode
    writable: bool
    next_offset: int = 0  # where the last read ended (a sequential reader reads on from it)


@dataclass
class WOpenDir:
    node: WNode
    names: list[bytes]


@dataclass(frozen=True)
class WAttr:
    ino: int
    mode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    atime_ns: int
    nlink: int  # a directory's: 1 while its subdirectories are not counted ("unknown")
    uid: int
    gid: int
    blocks: int | None = None  # 512-byte blocks allocated (None: the apparent size's)
    rdev: int = 0


class WritableVolume:
    def __init__(
        self,
        name: str,
        slot: int,
        tree: WorkTree,
        content: Content,
        *,
        on_change: Callable[[], None] = lambda: None,
        on_closed: Callable[[WNode], None] = lambda n: None,
        on_fault: Callable[[IntegrityError], None] = lambda e: None,
        refusal: Callable[[], str | None] = lambda: None,
    ) -> None:
        self.name = name
        self.slot = slot
        self.base = slot << SLOT_SHIFT
        self.tree = tree
        self.content = content
        self.on_change = on_change
        self.on_closed = on_closed
        # Failsafe (the publisher's): after an integrity fault in data this volume needs,
        # ``on_fault`` is told, and while ``refusal()`` names a reason writes get EROFS.
        self.on_fault = on_fault
        self.refusal = refusal
        self._fds: dict[int, int] = {}  # work-tree ino -> staging file fd
        self._files: dict[int, WOpenFile] = {}
        self._dirs: dict[int, WOpenDir] = {}
        self._next_fh = 1
        self._copying: dict[int, trio.Lock] = {}

    # -- numbering -------------------------------------------------------------------

    def owns(self, fuse_ino: int) -> bool:
        return fuse_ino >> SLOT_SHIFT == self.slot

    def fuse_ino(self, n: WNode) -> int:
        return self.base | n.ino

    @property
    def root_ino(self) -> int:
        return self.base | ROOT

    def node(self, fuse_ino: int) -> WNode:
        n = self.tree.node(fuse_ino & LOCAL_MASK)
        if n is None:
            raise TreeError(errno.ENOENT)
        return n

    def parent_ino(self, fuse_ino: int) -> int | None:
        """The FUSE inode of the directory above (None above the volume's root)."""
        n = self.node(fuse_ino)
        return None if n.ino == ROOT else self.base | n.parent

    def _fh(self) -> int:
        fh = self.base | self._next_fh
        self._next_fh += 1
        return fh

    def attr(self, n: WNode) -> WAttr:
        blocks = None
        if n.kind is Kind.DIR:
            # "." and the name above, and each subdirectory's "..", as ext4 and tmpfs count:
            # find(1) skips the stat of the rest once it has seen that many directories, so
            # a count must never be too low; 1 ("unknown") until counted (count_subdirs).
            mode = stat.S_IFDIR
            nlink = 1 if n.subdirs is None else 2 + n.subdirs
        else:
            mode, nlink = TYPE_BITS[n.kind], n.nlink
            if n.staged:
                blocks = self._staged_blocks(n)
        return WAttr(
            self.fuse_ino(n),
            mode | n.mode,
            n.size,
            n.mtime_ns,
            n.ctime_ns,
            n.atime_ns,
            nlink,
            n.uid,
            n.gid,
            blocks,
            n.rdev,
        )

    def _staged_blocks(self, n: WNode) -> int | None:
        """What the staging file holds on disk: a sparse file's holes take no blocks (du
        must not count them). One fstat (or stat) of page-cache metadata, inline."""
        fd = self._fds.get(n.ino)
        try:
            st = os.fstat(fd) if fd is not None else os.stat(self.tree.staging_path(n.ino))
        except OSError:  # absorbed and deleted meanwhile: the apparent size will do
            return None
        return st.st_blocks

    async def count_subdirs(self, fuse_ino: int) -> None:
        """Count an unloaded directory's subdirectories from its tree object, so its
        st_nlink is exact. That loads the tree (from the store, or a peer's) but not its
        rows: a lookup or stat of a directory is followed by its readdir in practice, which
        needs the same tree, so the load is paid once. A loaded directory keeps its count
        up to date itself (worktree.py); an unloaded one cannot change until loaded."""
        n = self.node(fuse_ino)
        if n.kind is not Kind.DIR or n.subdirs is not None or n.tree is None:
            return
        with self._faults():
            tree, _names = await self.content.tree(n.tree)
        if n.subdirs is None and not n.loaded:  # a concurrent load_dir counted it already
            n.subdirs = sum(1 for e in tree.entries if e.kind is Kind.DIR)

    # -- failsafe --------------------------------------------------------------------

    def _writes(self) -> None:
        """Refuse a change while the volume is in failsafe mode."""
        reason = self.refusal()
        if reason is not None:
            raise TreeError(errno.EROFS, f"volume {self.name} refuses writes: {reason}")

    @contextlib.contextmanager
    def _faults(self) -> Iterator[None]:
        """Reads of this volume's own data: an integrity fault enters failsafe."""
        try:
            yield
        except IntegrityError as e:
            self.on_fault(e)
            raise

    # -- names -----------------------------------------------------------------------

    async def _loaded(self, d: WNode) -> WNode:
        if d.kind is not Kind.DIR:
            raise TreeError(errno.ENOTDIR)
        if d.children is None:
            assert d.tree is not None
            with self._faults():
                tree, _names = await self.content.tree(d.tree)
            self.tree.load_dir(d, tree.entries)  # no-op if a concurrent lookup won
        return d

    async def lookup(self, parent: int, name: bytes) -> WAttr:
        check_name_length(name)
        d = await self._loaded(self.node(parent))
        n = self.tree.child(d, name)
        if n is not None and n.kind is Kind.DIR and n.subdirs is None:
            await self.count_subdirs(self.fuse_ino(n))
            n = self.tree.child(d, name)  # again: the name may have changed meanwhile
        if n is None:
            raise TreeError(errno.ENOENT)
        n.lookups += 1
        return self.attr(n)

    def lookup_self(self, fuse_ino: int) -> WAttr:
        n = self.node(fuse_ino)
        n.lookups += 1
        return self.attr(n)

    def forget(self, fuse_ino: int, count: int) -> None:
        n = self.tree.node(fuse_ino & LOCAL_MASK)
        if n is not None:
            n.lookups = max(0, n.lookups - count)
            self._maybe_drop(n)

    def _maybe_drop(self, n: WNode) -> None:
        if self.tree.forgettable(n):
            self._close_fd(n)
            self.tree.drop(n)

    async def getattr(self, fuse_ino: int) -> WAttr:
        await self.count_subdirs(fuse_ino)
        return self.attr(self.node(fuse_ino))

    def readlink(self, fuse_ino: int) -> bytes:
        n = self.node(fuse_ino)
        if n.kind is not Kind.SYMLINK or n.target is None:
            raise TreeError(errno.EINVAL)
        return n.target

    def _check_name(self, d: WNode, name: bytes) -> None:
        check_name_length(name)
        if b"/" in name or name in (b"", b".", b".."):
            raise TreeError(errno.EINVAL)
        if d.ino == ROOT and name == b".snapshots":
            raise TreeError(errno.EEXIST)  # the hidden history lives there

    async def make(
        self,
        parent: int,
        name: bytes,
        kind: Kind,
        mode: int,
        uid: int,
        gid: int,
        target: bytes | None = None,
        *,
        rdev: int = 0,
        keep_fd: bool = False,
    ) -> WAttr:
        self._writes()
        d = await self._loaded(self.node(parent))
        self._check_name(d, name)
        if kind is Kind.SYMLINK and (not target or len(target) > 4096 or b"\0" in target):
            raise TreeError(errno.ENAMETOOLONG if target and len(target) > 4096 else errno.EINVAL)
        if d.mode & stat.S_ISGID:
            # BSD group semantics in a setgid directory, as local filesystems do.
            gid = d.gid
            if kind is Kind.DIR:
                mode |= stat.S_ISGID
        n = self.tree.make(d, name, kind, mode, uid, gid, target, rdev)
        fd, self.tree.created_fd = self.tree.created_fd, None
        if fd is not None:
            if keep_fd:
                self._fds[n.ino] = fd
            else:
                os.close(fd)
        n.lookups += 1
        self.on_change()
        return self.attr(n)

    async def create(
        self, parent: int, name: bytes, mode: int, flags: int, uid: int, gid: int
    ) -> tuple[int, WAttr]:
        attr = await self.make(parent, name, Kind.FILE, mode, uid, gid, keep_fd=True)
        n = self.node(attr.ino)
        return self._open_handle(n, writable=flags & os.O_ACCMODE != os.O_RDONLY), attr

    async def link(self, fuse_ino: int, parent: int, name: bytes) -> WAttr:
        self._writes()
        n = self.node(fuse_ino)
        d = await self._loaded(self.node(parent))
        self._check_name(d, name)
        self.tree.link(n, d, name)
        n.lookups += 1
        self.on_change()
        return self.attr(n)

    async def unlink(self, parent: int, name: bytes) -> None:
        check_name_length(name)
        self._writes()
        d = await self._loaded(self.node(parent))
        n = self.tree.unlink(d, name)
        self._maybe_drop(n)
        self.on_change()

    async def rmdir(self, parent: int, name: bytes) -> None:
        check_name_length(name)
        self._writes()
        d = await self._loaded(self.node(parent))
        n = self.tree.child(d, name)
        if n is not None and n.kind is Kind.DIR:
            await self._loaded(n)
        n = self.tree.rmdir(d, name)
        self._maybe_drop(n)
        self.on_change()

    async def rename(self, p1: int, n1: bytes, p2: int, n2: bytes, flags: int) -> None:
        check_name_length(n1)
        check_name_length(n2)
        self._writes()
        d1 = await self._loaded(self.node(p1))
        d2 = await self._loaded(self.node(p2))
        self._check_name(d2, n2)
        for d, name in ((d1, n1), (d2, n2)):
            n = self.tree.child(d, name)
            if n is not None and n.kind is Kind.DIR:
                await self._loaded(n)  # whether it is empty decides
        gone = self.tree.rename(d1, n1, d2, n2, flags)
        if gone is not None:
            self._maybe_drop(gone)
        self.on_change()

    async def setattr(
        self,
        fuse_ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        mtime_ns: int | None = None,
        atime_ns: int | None = None,
    ) -> WAttr:
        self._writes()
        n = self.node(fuse_ino)
        if size is not None:
            if n.kind is Kind.DIR:
                raise TreeError(errno.EISDIR)
            if n.kind is not Kind.FILE:
                raise TreeError(errno.EINVAL)
            await self._truncate(n, size)
        if any(v is not None for v in (mode, uid, gid, mtime_ns, atime_ns)):
            self.tree.set_attrs(
                n, mode=mode, uid=uid, gid=gid, mtime_ns=mtime_ns, atime_ns=atime_ns
            )
        self.on_change()
        return self.attr(n)

    async def setxattr(self, fuse_ino: int, name: bytes, value: bytes | None) -> None:
        """Set an extended attribute (None: remove it; ENODATA if it is not there). The
        caller has checked its name and size."""
        self._writes()
        n = self.node(fuse_ino)
        if value is None and name not in n.xattrs:
            raise TreeError(errno.ENODATA)
        self.tree.set_xattr(n, name, value)
        self.on_change()

    # -- directories -------------------------------------------------------------------

    async def opendir(self, fuse_ino: int) -> int:
        d = await self._loaded(self.node(fuse_ino))
        assert d.children is not None
        fh = self._fh()
        # The names as of opendir: offsets into this list stay stable while the
        # directory changes (entries removed since are skipped, new ones not listed).
        self._dirs[fh] = WOpenDir(d, sorted(d.children))
        return fh

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, WAttr, int]]:
        od = self._dirs.get(fh)
        if od is None:
            raise TreeError(errno.EBADF)
        children = od.node.children or {}
        if start == 0:  # (re)starting: rewinddir(3) must see the directory as it is now
            od.names = sorted(children)
        for i in range(start, len(od.names)):
            ino = children.get(od.names[i])
            n = self.tree.node(ino) if ino is not None else None
            if n is None:
                continue
            n.lookups += 1
            yield od.names[i], self.attr(n), i + 1

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    # -- files -------------------------------------------------------------------------

    def _open_handle(self, n: WNode, *, writable: bool) -> int:
        fh = self._fh()
        self._files[fh] = WOpenFile(n, writable)
        n.opens += 1
        if writable:
            n.writers += 1
        return fh

    async def open(self, fuse_ino: int, flags: int) -> int:
        n = self.node(fuse_ino)
        if n.kind is Kind.DIR:
            raise TreeError(errno.EISDIR)
        if n.kind is not Kind.FILE:
            raise TreeError(errno.EINVAL)
        writable = flags & os.O_ACCMODE != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            self._writes()
        if flags & os.O_TRUNC:
            # Even with O_RDONLY: Linux truncates (the kernel checked write permission).
            await self._truncate(n, 0)
        elif writable:
            await self._stage(n)
        return self._open_handle(n, writable=writable)

    def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is None:
            return
        n = f.node
        n.opens -= 1
        if f.writable:
            n.writers -= 1
            # No row to write: a staged file's size and mtime are its staging file's.
            if n.staged and n.links and n.writers == 0:
                self.tree.stamp(n)
                self.on_closed(n)
        if n.opens == 0:
            self._close_fd(n)
        self._maybe_drop(n)

    def file_node(self, fh: int) -> WNode:
        f = self._files.get(fh)
        if f is None:
            raise TreeError(errno.EBADF)
        return f.node

    def _fd(self, n: WNode) -> int:
        fd = self._fds.get(n.ino)
        if fd is None:
            fd = os.open(self.tree.staging_path(n.ino), os.O_RDWR | os.O_CLOEXEC)
            self._fds[n.ino] = fd
        return fd

    def _close_fd(self, n: WNode) -> None:
        fd = self._fds.pop(n.ino, None)
        if fd is not None:
            os.close(fd)

    def dropped_staging(self, n: WNode) -> None:
        """``n`` became clean (absorbed): its staging file is going away. Readers still
        open read the blob from now on, so the fd goes too (a later writer must not
        write into the deleted file)."""
        self._close_fd(n)

    async def read(
        self, fh: int, offset: int, size: int, nursery: trio.Nursery | None = None
    ) -> bytes:
        """A committed file reads as a snapshot's does: its chunks verified, and for a
        sequential reader loaded ahead in ``nursery`` (the scan LRU's, see ChunkCache)."""
        f = self._files.get(fh)
        if f is None:
            raise TreeError(errno.EBADF)
        n = f.node
        if n.staged:
            # A page-cache read of at most max_read bytes: cheaper inline than a thread trip.
            return os.pread(self._fd(n), size, offset)
        assert n.blob is not None
        with self._faults():
            layout = await self.content.layout(n.blob)
            end = min(offset + size, layout.size)
            if offset >= end:
                return b""
            sequential = abs(offset - f.next_offset) <= SEQUENTIAL_SLACK
            f.next_offset = max(end, f.next_offset) if sequential else end
            chunks = self.content.chunks
            data = bytes(await read_span(chunks, layout, offset, end, scan=sequential))
            if sequential and nursery is not None:
                read_ahead(chunks, layout, end, nursery, self.content.readahead_window())
            return data

    def write(self, fh: int, offset: int, data: bytes) -> int:
        f = self._files.get(fh)
        if f is None or not f.writable:
            raise TreeError(errno.EBADF)
        self._writes()
        n = f.node
        if not n.staged:  # absorbed between open and write? Never while a writer is open.
            raise TreeError(errno.EIO, "write to a file that is not staged")
        # Into the page cache: durability is fsync's job, which runs in a thread.
        written = os.pwrite(self._fd(n), data, offset)
        self.tree.wrote(n, offset + written)
        self.on_change()
        return written

    async def fsync(self, fh: int) -> None:
        n = self.file_node(fh)
        if n.staged:
            fd = self._fd(n)
            self.tree.stamp(n)
            await trio.to_thread.run_sync(os.fsync, fd)
            self.tree.save(n)
        await trio.to_thread.run_sync(self.tree.sync)

    async def fsyncdir(self) -> None:
        await trio.to_thread.run_sync(self.tree.sync)

    async def _stage(self, n: WNode) -> None:
        """Copy a clean file's content into its staging file (once, however many opens)."""
        if n.staged:
            return
        lock = self._copying.setdefault(n.ino, trio.Lock())
        try:
            async with lock:
                if n.staged:
                    return
                with self._faults():
                    await self._copy_out(n)
        finally:
            if not lock.locked() and lock.statistics().tasks_waiting == 0:
                self._copying.pop(n.ino, None)

    async def _copy_out(self, n: WNode) -> None:
        assert n.blob is not None
        layout = await self.content.layout(n.blob)
        path = self.tree.staging_path(n.ino)
        tmp = path.with_name(f"{n.ino}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600)
        try:
            pending: list[bytes] = []
            pending_bytes = 0
            for cid in layout.ids:
                data = await self.content.chunks.get(cid)
                pending.append(data)
                pending_bytes += len(data)
                if pending_bytes >= COPY_BATCH:
                    await trio.to_thread.run_sync(os.writev, fd, pending)
                    pending, pending_bytes = [], 0
            if pending:
                await trio.to_thread.run_sync(os.writev, fd, pending)
            os.utime(fd, ns=(n.mtime_ns, n.mtime_ns))
        except BaseException:
            os.close(fd)
            tmp.unlink(missing_ok=True)
            raise
        os.close(fd)
        os.rename(tmp, path)
        self.tree.staged_now(n)

    async def _truncate(self, n: WNode, size: int) -> None:
        if n.staged:
            os.truncate(self.tree.staging_path(n.ino), size)
        elif size == 0:
            path = self.tree.staging_path(n.ino)
            os.close(os.open(path, os.O_CREAT | os.O_TRUNC | os.O_WRONLY | os.O_CLOEXEC, 0o600))
            self.tree.staged_now(n)
        else:
            await self._stage(n)
            os.truncate(self.tree.staging_path(n.ino), size)
        self.tree.resized(n, size)
