"""The desktop's thin client: the appliance's volumes as a read-only FUSE mount.

``p2pfs mount --appliance ADDR --token FILE MOUNTPOINT`` runs this on a desktop.
It holds no store, no keys and no estate membership: every lookup, listing and
read is one request of the user API to the appliance (``node/desktop_api.py``) over the
desktop link (``link_client.py``). The FUSE adapter is the node's own (``fs/fuse.py``):
``ThinFileSystem`` is an ``fs.api.Filesystem``, as ``vfs.FileSystem`` is.

Inodes are keyed by (path, object id), so a path whose content changed with a
new snapshot gets a new inode and the kernel never mixes cached pages of two
versions. Names are re-checked after ENTRY_TIMEOUT (ROOT_TIMEOUT for volumes).
A file opened after its path moved on answers ESTALE, which makes the kernel look
the path up again.

When the appliance is gone, every request fails with EIO within the link's
deadline (``--deadline``, 10 s by default) and the mount stays; when it returns,
the next request reconnects. When the appliance ends the session because this
desktop's token was removed or replaced, every request fails with EIO at once and
the mount does not reconnect (the client's log says why): unmount it, and mount
again with a new token file.

``VOLUME/.snapshots/<seq>/`` is the appliance's to offer (``[appliance]
desktop_snapshots``): this client asks for it by name like any other path.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import stat
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pfs.errors import P2pfsError
from p2pfs.fs import fuse
from p2pfs.fs.api import BLOCK_SIZE, Attr, FsError, Opened, ReadOnlyChanges
from p2pfs.fs.mount import ReadyLine, check_mountpoint, set_readahead
from p2pfs.fs.vfs import ROOT_INO, XATTR_ID, XATTR_SNAPSHOT
from p2pfs.ids import derive
from p2pfs.net.link import Address
from p2pfs.trust.desktop import DesktopToken
from p2pfs.volume.content import SEQUENTIAL_SLACK

from .link_client import ApplianceLink

log = logging.getLogger(__name__)

DEFAULT_DEADLINE = 10.0
ROOT_TIMEOUT = 1.0
ENTRY_TIMEOUT = 5.0
MAX_REQUEST = 1024 * 1024
# A sequential reader gets whole blocks, READAHEAD_BLOCKS of them fetched ahead: one
# round trip per MiB instead of one per 128 KiB FUSE read.
READ_BLOCK = 1024 * 1024
READAHEAD_BLOCKS = 4
KEPT_BLOCKS = 8
_STATE_DOMAIN = b"p2pfs-thin-state\0"
# A device's number is not carried over the link: the desktop's client shows its kind.
_KINDS = {
    "dir": stat.S_IFDIR,
    "file": stat.S_IFREG,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
}


@dataclass
class ThinNode:
    ino: int
    path: bytes
    attrs: dict[str, Any]
    key: tuple[bytes, bytes]
    lookups: int = 0
    opens: int = 0


@dataclass
class ThinFile:
    node: ThinNode
    blob: bytes
    handle: bytes
    size: int
    next_offset: int = 0  # where a sequential reader will read next
    # Read-ahead for sequential readers: whole READ_BLOCKs, fetched ahead.
    blocks: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    pending: dict[int, trio.Event] = field(default_factory=dict)


class ThinFileSystem(ReadOnlyChanges):
    """An ``api.Filesystem`` answered by the appliance's user API; nothing changes here."""

    def __init__(self, link: ApplianceLink, *, uid: int | None = None, gid: int | None = None):
        self.appliance = link
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self._nodes: dict[int, ThinNode] = {}
        self._by_key: dict[tuple[bytes, bytes], int] = {}
        self._next_ino = ROOT_INO + 1
        self._files: dict[int, ThinFile] = {}
        self._dirs: dict[int, tuple[int, list[dict[str, Any]]]] = {}
        self._next_fh = 1
        self.errors = 0  # unexpected failures (reported by the adapter)
        self.faults: set[str] = set()

    # -- nodes ------------------------------------------------------------------

    def _root_attr(self) -> Attr:
        mode = stat.S_IFDIR | 0o555
        return Attr(ROOT_INO, mode, 0, 0, 2, self.uid, self.gid, ROOT_TIMEOUT, ROOT_TIMEOUT)

    def _attr(self, node: ThinNode) -> Attr:
        a = node.attrs
        timeout = ROOT_TIMEOUT if b"/" not in node.path else ENTRY_TIMEOUT
        mode = _KINDS.get(a["kind"], stat.S_IFREG) | (int(a["mode"]) & 0o7777)
        return Attr(
            node.ino,
            mode,
            int(a["size"]),
            int(a["mtime_ns"]),
            1,
            self.uid,
            self.gid,
            timeout,
            timeout,
        )

    def _node(self, ino: int) -> ThinNode:
        node = self._nodes.get(ino)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def _path(self, ino: int) -> bytes:
        return b"" if ino == ROOT_INO else self._node(ino).path

    def _remember(self, path: bytes, attrs: dict[str, Any]) -> ThinNode:
        ident = attrs.get("id") or attrs.get("target") or b""
        key = (path, bytes(ident))
        ino = self._by_key.get(key)
        node = self._nodes.get(ino) if ino is not None else None
        if node is None:
            ino = self._next_ino
            self._next_ino += 1
            node = ThinNode(ino, path, attrs, key)
            self._nodes[ino] = node
            self._by_key[key] = ino
        node.lookups += 1
        return node

    def forget(self, ino: int, count: int) -> None:
        node = self._nodes.get(ino)
        if node is None:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def _maybe_drop(self, node: ThinNode) -> None:
        if node.lookups == 0 and node.opens == 0:
            del self._nodes[node.ino]
            if self._by_key.get(node.key) == node.ino:
                del self._by_key[node.key]

    @property
    def inode_count(self) -> int:
        return len(self._nodes)

    @staticmethod
    def _join(parent: bytes, name: bytes) -> bytes:
        return name if not parent else parent + b"/" + name

    # -- handlers ---------------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Attr:
        if name == b".":
            return await self._lookup_path(self._path(parent))
        if name == b"..":
            ppath = self._path(parent)
            return await self._lookup_path(ppath.rpartition(b"/")[0] if b"/" in ppath else b"")
        if parent != ROOT_INO:
            node = self._node(parent)
            if node.attrs["kind"] != "dir":
                raise FsError(errno.ENOTDIR)
        return await self._lookup_path(self._join(self._path(parent), name))

    async def _lookup_path(self, path: bytes) -> Attr:
        if not path:
            return self._root_attr()
        attrs = await self.appliance.call("stat", path=path)
        return self._attr(self._remember(path, attrs))

    async def getattr(self, ino: int) -> Attr:
        if ino == ROOT_INO:
            return self._root_attr()
        return self._attr(self._node(ino))

    async def readlink(self, ino: int) -> bytes:
        node = self._node(ino)
        target = node.attrs.get("target")
        if node.attrs["kind"] != "symlink" or not isinstance(target, bytes):
            raise FsError(errno.EINVAL)
        return target

    async def opendir(self, ino: int) -> int:
        path = self._path(ino)
        if ino != ROOT_INO and self._node(ino).attrs["kind"] != "dir":
            raise FsError(errno.ENOTDIR)
        answer = await self.appliance.call("list", path=path)
        fh = self._new_fh()
        self._dirs[fh] = (ino, list(answer["entries"]))
        return fh

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries from offset ``start``; each counts one lookup (the adapter forgets
        those the kernel did not take)."""
        d = self._dirs.get(fh)
        if d is None:
            raise FsError(errno.EBADF)
        ino, entries = d
        if ino != ROOT_INO and ino not in self._nodes:
            return
        parent = self._path(ino)
        for i in range(start, len(entries)):
            attrs = entries[i]
            node = self._remember(self._join(parent, attrs["name"]), attrs)
            yield attrs["name"], self._attr(node), i + 1

    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    async def open(self, ino: int, flags: int) -> Opened:
        node = self._node(ino)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise FsError(errno.EROFS)
        if node.attrs["kind"] == "dir":
            raise FsError(errno.EISDIR)
        answer = await self.appliance.call("open", path=node.path)
        if answer["blob"] != node.attrs.get("id"):
            # The path moved to a new snapshot since the kernel looked it up.
            raise FsError(errno.ESTALE)
        fh = self._new_fh()
        node.opens += 1
        self._files[fh] = ThinFile(node, answer["blob"], answer["handle"], int(answer["size"]))
        # A path's content changes only under a new inode: the kernel may keep the pages.
        return Opened(fh, keep_cache=True)

    async def read(self, fh: int, offset: int, size: int) -> bytes:
        f = self._files.get(fh)
        if f is None:
            raise FsError(errno.EBADF)
        if offset >= f.size:
            return b""
        end = min(offset + size, f.size)
        sequential = abs(offset - f.next_offset) <= SEQUENTIAL_SLACK
        f.next_offset = max(end, f.next_offset) if sequential else end
        if not sequential:
            return await self._fetch(f, offset, end - offset)
        first, last = offset // READ_BLOCK, (end - 1) // READ_BLOCK
        for i in range(last + 1, min(last + 1 + READAHEAD_BLOCKS, self._blocks(f))):
            if i not in f.blocks and i not in f.pending:
                self.appliance.nursery.start_soon(self._prefetch, f, i)
        parts = [await self._block(f, i) for i in range(first, last + 1)]
        data = parts[0] if len(parts) == 1 else b"".join(parts)
        start = offset - first * READ_BLOCK
        return data[start : start + end - offset]

    @staticmethod
    def _blocks(f: ThinFile) -> int:
        return (f.size + READ_BLOCK - 1) // READ_BLOCK

    async def _fetch(self, f: ThinFile, offset: int, n: int) -> bytes:
        data = await self.appliance.call(
            "read", blob=f.blob, handle=f.handle, offset=offset, size=n
        )
        if not isinstance(data, bytes) or len(data) != n:
            log.error("the appliance answered a read of %d bytes with %d", n, len(data))
            raise FsError(errno.EIO)
        return data

    async def _block(self, f: ThinFile, i: int) -> bytes:
        """Block ``i`` of the file: kept, on its way (then waited for), or fetched now."""
        while True:
            data = f.blocks.get(i)
            if data is not None:
                f.blocks.move_to_end(i)
                return data
            pending = f.pending.get(i)
            if pending is None:
                break
            await pending.wait()  # then kept, or failed: the next waiter fetches it
        event = f.pending[i] = trio.Event()
        try:
            offset = i * READ_BLOCK
            data = await self._fetch(f, offset, min(READ_BLOCK, f.size - offset))
        finally:
            del f.pending[i]
            event.set()
        f.blocks[i] = data
        while len(f.blocks) > KEPT_BLOCKS:
            f.blocks.popitem(last=False)
        return data

    async def _prefetch(self, f: ThinFile, i: int) -> None:
        try:
            await self._block(f, i)
        except P2pfsError as e:  # the reader will ask again, and get the error then
            log.debug("read-ahead of block %d failed: %s", i, e)

    def release(self, fh: int) -> None:
        f = self._files.pop(fh, None)
        if f is not None:
            f.node.opens -= 1
            self._maybe_drop(f.node)

    def statfs(self) -> dict[str, int]:
        # Answered here (a desktop's file manager asks often): read-only, nothing free.
        return {
            "f_bsize": BLOCK_SIZE,
            "f_frsize": BLOCK_SIZE,
            "f_blocks": 0,
            "f_bfree": 0,
            "f_bavail": 0,
            "f_files": self.inode_count,
            "f_ffree": 0,
            "f_favail": 0,
            "f_namemax": 255,
        }

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == ROOT_INO:
            raise FsError(errno.ENODATA)
        attrs = self._node(ino).attrs
        if name == XATTR_ID and attrs.get("id"):
            return bytes(attrs["id"]).hex().encode()
        if name == XATTR_SNAPSHOT and attrs.get("snapshot"):
            return bytes(attrs["snapshot"]).hex().encode()
        raise FsError(errno.ENODATA)

    async def listxattr(self, ino: int) -> list[bytes]:
        if ino == ROOT_INO:
            return []
        attrs = self._node(ino).attrs
        return [n for n, k in ((XATTR_ID, "id"), (XATTR_SNAPSHOT, "snapshot")) if attrs.get(k)]

    def unexpected(self, handler: str) -> None:
        self.errors += 1

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh


# -- the thin mount process --------------------------------------------------------


def state_dir() -> Path:
    """Where a thin mount records its pid, so ``p2pfs umount`` can find it."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "p2pfs-thin"
    if os.getuid() == 0:
        return Path("/run/p2pfs-thin")
    return Path.home() / ".cache" / "p2pfs-thin"


