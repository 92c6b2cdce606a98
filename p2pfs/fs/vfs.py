"""What the volumes look like as a filesystem, free of FUSE.

The FUSE adapter (``fuse.py``) only unpacks arguments and calls one method
here (the interface is ``api.Filesystem``). Inode numbers, lookup counts,
open-file tables, cache policy and errno choices live in this module and are
tested without a mount.

The root directory lists the volumes; each volume's directory is the root tree
of its head snapshot. When a volume's head changes, its name resolves to a new
inode: files opened before keep reading the version they opened.

Atomicity: every table here is touched only from the trio thread; each handler
mutates tables either before its first await or after its last one, so a
concurrent handler never sees a half-made node.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import trio

from p2pfs.errors import P2pfsError
from p2pfs.ids import ID_SIZE
from p2pfs.objects.model import Entry, Kind, Snapshot
from p2pfs.volume.content import SEQUENTIAL_SLACK, Content, FileLayout, read_ahead, read_span
from p2pfs.volume.history import snapshot_dirs

from .api import BLOCK_SIZE, TYPE_BITS, Attr, FsError, Opened, attr_timeout, check_name_length
from .changes import WritableRouting
from .page_cache import PageOffers
from .writable import SLOT_SHIFT

log = logging.getLogger(__name__)

ROOT_INO = 1
XATTR_ID = b"user.p2pfs.id"
XATTR_SNAPSHOT = b"user.p2pfs.snapshot"
# Content under a snapshot never changes, so the kernel may keep it long.
IMMUTABLE_TIMEOUT = 3600.0
# The root's entries move to new snapshots: keep them short.
ROOT_TIMEOUT = 1.0
# Every volume's root has a hidden .snapshots/ (not listed, found by name) holding
# one read-only directory per snapshot still reachable: .snapshots/<seq>/.
SNAPSHOTS_DIR = b".snapshots"
# The id of that synthetic directory: all zeros, which no BLAKE3 output will be.
SNAPSHOTS_ID = bytes(32)
MAX_HISTORY = 10_000


@dataclass(frozen=True)
class FsStats:
    errors: int  # handler bugs answered EIO
    inodes: int  # snapshot inodes the kernel holds


@dataclass(frozen=True)
class Head:
    """A volume's snapshot as the filesystem shows it; ``root``: the ref of its root
    tree (the snapshot's root id, or for a private volume that id and its key)."""

    snapshot_id: bytes
    snapshot: Snapshot
    root: bytes = b""

    def __post_init__(self) -> None:
        if not self.root:
            object.__setattr__(self, "root", self.snapshot.root)


class Node:
    __slots__ = (
        "entry",
        "ino",
        "key",
        "lookups",
        "opens",
        "parent",
        "snapshot_id",
        "subdirs",
        "volume",
    )

    def __init__(
        self,
        ino: int,
        parent: int,
        entry: Entry,
        volume: str,
        snapshot_id: bytes,
        key: tuple[int, bytes] | None,
    ) -> None:
        self.ino = ino
        self.parent = parent
        self.entry = entry
        self.volume = volume
        self.snapshot_id = snapshot_id
        self.key = key
        self.lookups = 0
        self.opens = 0
        # A directory's subdirectories (st_nlink 2 + this), counted once from its tree:
        # content under a snapshot never changes. None: not counted yet.
        self.subdirs: int | None = None


@dataclass
class OpenFile:
    node: Node
    layout: FileLayout
    next_offset: int = 0  # where a sequential reader will read next


@dataclass
class OpenDir:
    ino: int
    names: list[bytes]
    entries: Sequence[Entry] | None  # None for the root (volumes)
    snapshot_ids: list[bytes] | None = None  # per entry, in .snapshots/


class FileSystem(WritableRouting):
    def __init__(
        self,
        content: Content,
        heads: Callable[[], Mapping[str, Head]],
        *,
        uid: int | None = None,
        gid: int | None = None,
        root_of: Callable[[Snapshot], bytes] | None = None,
        snapshots: bool = True,
    ) -> None:
        self.content = content
        self.heads = heads
        # Whether each volume's root has the hidden .snapshots/ (off: that name is looked
        # up like any other). An appliance's policy ([appliance] desktop_snapshots) for the
        # mount that SMB shares, the same as for its desktop link.
        self.snapshots = snapshots
        # The root ref of an older snapshot (.snapshots/): a private one's root key
        # opens with its epoch's secret. P2pfsError if this node cannot.
        self.root_of: Callable[[Snapshot], bytes] = root_of or (lambda snap: snap.root)
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self._nodes: dict[int, Node] = {}
        self._by_key: dict[tuple[int, bytes], int] = {}
        self._next_ino = ROOT_INO + 1
        self._files: dict[int, OpenFile] = {}
        self._dirs: dict[int, OpenDir] = {}
        self._next_fh = 1
        WritableRouting.__init__(self)
        self._nursery: trio.Nursery | None = None
        # Set by the mount: where a random read's verified chunks go to the page cache.
        self.page_offers: PageOffers | None = None
        self.errors = 0  # unexpected failures turned into EIO (reported by the adapter)
        # Handlers armed to fail with an unexpected exception until disarmed (the kernel
        # retries a failed readahead with a second read): a test hook, reachable only
        # through the admin control operation of a daemon started with --debug-faults.
        self.faults: set[str] = set()

    def attach(self, nursery: trio.Nursery) -> None:
        """Give the filesystem a nursery for background read-ahead."""
        self._nursery = nursery

    def _shows_snapshots(self, volume: str) -> bool:
        """Whether ``volume``'s root has the hidden .snapshots/ (it has a head)."""
        return self.snapshots and volume in self.heads()

    # -- nodes --------------------------------------------------------------

    def _root_attr(self) -> Attr:
        # Every volume is a directory here: a set union of two small maps.
        nlink = 2 + len({*self.heads(), *self.writable})
        return Attr(
            ROOT_INO,
            stat.S_IFDIR | 0o755,
            0,
            0,
            nlink,
            self.uid,
            self.gid,
            ROOT_TIMEOUT,
            ROOT_TIMEOUT,
        )

    def _attr(self, node: Node) -> Attr:
        e = node.entry
        timeout = ROOT_TIMEOUT if node.parent == ROOT_INO else IMMUTABLE_TIMEOUT
        if e.kind is Kind.DIR:
            # 2 + subdirectories, as ext4 and tmpfs count: find(1) stops stat-ing entries
            # once it has seen that many directories, so the count is exact or 1 ("unknown",
            # before _count ran: then the kernel must not keep it, see _attr_timeout).
            mode = stat.S_IFDIR
            nlink = 1 if node.subdirs is None else 2 + node.subdirs
        else:
            mode, nlink = TYPE_BITS[e.kind], 1
        # Owners as carried (a volume made with --keep-owners), by number, as an NFS client
        # shows them; else the mounting user's.
        uid, gid = e.owner if e.owner is not None else (self.uid, self.gid)
        return Attr(
            node.ino,
            mode | e.mode,
            e.size,
            e.mtime_ns,
            nlink,
            uid,
            gid,
            timeout,
            # .snapshots/'s count changes with every commit: the kernel must not keep it
            # (a count too low would hide the newest snapshot from find(1)).
            0.0 if e.id == SNAPSHOTS_ID else attr_timeout(mode, nlink, timeout),
            rdev=e.rdev,
        )

    async def _count(self, node: Node) -> None:
        """Count a directory's subdirectories for its st_nlink. That needs its tree object
        loaded (from the store, or fetched from a peer) when it is not in the cache yet: a
        lookup or stat of a directory is followed by its readdir in practice, which needs
        the same tree, so the load is paid once; the count then stays on the node."""
        e = node.entry
        # .snapshots/ gains a directory with every commit (a writable volume's, under one
        # inode): counted again at every stat, like its listing at every opendir.
        again = e.id == SNAPSHOTS_ID
        if e.kind is not Kind.DIR or (node.subdirs is not None and not again) or e.id is None:
            return
        try:
            if again:
                count = len(await self._history(node))  # every .snapshots/<seq> is a dir
            else:
                tree, _names = await self.content.tree(e.id)
                count = sum(1 for x in tree.entries if x.kind is Kind.DIR)
                if node.parent == ROOT_INO and self.snapshots:
                    count += 1  # a volume's hidden .snapshots/ (a count too high is safe)
        except P2pfsError as err:
            # The tree is unreachable now: a stat needs no listing, so answer "unknown"
            # (its readdir will report the error).
            log.debug("nlink of %s: %s", e.name, err)
            return
        node.subdirs = count

    def _node(self, ino: int) -> Node:
        node = self._nodes.get(ino)
        if node is None:
            raise FsError(errno.ENOENT)
        return node

    def _remember(self, parent: int, entry: Entry, volume: str, snapshot_id: bytes) -> Node:
        """The node for (parent, name), created on first sight; counts one lookup."""
        key = (parent, entry.name)
        ino = self._by_key.get(key)
        node = self._nodes.get(ino) if ino is not None else None
        if node is None or node.snapshot_id != snapshot_id:
            if node is not None:  # the name moved to a newer snapshot
                node.key = None
            ino = self._next_ino
            self._next_ino += 1
            node = Node(ino, parent, entry, volume, snapshot_id, key)
            self._nodes[ino] = node
            self._by_key[key] = ino
        node.lookups += 1
        return node

    def forget(self, ino: int, count: int) -> None:
        w = self._slots.get(ino >> SLOT_SHIFT) if ino >> SLOT_SHIFT else None
        if w is not None:
            w.forget(ino, count)
            return
        node = self._nodes.get(ino)
        if node is None or ino == ROOT_INO:
            return
        node.lookups = max(0, node.lookups - count)
        self._maybe_drop(node)

    def _maybe_drop(self, node: Node) -> None:
        if node.lookups == 0 and node.opens == 0:
            del self._nodes[node.ino]
            if node.key is not None and self._by_key.get(node.key) == node.ino:
                del self._by_key[node.key]

    @property
    def inode_count(self) -> int:
        return len(self._nodes)

    def statistics(self) -> FsStats:
        return FsStats(errors=self.errors, inodes=self.inode_count)

    def _volume_entry(self, name: str, head: Head) -> Entry:
        snap = head.snapshot
        return Entry(name.encode(), Kind.DIR, 0o755, snap.time_ns, 0, head.root, None)

    async def _dir_listing(self, ino: int) -> tuple[list[bytes], Sequence[Entry] | None]:
        if ino == ROOT_INO:
            names = sorted(n.encode() for n in {*self.heads(), *self.writable})
            return names, None
        node = self._node(ino)
        if node.entry.kind is not Kind.DIR:
            raise FsError(errno.ENOTDIR)
        assert node.entry.id is not None
        tree, names = await self.content.tree(node.entry.id)
        return names, tree.entries

    async def _history(self, snapdir: Node) -> list[tuple[Entry, bytes]]:
        """(entry of .snapshots/<seq>, snapshot id) for every snapshot still reachable,
        sorted by name; each parent fetched if needed and checked to continue the volume."""
        head = self.heads().get(snapdir.volume)
        if head is None:
            raise FsError(errno.ENOENT)
        return await snapshot_dirs(
            self.content,
            head.snapshot_id,
            head.snapshot,
            MAX_HISTORY,
            volume=snapdir.volume,
            root_of=self.root_of,
        )

    # -- handlers -----------------------------------------------------------

    async def lookup(self, parent: int, name: bytes) -> Attr:
        if name == b".":
            return await self._lookup_self(parent)
        if name == b"..":
            return await self._lookup_self(self._parent_of(parent))
        # Before any other answer: Linux filesystems say so in their lookup, so every
        # operation that names an entry (stat, open, mkdir, rename...) says it too.
        check_name_length(name)
        w = self._w(parent)
        if w is not None:
            if parent == w.root_ino and name == SNAPSHOTS_DIR and self.snapshots:
                return await self._snapshots_dir(parent, w.name)
            return self._wattr(w, await w.lookup(parent, name))
        if parent == ROOT_INO:
            w = self.writable.get(name.decode(errors="surrogateescape"))
            if w is not None:
                await w.count_subdirs(w.root_ino)
                return self._wattr(w, w.lookup_self(w.root_ino))
            heads = self.heads()
            head = heads.get(name.decode(errors="surrogateescape"))
            if head is None:
                raise FsError(errno.ENOENT)
            vol = name.decode()
            node = self._remember(ROOT_INO, self._volume_entry(vol, head), vol, head.snapshot_id)
            await self._count(node)
            return self._attr(node)
        pnode = self._node(parent)
        if pnode.entry.kind is not Kind.DIR:
            raise FsError(errno.ENOTDIR)
        assert pnode.entry.id is not None
        if pnode.parent == ROOT_INO and name == SNAPSHOTS_DIR and self.snapshots:
            return await self._snapshots_dir(parent, pnode.volume)
        if pnode.entry.id == SNAPSHOTS_ID:
            for entry, sid in await self._history(pnode):
                if entry.name == name:
                    return await self._counted(self._remember(parent, entry, pnode.volume, sid))
            raise FsError(errno.ENOENT)
        tree, names = await self.content.tree(pnode.entry.id)
        i = _find(names, name)
        if i < 0:
            raise FsError(errno.ENOENT)
        node = self._remember(parent, tree.entries[i], pnode.volume, pnode.snapshot_id)
        return await self._counted(node)

    async def _counted(self, node: Node) -> Attr:
        """``node``'s attributes with its subdirectories counted (the lookup counted
        already: a forget meanwhile leaves the node in the table)."""
        await self._count(node)
        return self._attr(node)

    def _parent_of(self, ino: int) -> int:
        if ino == ROOT_INO:
            return ROOT_INO
        w = self._w(ino)
        if w is not None:
            return w.parent_ino(ino) or ROOT_INO
        return self._node(ino).parent

    async def _snapshots_dir(self, parent: int, volume: str) -> Attr:
        head = self.heads().get(volume)
        if head is None:  # nothing committed yet
            raise FsError(errno.ENOENT)
        entry = Entry(SNAPSHOTS_DIR, Kind.DIR, 0o555, head.snapshot.time_ns, 0, SNAPSHOTS_ID, None)
        return await self._counted(self._remember(parent, entry, volume, head.snapshot_id))

    async def _lookup_self(self, ino: int) -> Attr:
        if ino == ROOT_INO:
            return self._root_attr()
        w = self._w(ino)
        if w is not None:
            await w.count_subdirs(ino)
            return self._wattr(w, w.lookup_self(ino))
        node = self._node(ino)
        node.lookups += 1
        return await self._counted(node)

    def _fault(self, handler: str) -> None:
        if handler in self.faults:
            raise RuntimeError(f"injected fault in {handler}")

    async def getattr(self, ino: int) -> Attr:
        self._fault("getattr")
        if ino == ROOT_INO:
            return self._root_attr()
        w = self._w(ino)
        if w is not None:
            return self._wattr(w, await w.getattr(ino))
        return await self._counted(self._node(ino))

    async def readlink(self, ino: int) -> bytes:
        w = self._w(ino)
        if w is not None:
            return w.readlink(ino)
        node = self._node(ino)
        if node.entry.kind is not Kind.SYMLINK or node.entry.target is None:
            raise FsError(errno.EINVAL)
        return node.entry.target

    async def opendir(self, ino: int) -> int:
        w = self._w(ino)
        if w is not None:
            return await w.opendir(ino)
        node = self._nodes.get(ino)
        if node is not None and node.entry.id == SNAPSHOTS_ID:
            history = await self._history(node)
            listing = OpenDir(
                ino, [e.name for e, _ in history], [e for e, _ in history], [s for _, s in history]
            )
        else:
            names, entries = await self._dir_listing(ino)
            listing = OpenDir(ino, names, entries)
        fh = self._new_fh()
        self._dirs[fh] = listing
        return fh

    def readdir(self, fh: int, start: int) -> Iterator[tuple[bytes, Attr, int]]:
        """Entries from offset ``start``; each yielded entry counts one lookup.

        The adapter must call ``forget(ino, 1)`` for an entry the kernel did not take.
        """
        w = self._w(fh)
        if w is not None:
            for name, wattr, nxt in w.readdir(fh, start):
                yield name, self._wattr(w, wattr), nxt
            return
        d = self._dirs.get(fh)
        if d is None:
            raise FsError(errno.EBADF)
        if d.entries is None:
            heads = self.heads()
            for i in range(start, len(d.names)):
                vol = d.names[i].decode()
                wv = self.writable.get(vol)
                if wv is not None:
                    yield d.names[i], self._wattr(wv, wv.lookup_self(wv.root_ino)), i + 1
                    continue
                head = heads.get(vol)
                if head is None:  # removed since opendir
                    continue
                node = self._remember(
                    ROOT_INO, self._volume_entry(vol, head), vol, head.snapshot_id
                )
                yield d.names[i], self._attr(node), i + 1
            return
        parent = self._nodes.get(d.ino)
        if parent is None:
            return
        for i in range(start, len(d.entries)):
            sid = d.snapshot_ids[i] if d.snapshot_ids else parent.snapshot_id
            node = self._remember(d.ino, d.entries[i], parent.volume, sid)
            yield d.names[i], self._attr(node), i + 1

    def releasedir(self, fh: int) -> None:
        w = self._w(fh)
        if w is not None:
            w.releasedir(fh)
            return
        self._dirs.pop(fh, None)

    async def open(self, ino: int, flags: int) -> Opened:
        w = self._w(ino)
        if w is not None:
            # Every change to a work-tree file's bytes goes through this kernel (writes,
            # truncation, fallocate, copy_file_range keep its page cache in step), and a
            # reset to a snapshot made elsewhere gives every file a new inode: the pages
            # the kernel holds for an inode stay right, and a re-read of a clean file
            # need not come back through the daemon.
            return Opened(await w.open(ino, flags), keep_cache=True)
        node = self._node(ino)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise FsError(errno.EROFS)
        if node.entry.kind is Kind.DIR:
            raise FsError(errno.EISDIR)
        if node.entry.kind is not Kind.FILE or node.entry.id is None:
            raise FsError(errno.EINVAL)
        layout = await self.content.layout(node.entry.id)
        if layout.size != node.entry.size:
            log.error(
                "blob %s size %d != entry size %d",
                node.entry.id.hex(),
                layout.size,
                node.entry.size,
            )
            raise FsError(errno.EIO)
        fh = self._new_fh()
        node.opens += 1
        self._files[fh] = OpenFile(node, layout)
        # Content under a snapshot's inode never changes: the kernel may keep its pages.
        return Opened(fh, keep_cache=True)

    def open_chunk_ids(self) -> set[bytes]:
        """Chunks of open files (never evicted while open). Called from store threads:
        list() copies the values in one step under the GIL."""
        return {cid[:ID_SIZE] for f in list(self._files.values()) for cid in f.layout.ids}

    def release(self, fh: int) -> None:
        w = self._w(fh)
        if w is not None:
            w.release(fh)
            return
        f = self._files.pop(fh, None)
        if f is not None:
            f.node.opens -= 1
            self._maybe_drop(f.node)

    async def read(self, fh: int, offset: int, size: int) -> bytes | memoryview:
        self._fault("read")
        w = self._w(fh)
        if w is not None:
            return await w.read(fh, offset, size, self._nursery)
        f = self._files.get(fh)
        if f is None:
            raise FsError(errno.EBADF)
        layout = f.layout
        end = min(offset + size, layout.size)
        if offset >= end:
            return b""
        chunks = self.content.chunks
        # The kernel keeps several readahead requests in flight, so they may arrive
        # slightly out of order: near the last end still counts as sequential.
        sequential = abs(offset - f.next_offset) <= SEQUENTIAL_SLACK
        f.next_offset = max(end, f.next_offset) if sequential else end
        data = await read_span(chunks, layout, offset, end, scan=sequential)
        if sequential and self._nursery is not None:
            read_ahead(chunks, layout, end, self._nursery, self.content.readahead_window())
        elif not sequential and self.page_offers is not None:
            self.page_offers.after_random_read(f.node.ino, layout, chunks, offset, end)
        return data

    def unexpected(self, handler: str) -> None:
        self.errors += 1

    def statfs(self) -> dict[str, int]:
        st = os.statvfs(self.content.store.root)
        # Writable volumes take what the disk holding the staging files has left.
        free = st.f_bavail * st.f_frsize // BLOCK_SIZE if self.writable else 0
        files = self.inode_count + sum(len(w.tree.nodes) for w in self.writable.values())
        return {
            "f_bsize": BLOCK_SIZE,
            "f_frsize": BLOCK_SIZE,
            "f_blocks": st.f_blocks * st.f_frsize // BLOCK_SIZE,
            "f_bfree": free,
            "f_bavail": free,
            "f_files": files + (st.f_favail if self.writable else 0),
            "f_ffree": st.f_favail if self.writable else 0,
            "f_favail": st.f_favail if self.writable else 0,
            "f_namemax": 255,
        }

    async def getxattr(self, ino: int, name: bytes) -> bytes:
        if ino == ROOT_INO:
            raise FsError(errno.ENODATA)
        w = self._w(ino)
        if w is not None:
            n = w.node(ino)
            if name in n.xattrs:
                return n.xattrs[name]
            oid = w.tree.object_id(n)
            if name == XATTR_ID and oid is not None:
                return oid.hex().encode()
            raise FsError(errno.ENODATA)
        node = self._node(ino)
        if name == XATTR_ID and node.entry.id is not None:
            return node.entry.id.hex().encode()
        if name == XATTR_SNAPSHOT:
            return node.snapshot_id.hex().encode()
        for key, value in node.entry.xattrs:
            if key == name:
                return value
        raise FsError(errno.ENODATA)

    async def listxattr(self, ino: int) -> list[bytes]:
        if ino == ROOT_INO:
            return []
        w = self._w(ino)
        if w is not None:
            n = w.node(ino)
            names = sorted(n.xattrs)
            return [*names, XATTR_ID] if w.tree.object_id(n) is not None else names
        node = self._node(ino)
        names = [key for key, _ in node.entry.xattrs]
        if node.entry.id is not None:
            names.append(XATTR_ID)
        return [*names, XATTR_SNAPSHOT]

    def _new_fh(self) -> int:
        fh = self._next_fh
        self._next_fh += 1
        return fh


def _find(names: list[bytes], name: bytes) -> int:
    i = bisect_left(names, name)
    return i if i < len(names) and names[i] == name else -1
