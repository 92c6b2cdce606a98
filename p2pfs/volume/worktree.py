"""The publisher's editable copy of a volume: inodes in SQLite (``worktree_db.py``), changed
file data in staging files.

A work tree starts as the volume's head snapshot and is loaded lazily: a directory
not yet visited is one row holding its tree id; visiting it turns its entries into
rows. A file is either *clean* (its content is a stored blob) or *staged* (its
content is the file ``staging/<ino>``, written in place by the mount). Staged files
are chunked into the store after their last writer closes them ("absorbed"), and a
commit turns the tree into tree objects and a signed snapshot (``publish.py``).

Durability, as POSIX promises it: every metadata change is one SQLite transaction
(WAL, synchronous=NORMAL), so a killed daemon loses none of them; ``sync()`` (what
fsync runs) makes the WAL and the staging files durable against a power cut too.
A staged file's size and mtime are those of its staging file, which the kernel keeps
exact, so writes need no database row.

Single-threaded: the trio thread calls every method (each is a few SQLite statements
on the page cache); chunking and fsync run elsewhere and report back.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Sequence
from pathlib import Path

from p2pfs.objects.model import SPECIAL_KINDS, Entry, Kind

from .wnodes import (
    RENAME_EXCHANGE,
    RENAME_NOREPLACE,
    ROOT,
    Chunked,
    DirPlan,
    TreeError,
    WNode,
    entry_of,
)
from .worktree_db import TreeDB

log = logging.getLogger(__name__)


class WorkTree:
    def __init__(self, root: Path, *, uid: int, gid: int, keep_owners: bool = False) -> None:
        self.root = root
        # Whether commits record every entry's uid and gid (the volume's --keep-owners).
        self.keep_owners = keep_owners
        self.staging = root / "staging"
        self.staging.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.db_path = root / "tree.db"
        self.db = TreeDB(self.db_path)
        self.nodes: dict[int, WNode] = {}
        self.clock = 1
        self.captured = 0  # clock of the last capture: nodes changed after it are dirty
        self._default_owner = (uid, gid)
        # The open staging file of the file ``make`` just created, for the caller to keep
        # (its first write needs it; opening it again costs a path walk).
        self.created_fd: int | None = None
        self._load()

    # -- persistence --------------------------------------------------------------

    def _save(self, n: WNode) -> None:
        self.db.save_inode(
            (
                n.ino,
                int(n.kind),
                n.mode,
                n.uid,
                n.gid,
                n.size,
                n.mtime_ns,
                n.ctime_ns,
                n.atime_ns,
                n.nlink,
                n.blob,
                n.target,
                n.tree if not n.loaded else None,
                int(n.loaded),
                int(n.staged),
                n.rdev,
            ),
        )

    def _load(self) -> None:
        for row in self.db.inodes():
            (
                ino,
                kind,
                mode,
                uid,
                gid,
                size,
                mtime,
                ctime,
                atime,
                nlink,
                blob,
                target,
                tree,
                loaded,
                staged,
                rdev,
            ) = row
            n = WNode(ino, Kind(kind), mode, uid, gid)
            n.rdev = rdev
            n.size, n.mtime_ns, n.ctime_ns, n.atime_ns = size, mtime, ctime, atime
            n.nlink = nlink
            n.blob, n.target, n.tree, n.staged = blob, target, tree, bool(staged)
            if loaded:
                n.children, n.subdirs = {}, 0  # counted from the names below
            self.nodes[ino] = n
        for parent, name, ino in self.db.dentries():
            p, child = self.nodes.get(parent), self.nodes.get(ino)
            if p is None or child is None or p.children is None:
                log.warning("work tree %s: dropping a dangling name %r", self.root, name)
                continue
            p.children[name] = ino
            child.links.add((parent, name))
            if child.kind is Kind.DIR and p.subdirs is not None:
                p.subdirs += 1
        for ino, xname, value in self.db.xattrs():
            if (x := self.nodes.get(ino)) is not None:
                x.xattrs[xname] = value
        # Never reuse a number: the kernel may still hold one from before a reset.
        saved = self.db.meta("next_ino")
        self.next_ino = max(
            max(self.nodes, default=ROOT) + 1, saved if isinstance(saved, int) else 0
        )
        self._recover()

    def _recover(self) -> None:
        """Finish what a killed daemon left: orphans, staging files, dirty marks."""
        with self.db.transaction():
            for n in [n for n in self.nodes.values() if n.ino != ROOT and not n.links]:
                self._delete(n)
        on_disk = {p.name: p for p in self.staging.iterdir()}
        for name, path in on_disk.items():
            owner = self.nodes.get(int(name)) if name.isdigit() else None
            if owner is None or not owner.staged:
                path.unlink()  # a temp of an unfinished copy, or an absorbed file
        for n in self.nodes.values():
            if not n.staged:
                continue
            try:
                st = os.stat(self.staging_path(n.ino))
            except FileNotFoundError:
                log.error("work tree %s: staged file %d lost its data", self.root, n.ino)
                os.close(os.open(self.staging_path(n.ino), os.O_CREAT | os.O_WRONLY, 0o600))
                st = os.stat(self.staging_path(n.ino))
            n.size, n.mtime_ns = st.st_size, st.st_mtime_ns
        # Tree ids of loaded directories are not kept: the first commit makes them again.
        self.clock += 1
        for n in self.nodes.values():
            n.changed = self.clock if (n.loaded or n.staged) else 0

    def sync(self) -> None:
        """Make every change so far durable (blocking: run it in a worker thread)."""
        self.db.sync()
        fd = os.open(self.staging, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.db.close()

    # -- the base snapshot ----------------------------------------------------------

    @property
    def base(self) -> bytes | None:
        """The snapshot this tree was last committed as or reset to."""
        value = self.db.meta("base")
        return value if isinstance(value, bytes) else None

    @property
    def dirty(self) -> bool:
        return bool(self.db.meta("dirty")) or any(n.staged for n in self.nodes.values())

    def reset(self, snapshot_id: bytes | None, root_tree: bytes | None, time_ns: int) -> None:
        """Start again from a snapshot (None: an empty volume), dropping every change."""
        with self.db.transaction():
            self.db.clear()
            self.db.set_meta("next_ino", self.next_ino)
            self.db.set_meta("base", snapshot_id)
            self.db.set_meta("dirty", 0)
            self.nodes.clear()
            root = WNode(ROOT, Kind.DIR, 0o755, *self._default_owner)
            root.mtime_ns = root.ctime_ns = root.atime_ns = time_ns
            if root_tree is None:
                root.children, root.subdirs = {}, 0
            else:
                root.tree, root.tree_clock = root_tree, self.clock
            self.nodes[ROOT] = root
            self._save(root)
        for path in self.staging.iterdir():
            path.unlink()

    def committed(self, snapshot_id: bytes, clock: int) -> None:
        """A snapshot of the tree as captured at ``clock`` is now the volume's head."""
        with self.db.transaction():
            self.db.set_meta("base", snapshot_id)
            if not any(n.changed > clock for n in self.nodes.values()):
                self.db.set_meta("dirty", 0)

    # -- reading ----------------------------------------------------------------------

    def node(self, ino: int) -> WNode | None:
        return self.nodes.get(ino)

    def child(self, parent: WNode, name: bytes) -> WNode | None:
        assert parent.children is not None
        ino = parent.children.get(name)
        return self.nodes[ino] if ino is not None else None

    def staging_path(self, ino: int) -> Path:
        return self.staging / str(ino)

    def load_dir(self, d: WNode, entries: Sequence[Entry]) -> None:
        """Turn an unloaded directory's tree entries into rows."""
        if d.loaded:
            return
        children: dict[bytes, int] = {}
        new: list[WNode] = []
        for e in entries:
            n = WNode(self.next_ino, e.kind, e.mode, *(e.owner or self._default_owner))
            self.next_ino += 1
            n.size, n.mtime_ns, n.ctime_ns, n.atime_ns = e.size, e.mtime_ns, e.mtime_ns, e.mtime_ns
            n.rdev, n.xattrs = e.rdev, dict(e.xattrs)
            if e.kind is Kind.FILE:
                n.blob = e.id
            elif e.kind is Kind.DIR:
                n.tree, n.tree_clock = e.id, self.clock
            elif e.kind is Kind.SYMLINK:
                n.target = e.target
            n.links.add((d.ino, e.name))
            children[e.name] = n.ino
            new.append(n)
        with self.db.transaction():
            for n in new:
                self._save(n)
                for xname, value in n.xattrs.items():
                    self.db.set_xattr(n.ino, xname, value)
            self.db.add_names((d.ino, k, v) for k, v in children.items())
            d.children = children
            d.subdirs = sum(1 for e in entries if e.kind is Kind.DIR)
            self._save(d)  # loaded: its tree id now lives in its children
        for n in new:
            self.nodes[n.ino] = n
        # Still the same content: the directory's tree id stays valid.
        d.tree_clock = max(d.tree_clock, d.changed)

    # -- change tracking -------------------------------------------------------------

    def touch(self, n: WNode) -> None:
        """Mark ``n`` and every directory above it changed (their trees must be remade)."""
        self.clock += 1
        stack = [n]
        while stack:
            x = stack.pop()
            # Above a node changed since the last capture, everything is marked already.
            if x is not n and x.changed > self.captured:
                continue
            x.changed = self.clock
            stack.extend(self.nodes[p] for p, _ in x.links if p in self.nodes)
        if not self._dirty_marked:
            self.db.set_meta("dirty", 1)
            self._dirty_marked = True

    _dirty_marked = False

    def is_dirty(self, n: WNode) -> bool:
        return n.changed > self.captured

    # -- changes ----------------------------------------------------------------------

    def _name_check(self, parent: WNode, name: bytes) -> None:
        if parent.kind is not Kind.DIR:
            raise TreeError(errno.ENOTDIR)
        if parent.children is None:
            raise AssertionError("directory not loaded")
        if parent.ino not in self.nodes or (parent.ino != ROOT and not parent.links):
            raise TreeError(errno.ENOENT)  # a removed directory
        if name in parent.children:
            raise TreeError(errno.EEXIST)

    def make(
        self,
        parent: WNode,
        name: bytes,
        kind: Kind,
        mode: int,
        uid: int,
        gid: int,
        target: bytes | None = None,
        rdev: int = 0,
    ) -> WNode:
        """A new file (staged, empty), directory, symlink, fifo, socket or device (``rdev``)
        named ``name`` in ``parent``."""
        self._name_check(parent, name)
        now = time.time_ns()
        n = WNode(self.next_ino, kind, stat.S_IMODE(mode), uid, gid)
        self.next_ino += 1
        n.mtime_ns = n.ctime_ns = n.atime_ns = now
        if kind is Kind.DIR:
            n.children, n.subdirs = {}, 0
        elif kind is Kind.SYMLINK:
            n.target, n.size = target, len(target or b"")
        elif kind in SPECIAL_KINDS:
            n.rdev = rdev if kind in (Kind.CHR, Kind.BLK) else 0
        else:
            # The staging file exists before the row that names it (see _recover). Its
            # mtime is set to ours: recovery takes a staged file's mtime from it.
            flags = os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC
            self.created_fd = os.open(self.staging_path(n.ino), flags, 0o600)
            os.utime(self.created_fd, ns=(now, now))
            n.staged = True
        with self.db.transaction():
            self._save(n)
            self._add_name(parent, name, n, now)
        self.nodes[n.ino] = n
        return n

    def _add_name(self, parent: WNode, name: bytes, n: WNode, now: int) -> None:
        assert parent.children is not None
        self.db.add_names([(parent.ino, name, n.ino)])
        parent.children[name] = n.ino
        n.links.add((parent.ino, name))
        if n.kind is Kind.DIR and parent.subdirs is not None:
            parent.subdirs += 1  # its ".." is one more link to the parent
        parent.mtime_ns = parent.ctime_ns = now
        self._save(parent)
        self.touch(n)

    def _remove_name(self, parent: WNode, name: bytes, n: WNode, now: int) -> None:
        assert parent.children is not None
        self.db.remove_name(parent.ino, name)
        del parent.children[name]
        if n.kind is Kind.DIR and parent.subdirs is not None:
            parent.subdirs -= 1
        self.touch(n)  # before the link goes: the old parents' trees change
        n.links.discard((parent.ino, name))
        parent.mtime_ns = parent.ctime_ns = now
        self._save(parent)

    def link(self, n: WNode, parent: WNode, name: bytes) -> None:
        if n.kind is Kind.DIR:
            raise TreeError(errno.EPERM)
        self._name_check(parent, name)
        now = time.time_ns()
        with self.db.transaction():
            n.nlink += 1
            n.ctime_ns = now
            self._save(n)
            self._add_name(parent, name, n, now)

    def unlink(self, parent: WNode, name: bytes) -> WNode:
        """Remove a non-directory's name; the node lives on while open or looked up."""
        n = self._existing(parent, name)
        if n.kind is Kind.DIR:
            raise TreeError(errno.EISDIR)
        now = time.time_ns()
        with self.db.transaction():
            self._remove_name(parent, name, n, now)
            n.nlink -= 1
            n.ctime_ns = now
            self._save(n)
        return n

    def rmdir(self, parent: WNode, name: bytes) -> WNode:
        n = self._existing(parent, name)
        if n.kind is not Kind.DIR:
            raise TreeError(errno.ENOTDIR)
        assert n.children is not None, "load a directory before removing it"
        if n.children:
            raise TreeError(errno.ENOTEMPTY)
        now = time.time_ns()
        with self.db.transaction():
            self._remove_name(parent, name, n, now)
            n.nlink = 0
            self._save(n)
        return n

    def _existing(self, parent: WNode, name: bytes) -> WNode:
        if parent.children is None:
            raise AssertionError("directory not loaded")
        n = self.child(parent, name)
        if n is None:
            raise TreeError(errno.ENOENT)
        return n

    def rename(self, p1: WNode, n1: bytes, p2: WNode, n2: bytes, flags: int = 0) -> WNode | None:
        """rename(2) with NOREPLACE and EXCHANGE; returns a node that lost its last name."""
        src = self._existing(p1, n1)
        if p2.kind is not Kind.DIR:
            raise TreeError(errno.ENOTDIR)
        assert p2.children is not None, "load the target directory first"
        dst = self.child(p2, n2)
        if src.kind is Kind.DIR and self._is_below(p2, src):
            raise TreeError(errno.EINVAL)
        if flags & RENAME_EXCHANGE:
            if dst is None:
                raise TreeError(errno.ENOENT)
            if dst.kind is Kind.DIR and self._is_below(p1, dst):
                raise TreeError(errno.EINVAL)
        elif dst is not None:
            if flags & RENAME_NOREPLACE:
                raise TreeError(errno.EEXIST)
            if dst is src:
                return None  # two names of one file: POSIX says do nothing
            if src.kind is Kind.DIR and dst.kind is not Kind.DIR:
                raise TreeError(errno.ENOTDIR)
            if src.kind is not Kind.DIR and dst.kind is Kind.DIR:
                raise TreeError(errno.EISDIR)
            if dst.kind is Kind.DIR:
                assert dst.children is not None, "load a directory before replacing it"
                if dst.children:
                    raise TreeError(errno.ENOTEMPTY)
        now = time.time_ns()
        gone = None
        with self.db.transaction():
            if flags & RENAME_EXCHANGE:
                assert dst is not None
                self._remove_name(p1, n1, src, now)
                self._remove_name(p2, n2, dst, now)
                self._add_name(p2, n2, src, now)
                self._add_name(p1, n1, dst, now)
                for x in (src, dst):
                    x.ctime_ns = now
                    self._save(x)
            else:
                if dst is not None:
                    self._remove_name(p2, n2, dst, now)
                    dst.nlink = 0 if dst.kind is Kind.DIR else dst.nlink - 1
                    dst.ctime_ns = now
                    self._save(dst)
                    if dst.nlink == 0:
                        gone = dst
                self._remove_name(p1, n1, src, now)
                self._add_name(p2, n2, src, now)
                src.ctime_ns = now
                self._save(src)
        return gone

    def _is_below(self, d: WNode, ancestor: WNode) -> bool:
        """Whether directory ``d`` is ``ancestor`` or inside it."""
        x: WNode | None = d
        while x is not None:
            if x is ancestor:
                return True
            if x.ino == ROOT or not x.links:
                return False
            x = self.nodes.get(x.parent)
        return False

    def set_attrs(
        self,
        n: WNode,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        mtime_ns: int | None = None,
        atime_ns: int | None = None,
    ) -> None:
        now = time.time_ns()
        if atime_ns is not None:
            n.atime_ns = atime_ns
        if mode is not None:
            n.mode = stat.S_IMODE(mode)
        if uid is not None:
            n.uid = uid
        if gid is not None:
            n.gid = gid
        if mtime_ns is not None:
            n.mtime_ns = mtime_ns
            if n.staged:
                os.utime(self.staging_path(n.ino), ns=(mtime_ns, mtime_ns))
        n.ctime_ns = now
        owner_changed = self.keep_owners and (uid is not None or gid is not None)
        with self.db.transaction():
            self._save(n)
            if mode is not None or mtime_ns is not None or owner_changed:
                self.touch(n)

    def set_xattr(self, n: WNode, name: bytes, value: bytes | None) -> None:
        """Set (or with None remove) an extended attribute: it is in the next commit."""
        if value is None:
            n.xattrs.pop(name, None)
        else:
            n.xattrs[name] = value
        n.ctime_ns = time.time_ns()
        with self.db.transaction():
            if value is None:
                self.db.remove_xattr(n.ino, name)
            else:
                self.db.set_xattr(n.ino, name, value)
            self._save(n)
            self.touch(n)

    def staged_now(self, n: WNode) -> None:
        """``n``'s content now lives in its staging file (made by the caller)."""
        n.staged, n.blob = True, None
        n.gen += 1
        with self.db.transaction():
            self._save(n)
            self.touch(n)

    def wrote(self, n: WNode, end: int) -> None:
        """Bytes up to ``end`` were written to ``n``'s staging file (no database row)."""
        n.gen += 1
        if end > n.size:
            n.size = end
        n.mtime_ns = n.ctime_ns = time.time_ns()
        if not self.is_dirty(n):
            with self.db.transaction():
                self.touch(n)

    def resized(self, n: WNode, size: int) -> None:
        n.gen += 1
        n.size = size
        n.mtime_ns = n.ctime_ns = time.time_ns()
        self.stamp(n)
        with self.db.transaction():
            self._save(n)
            self.touch(n)

    def stamp(self, n: WNode) -> None:
        """Give a staged file's staging file our mtime (recovery reads it from there): at
        truncate, last close and fsync, so a restart shows the same mtime."""
        if n.staged:
            with contextlib.suppress(FileNotFoundError):
                os.utime(self.staging_path(n.ino), ns=(n.mtime_ns, n.mtime_ns))

    def save(self, n: WNode) -> None:
        """Record a staged file's size and mtime (at close and fsync)."""
        with self.db.transaction():
            self._save(n)

    def absorbed(self, done: list[tuple[WNode, Chunked]]) -> list[WNode]:
        """Staging files were chunked into the store (one transaction for all): the nodes
        that became clean, whose staging files the caller deletes once this is durable.
        A node written since, or still open for writing, stays staged."""
        clean = []
        for n, chunked in done:
            if not n.staged or n.gen != chunked.gen:
                continue
            n.chunked = chunked
            if n.writers or n.ino not in self.nodes:
                continue
            n.staged, n.blob, n.size = False, chunked.blob, chunked.size
            clean.append(n)
        if clean:
            with self.db.transaction():
                for n in clean:
                    self._save(n)
        return clean

    def forgettable(self, n: WNode) -> bool:
        """A node with no name, no open file and no kernel reference: gone for good."""
        return n.ino != ROOT and not n.links and n.opens == 0 and n.lookups == 0

    def drop(self, n: WNode) -> None:
        with self.db.transaction():
            self._delete(n)

    def _delete(self, n: WNode) -> None:
        self.db.delete_inode(n.ino)
        self.nodes.pop(n.ino, None)
        if n.staged:
            with contextlib.suppress(FileNotFoundError):
                self.staging_path(n.ino).unlink()

    # -- commit support ------------------------------------------------------------------

    def staged_nodes(self) -> list[WNode]:
        return [n for n in self.nodes.values() if n.staged and n.links]

    def capture(self) -> tuple[int, list[DirPlan]]:
        """Every directory whose tree must be made again, children first, as it is now.

        A staged file enters with its last chunked content; one never chunked is
        left out (it enters the next commit). Returns the clock of the capture.
        """
        clock = self.clock
        self.clock += 1
        self.captured = clock
        self._dirty_marked = False
        plans: list[DirPlan] = []
        self._plan(self.nodes[ROOT], plans)
        return clock, plans

    def _plan(self, d: WNode, plans: list[DirPlan]) -> bool:
        """Append plans for ``d``'s subtree; False if ``d``'s stored tree id still holds."""
        if d.children is None:
            return False  # never loaded: its tree is as stored
        if d.tree is not None and d.tree_clock >= d.changed:
            return False
        entries: list[Entry] = []
        subdirs: dict[bytes, int] = {}
        keep = self.keep_owners
        for name in sorted(d.children):
            c = self.nodes[d.children[name]]
            if c.kind is Kind.DIR:
                if self._plan(c, plans):
                    subdirs[name] = c.ino
                    entries.append(entry_of(name, c, size=0, id=bytes(32), keep_owners=keep))
                else:
                    assert c.tree is not None
                    entries.append(entry_of(name, c, size=0, id=c.tree, keep_owners=keep))
            elif c.kind is Kind.SYMLINK:
                entries.append(
                    entry_of(name, c, size=c.size, id=None, target=c.target, keep_owners=keep)
                )
            elif c.kind in SPECIAL_KINDS:
                entries.append(entry_of(name, c, size=0, id=None, keep_owners=keep))
            elif not c.staged:
                assert c.blob is not None
                entries.append(entry_of(name, c, size=c.size, id=c.blob, keep_owners=keep))
            elif c.chunked is not None:
                ch = c.chunked
                entries.append(entry_of(name, c, size=ch.size, id=ch.blob, keep_owners=keep))
        plans.append(DirPlan(d.ino, entries, subdirs))
        return True

    def set_tree(self, ino: int, tree_id: bytes, clock: int) -> None:
        """A planned directory's tree object is stored: valid until the next change."""
        d = self.nodes.get(ino)
        if d is not None and d.tree_clock < clock:
            d.tree, d.tree_clock = tree_id, clock

    def object_id(self, n: WNode) -> bytes | None:
        """A clean file's blob id, an unchanged directory's tree id (else None)."""
        if n.kind is Kind.FILE:
            return None if n.staged else n.blob
        unchanged = n.children is None or n.tree_clock >= n.changed
        return n.tree if n.kind is Kind.DIR and unchanged else None

    def root_tree(self) -> bytes | None:
        return self.nodes[ROOT].tree
