"""A protocol adapter only: pyfuse3 calls in, one FileSystem method each, answers out.

What the volumes look like as a filesystem is defined in ``vfs.py`` (the node)
and ``appliance/thin_fs.py`` (a desktop), both an ``api.Filesystem``; every errno
and cache decision is theirs. The one rule here: only ``FUSEError`` may leave a
handler. pyfuse3 lets any other
exception end ``pyfuse3.main()``, which would leave every process using the
mount with "Transport endpoint is not connected"; so anything unexpected is
logged with its traceback and answered with EIO, and the mount stays alive.
"""

from __future__ import annotations

import errno
import functools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, ParamSpec, TypeVar

import pyfuse3

from p2pfs.errors import errno_of
from p2pfs.objects.model import Kind

from .api import Attr, Filesystem, FuseStats, Opened

log = logging.getLogger(__name__)

P = ParamSpec("P")
R = TypeVar("R")


def _failsafe(
    fn: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        ops = args[0]
        assert isinstance(ops, Operations)
        ops.calls[name] += 1
        try:
            return await fn(*args, **kwargs)
        except pyfuse3.FUSEError:
            ops.errors[name] += 1
            raise
        except Exception as e:
            ops.errors[name] += 1
            code = errno_of(e)
            if code is None:
                ops.fs.unexpected(fn.__name__)
                log.exception("unexpected error in %s; answering EIO", fn.__name__)
                code = errno.EIO
            elif code == errno.EIO:
                log.warning("%s: %s", fn.__name__, e)
            raise pyfuse3.FUSEError(code) from None

    return wrapper


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    e = pyfuse3.EntryAttributes()
    e.st_ino = pyfuse3.InodeT(attr.ino)
    e.st_mode = pyfuse3.ModeT(attr.mode)
    e.st_nlink = attr.nlink
    e.st_uid = attr.uid
    e.st_gid = attr.gid
    e.st_size = attr.size
    e.st_blksize = attr.blksize
    e.st_blocks = attr.blocks
    e.st_rdev = attr.rdev
    e.st_atime_ns = attr.mtime_ns if attr.atime_ns is None else attr.atime_ns
    e.st_mtime_ns = attr.mtime_ns
    e.st_ctime_ns = attr.mtime_ns if attr.ctime_ns is None else attr.ctime_ns
    e.generation = 0
    e.entry_timeout = attr.entry_timeout
    e.attr_timeout = attr.attr_timeout
    return e


def _info(opened: Opened) -> pyfuse3.FileInfo:
    return pyfuse3.FileInfo(fh=pyfuse3.FileHandleT(opened.fh), keep_cache=opened.keep_cache)


class Operations(pyfuse3.Operations):
    supports_dot_lookup = True
    enable_writeback_cache = False

    def __init__(self, fs: Filesystem) -> None:
        super().__init__()
        self.fs = fs
        # Touched only on the trio thread, where pyfuse3 runs every handler.
        self.calls: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.pages: PagePusher | None = None  # set once mounted (init)

    def statistics(self) -> FuseStats:
        pages = self.pages
        return FuseStats(
            tuple(sorted(self.calls.items())),
            tuple(sorted(self.errors.items())),
            pages.pushed_bytes if pages is not None else 0,
            pages.dropped if pages is not None else 0,
        )

    @_failsafe
    async def lookup(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.lookup(parent_inode, name))

    @_failsafe
    async def forget(self, inode_list: Sequence[tuple[pyfuse3.InodeT, int]]) -> None:
        for ino, count in inode_list:
            self.fs.forget(ino, count)

    @_failsafe
    async def getattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.getattr(inode))

    @_failsafe
    async def readlink(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileNameT:
        return pyfuse3.FileNameT(await self.fs.readlink(inode))

    @_failsafe
    async def opendir(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileHandleT:
        return pyfuse3.FileHandleT(await self.fs.opendir(inode))

    @_failsafe
    async def readdir(
        self, fh: pyfuse3.FileHandleT, start_id: int, token: pyfuse3.ReaddirToken
    ) -> None:
        for name, attr, next_id in self.fs.readdir(fh, start_id):
            if not pyfuse3.readdir_reply(token, pyfuse3.FileNameT(name), _entry(attr), next_id):
                self.fs.forget(attr.ino, 1)  # the kernel did not take it
                break

    @_failsafe
    async def releasedir(self, fh: pyfuse3.FileHandleT) -> None:
        self.fs.releasedir(fh)

    @_failsafe
    async def open(
        self, inode: pyfuse3.InodeT, flags: int, ctx: pyfuse3.RequestContext
    ) -> pyfuse3.FileInfo:
        return _info(await self.fs.open(inode, flags))

    @_failsafe
    async def read(self, fh: pyfuse3.FileHandleT, off: int, size: int) -> Any:
        return await self.fs.read(fh, off, size)

    @_failsafe
    async def release(self, fh: pyfuse3.FileHandleT) -> None:
        self.fs.release(fh)

    @_failsafe
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        out = pyfuse3.StatvfsData()
        for key, value in self.fs.statfs().items():
            setattr(out, key, value)
        return out

    @_failsafe
    async def getxattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> bytes:
        return await self.fs.getxattr(inode, name)

    @_failsafe
    async def listxattr(
        self, inode: pyfuse3.InodeT, ctx: pyfuse3.RequestContext
    ) -> Sequence[pyfuse3.XAttrNameT]:
        return [pyfuse3.XAttrNameT(n) for n in await self.fs.listxattr(inode)]

    @_failsafe
    async def access(self, inode: pyfuse3.InodeT, mode: int, ctx: pyfuse3.RequestContext) -> bool:
        self.fs.access(inode, mode)
        return True

    # -- changes ------------------------------------------------------------------------

    @_failsafe
    async def setattr(
        self,
        inode: pyfuse3.InodeT,
        attr: pyfuse3.EntryAttributes,
        fields: pyfuse3.SetattrFields,
        fh: pyfuse3.FileHandleT | None,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        changed = await self.fs.setattr(
            inode,
            mode=attr.st_mode if fields.update_mode else None,
            uid=attr.st_uid if fields.update_uid else None,
            gid=attr.st_gid if fields.update_gid else None,
            size=attr.st_size if fields.update_size else None,
            mtime_ns=attr.st_mtime_ns if fields.update_mtime else None,
            atime_ns=attr.st_atime_ns if fields.update_atime else None,
        )
        return _entry(changed)

    @_failsafe
    async def mknod(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        rdev: int,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.mknod(parent_inode, name, mode, rdev, ctx.uid, ctx.gid))

    @_failsafe
    async def mkdir(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.make(parent_inode, name, Kind.DIR, mode, ctx.uid, ctx.gid))

    @_failsafe
    async def symlink(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        target: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return _entry(
            await self.fs.make(parent_inode, name, Kind.SYMLINK, 0o777, ctx.uid, ctx.gid, target)
        )

    @_failsafe
    async def create(
        self,
        parent_inode: pyfuse3.InodeT,
        name: pyfuse3.FileNameT,
        mode: pyfuse3.ModeT,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        opened, attr = await self.fs.create(parent_inode, name, mode, flags, ctx.uid, ctx.gid)
        return _info(opened), _entry(attr)

    @_failsafe
    async def link(
        self,
        inode: pyfuse3.InodeT,
        new_parent_inode: pyfuse3.InodeT,
        new_name: pyfuse3.FileNameT,
        ctx: pyfuse3.RequestContext,
    ) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.link(inode, new_parent_inode, new_name))

    @_failsafe
    async def unlink(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.unlink(parent_inode, name)

    @_failsafe
    async def rmdir(
        self, parent_inode: pyfuse3.InodeT, name: pyfuse3.FileNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.rmdir(parent_inode, name)

    @_failsafe
    # pyfuse3 before 3.5 typed the names str (it passes bytes); unused-ignore for 3.5 on.
    async def rename(  # type: ignore[override, unused-ignore]
        self,
        parent_inode_old: pyfuse3.InodeT,
        name_old: pyfuse3.FileNameT,
        parent_inode_new: pyfuse3.InodeT,
        name_new: pyfuse3.FileNameT,
        flags: int,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.fs.rename(parent_inode_old, name_old, parent_inode_new, name_new, flags)

    @_failsafe
    async def write(self, fh: pyfuse3.FileHandleT, off: int, buf: bytes) -> int:
        return self.fs.write(fh, off, buf)

    async def flush(self, fh: pyfuse3.FileHandleT) -> None:
        # close() has nothing to report: data goes to the staging file at write, and
        # write and fsync answer its errors. ENOSYS makes the kernel stop sending FLUSH on
        # this mount (fuse_flush sets no_flush; close() returns 0), one round trip less
        # per close(), which counts for small files. Not counted as an error.
        self.calls["flush"] += 1
        raise pyfuse3.FUSEError(errno.ENOSYS)

    @_failsafe
    async def fsync(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_failsafe
    async def fsyncdir(self, fh: pyfuse3.FileHandleT, datasync: bool) -> None:
        await self.fs.fsyncdir(fh)

    @_failsafe
    async def setxattr(
        self,
        inode: pyfuse3.InodeT,
        name: pyfuse3.XAttrNameT,
        value: bytes,
        ctx: pyfuse3.RequestContext,
    ) -> None:
        await self.fs.setxattr(inode, name, value)

    @_failsafe
    async def removexattr(
        self, inode: pyfuse3.InodeT, name: pyfuse3.XAttrNameT, ctx: pyfuse3.RequestContext
    ) -> None:
        await self.fs.removexattr(inode, name)


class PagePusher:
    """Hands bytes to the kernel's page cache (``pyfuse3.notify_store``) from threads of
    its own, never from the event loop: the kernel locks each page it stores into, and
    the pages of a read still waiting for our answer stay locked until the loop answers
    it. ``offer`` never blocks: when the queue is full an offer is dropped (the pages
    are then read through the daemon, as without it; a later read offers them again).
    notify_store lets go of the GIL while the kernel copies, so ``THREADS`` threads push
    at once: the copy into new page-cache pages is what holds back how fast the cache
    warms under random reads. Each thread needs the GIL between pushes: the daemon's short
    switch interval (``node/daemon.SWITCH_INTERVAL_S``) is what keeps a busy event loop
    from starving them."""

    MAX_QUEUED = 32
    THREADS = 2

    def __init__(self) -> None:
        self._queue: queue.Queue[tuple[int, int, memoryview] | None] = queue.Queue(self.MAX_QUEUED)
        self._threads = [
            threading.Thread(target=self._run, name=f"p2pfs-pages-{i}", daemon=True)
            for i in range(self.THREADS)
        ]
        self._count = threading.Lock()
        self.enabled = True
        self.pushed_bytes = self.dropped = 0  # (read on the trio thread: ints, one step)

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def offer(self, ino: int, offset: int, data: memoryview) -> bool:
        """Queue bytes for the page cache; False if they were not (full, or disabled)."""
        if not self.enabled:
            return False
        try:
            self._queue.put_nowait((ino, offset, data))
        except queue.Full:
            self.dropped += 1
            return False
        return True

    def stop(self, timeout: float = 2.0) -> None:
        """Before the session is closed: no thread may touch it after."""
        self.enabled = False
        alive = [t for t in self._threads if t.is_alive()]
        if not alive:
            return
        while True:  # make room for the end marks: what is queued is not worth pushing now
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        for _ in alive:
            self._queue.put(None)
        deadline = time.monotonic() + timeout
        for t in alive:
            t.join(max(0.0, deadline - time.monotonic()))
        if any(t.is_alive() for t in alive):
            log.warning("page cache thread still busy at unmount")

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            ino, offset, data = item
            try:
                # (Any buffer will do: it takes the bytes by PyObject_GetBuffer.)
                pyfuse3.notify_store(pyfuse3.InodeT(ino), offset, data)  # type: ignore[arg-type]
            except OSError as e:
                if e.errno == errno.ENOSYS:
                    log.info("this kernel cannot take pages from FUSE: random reads go on without")
                    self.enabled = False
                # ENOENT and the like: the kernel has forgotten the inode meanwhile.
                log.debug("notify_store of inode %d at %d: %s", ino, offset, e)
            else:
                with self._count:  # two threads add: += is not one step
                    self.pushed_bytes += len(data)


_pusher: PagePusher | None = None


def mount_options(*, allow_other: bool, read_only: bool = True) -> set[str]:
    opts = set(pyfuse3.default_options) | {"fsname=p2pfs", "subtype=p2pfs"}
    if read_only:
        opts.add("ro")
    if allow_other:
        opts.add("allow_other")
    return opts


def init(fs: Filesystem, mountpoint: str, *, allow_other: bool) -> Operations:
    """Mount ``fs``; the adapter is returned for its request counts (``statistics``)."""
    opts = mount_options(allow_other=allow_other, read_only=fs.read_only)
    global _pusher
    ops = Operations(fs)
    pyfuse3.init(ops, mountpoint, opts)
    _pusher = ops.pages = PagePusher()
    _pusher.start()
    return ops


async def serve() -> None:
    await pyfuse3.main(min_tasks=4, max_tasks=64)


def invalidate_entry(parent: int, name: bytes) -> None:
    """Tell the kernel a name now points elsewhere (a volume moved to a new snapshot)."""
    pyfuse3.invalidate_entry_async(
        pyfuse3.InodeT(parent), pyfuse3.FileNameT(name), ignore_enoent=True
    )


def terminate() -> None:
    pyfuse3.terminate()


def close(*, unmount: bool = True) -> None:
    global _pusher
    if _pusher is not None:
        _pusher.stop()
        _pusher = None
    pyfuse3.close(unmount=unmount)
