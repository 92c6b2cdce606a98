"""The work tree's rows: fifos, sockets and devices, user.* xattrs and owners, what a
commit plans from them, and the database migrated in place from schema 1."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import pytest

from p2pfs.errors import P2pfsError
from p2pfs.objects.model import Entry, Kind
from p2pfs.volume.wnodes import ROOT
from p2pfs.volume.worktree import WorkTree
from p2pfs.volume.worktree_db import SCHEMA_VERSION

pytestmark = pytest.mark.unit

ID = bytes(range(32))


def _tree(root: Path, *, keep_owners: bool = False) -> WorkTree:
    t = WorkTree(root, uid=0, gid=0, keep_owners=keep_owners)
    if t.node(ROOT) is None:
        t.reset(None, None, 1)
    return t


def _planned(t: WorkTree) -> dict[bytes, Entry]:
    _clock, plans = t.capture()
    root = next(p for p in plans if p.ino == ROOT)
    return {e.name: e for e in root.entries}


def test_specials_and_xattrs_are_rows_and_planned(tmp_path: Path) -> None:
    t = _tree(tmp_path)
    root = t.node(ROOT)
    assert root is not None
    t.make(root, b"fifo", Kind.FIFO, 0o640, 7, 8)
    dev = t.make(root, b"null", Kind.CHR, 0o666, 0, 0, rdev=os.makedev(1, 3))
    # rdev means something for devices only.
    sock = t.make(root, b"sock", Kind.SOCKET, 0o600, 0, 0, rdev=5)
    assert sock.rdev == 0 and dev.rdev == os.makedev(1, 3)
    t.set_xattr(dev, b"user.b", b"2")
    t.set_xattr(dev, b"user.a", b"1")
    t.set_xattr(dev, b"user.gone", b"x")
    t.set_xattr(dev, b"user.gone", None)
    entries = _planned(t)
    assert entries[b"fifo"] == Entry(
        b"fifo", Kind.FIFO, 0o640, entries[b"fifo"].mtime_ns, 0, None, None
    )
    assert entries[b"null"].rdev == os.makedev(1, 3)
    assert entries[b"null"].xattrs == ((b"user.a", b"1"), (b"user.b", b"2"))
    assert all(e.owner is None for e in entries.values())  # the volume keeps no owners
    t.close()
    # Rows, numbers and attributes are in the database: a restart finds them.
    again = _tree(tmp_path)
    r = again.node(ROOT)
    assert r is not None and r.children is not None
    null = again.node(r.children[b"null"])
    assert null is not None and null.rdev == os.makedev(1, 3) and null.kind is Kind.CHR
    assert null.xattrs == {b"user.a": b"1", b"user.b": b"2"}
    fifo = again.node(r.children[b"fifo"])
    assert fifo is not None and (fifo.uid, fifo.gid) == (7, 8)
    again.close()


def test_owners_are_planned_when_the_volume_keeps_them(tmp_path: Path) -> None:
    t = _tree(tmp_path, keep_owners=True)
    root = t.node(ROOT)
    assert root is not None
    f = t.make(root, b"f", Kind.FILE, 0o644, 1000, 100)
    t.make(root, b"d", Kind.DIR, 0o755, 5, 6)
    assert t.created_fd is not None
    os.close(t.created_fd)
    t.created_fd = None
    f.staged = False
    f.blob = ID
    entries = _planned(t)
    assert entries[b"f"].owner == (1000, 100) and entries[b"d"].owner == (5, 6)
    # A chown alone changes the tree when owners are kept.
    t.set_attrs(f, uid=1, gid=2)
    assert t.is_dirty(f)
    assert _planned(t)[b"f"].owner == (1, 2)
    t.close()


def test_a_loaded_directory_takes_owners_rdev_and_xattrs_from_its_entries(tmp_path: Path) -> None:
    t = _tree(tmp_path)
    d = t.node(ROOT)
    assert d is not None
    d.children = None  # as if the root were an unloaded tree
    entries = [
        Entry(b"c", Kind.CHR, 0o600, 1, 0, None, None, rdev=os.makedev(4, 5), owner=(9, 10)),
        Entry(b"f", Kind.FILE, 0o644, 1, 3, ID, None, xattrs=((b"user.k", b"v"),)),
    ]
    t.load_dir(d, entries)
    assert d.children is not None
    c = t.node(d.children[b"c"])
    f = t.node(d.children[b"f"])
    assert c is not None and f is not None
    assert (c.uid, c.gid, c.rdev) == (9, 10, os.makedev(4, 5))
    assert (f.uid, f.gid) == (0, 0)  # carried no owner: the mounting user's
    assert f.xattrs == {b"user.k": b"v"}
    t.close()
    again = _tree(tmp_path)
    r = again.node(ROOT)
    assert r is not None and r.children is not None
    f2 = again.node(r.children[b"f"])
    assert f2 is not None and f2.xattrs == {b"user.k": b"v"}
    again.close()


_SCHEMA_1 = """
CREATE TABLE inode (
    ino INTEGER PRIMARY KEY, kind INTEGER NOT NULL, mode INTEGER NOT NULL,
    uid INTEGER NOT NULL, gid INTEGER NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, atime_ns INTEGER NOT NULL,
    nlink INTEGER NOT NULL, blob BLOB, target BLOB, tree BLOB,
    loaded INTEGER NOT NULL DEFAULT 0, staged INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE dentry (
    parent INTEGER NOT NULL, name BLOB NOT NULL, ino INTEGER NOT NULL,
    PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE INDEX dentry_ino ON dentry (ino);
CREATE TABLE meta (key TEXT PRIMARY KEY, value);
"""


def _schema_1_tree(root: Path) -> None:
    """A work tree as the daemon before schema 2 left it: a root and one file."""
    (root / "staging").mkdir(parents=True)
    db = sqlite3.connect(root / "tree.db", isolation_level=None)
    db.executescript(_SCHEMA_1)
    db.execute("INSERT INTO meta VALUES ('schema', 1)")
    db.execute("INSERT INTO meta VALUES ('base', NULL)")
    row = (ROOT, int(Kind.DIR), 0o755, 0, 0, 0, 1, 1, 1, 2, None, None, None, 1, 0)
    db.execute("INSERT INTO inode VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
    row = (2, int(Kind.FILE), 0o600, 5, 6, 3, 1, 1, 1, 1, ID, None, None, 0, 0)
    db.execute("INSERT INTO inode VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row)
    db.execute("INSERT INTO dentry VALUES (?, ?, ?)", (ROOT, b"kept", 2))
    db.close()


def test_a_schema_1_work_tree_is_migrated_in_place(tmp_path: Path) -> None:
    _schema_1_tree(tmp_path)
    t = WorkTree(tmp_path, uid=0, gid=0)
    assert t.db.meta("schema") == SCHEMA_VERSION
    root = t.node(ROOT)
    assert root is not None and root.children == {b"kept": 2}
    kept = t.node(2)
    assert kept is not None and kept.blob == ID and (kept.uid, kept.gid) == (5, 6)
    assert kept.rdev == 0 and kept.xattrs == {}
    # The new columns and table work at once, and after a reopen.
    t.set_xattr(kept, b"user.new", b"1")
    t.close()
    again = WorkTree(tmp_path, uid=0, gid=0)
    kept = again.node(2)
    assert kept is not None and kept.xattrs == {b"user.new": b"1"}
    again.close()


def test_a_newer_schema_is_refused_with_a_clear_error(tmp_path: Path) -> None:
    _tree(tmp_path).close()
    db = sqlite3.connect(tmp_path / "tree.db", isolation_level=None)
    db.execute("UPDATE meta SET value = 99 WHERE key = 'schema'")
    db.close()
    with pytest.raises(P2pfsError, match="schema 99 is not supported"):
        WorkTree(tmp_path, uid=0, gid=0)