def state_file(mountpoint: Path) -> Path:
    return state_dir() / f"{derive(_STATE_DOMAIN, os.fsencode(mountpoint), 12).hex()}.json"


def read_state(mountpoint: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(state_file(mountpoint).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(doc, dict) or doc.get("mountpoint") != str(mountpoint):
        return None
    return doc


class ThinMount:
    def __init__(
        self,
        address: Address,
        token: DesktopToken,
        mountpoint: Path,
        *,
        deadline: float = DEFAULT_DEADLINE,
        ready_fd: int | None = None,
    ) -> None:
        self.address = address
        self.token = token
        self.mountpoint = mountpoint
        self.deadline = deadline
        self.ready = ReadyLine(ready_fd)
        self.mounted = False

    def run(self) -> int:
        try:
            return trio.run(self._main)
        except P2pfsError as e:
            self.ready.failed(e)
            raise
        finally:
            state_file(self.mountpoint).unlink(missing_ok=True)

    async def _main(self) -> int:
        check_mountpoint(self.mountpoint)
        error: P2pfsError | None = None
        async with trio.open_nursery() as nursery:
            link = ApplianceLink(self.address, self.token, self.deadline, nursery)
            try:
                # Fail before mounting when the appliance is unreachable or refuses the token.
                await link.connect()
                await self._mount(ThinFileSystem(link), nursery)
            except P2pfsError as e:
                error = e  # raised below as itself, not inside the nursery's group
                nursery.cancel_scope.cancel()
        if self.mounted:
            fuse.close(unmount=True)
            self.mounted = False
            log.info("unmounted %s", self.mountpoint)
        if error is not None:
            raise error
        return 0

    async def _mount(self, fs: ThinFileSystem, nursery: trio.Nursery) -> None:
        try:
            fuse.init(fs, str(self.mountpoint), allow_other=os.getuid() == 0)
        except RuntimeError as e:
            raise P2pfsError(f"cannot mount on {self.mountpoint}: {e}") from None
        self.mounted = True
        nursery.start_soon(self._serve_then_stop, nursery)
        nursery.start_soon(self._signals)
        await trio.to_thread.run_sync(set_readahead, self.mountpoint)
        self._write_state()
        log.info("mounted appliance %s on %s", self.address, self.mountpoint)
        self.ready.ok()

    async def _serve_then_stop(self, nursery: trio.Nursery) -> None:
        await fuse.serve()
        nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("got %s: unmounting", signal.Signals(signum).name)
                fuse.terminate()
                return

    def _write_state(self) -> None:
        path = state_file(self.mountpoint)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {
            "pid": os.getpid(),
            "mountpoint": str(self.mountpoint),
            "appliance": str(self.address),
        }
        path.write_text(json.dumps(doc) + "\n")
