"""Where the work tree keeps its inodes and names: one SQLite database (WAL).

Plain rows in, plain rows out: what a row means is ``worktree.py``'s business.
Every change is made inside ``transaction()`` by the tree, so a killed daemon
loses none; ``sync()`` makes them durable against a power cut too.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path

from p2pfs.errors import P2pfsError

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS inode (
    ino INTEGER PRIMARY KEY,
    kind INTEGER NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    atime_ns INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    blob BLOB,
    target BLOB,
    tree BLOB,
    loaded INTEGER NOT NULL DEFAULT 0,
    staged INTEGER NOT NULL DEFAULT 0,
    rdev INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS xattr (
    ino INTEGER NOT NULL,
    name BLOB NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dentry (
    parent INTEGER NOT NULL,
    name BLOB NOT NULL,
    ino INTEGER NOT NULL,
    PRIMARY KEY (parent, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS dentry_ino ON dentry (ino);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value);
"""

# In place, from the version in the key to the next: a work tree of an older daemon keeps
# every uncommitted change. (ALTER TABLE adds the column last, where _SCHEMA has it.)
_MIGRATIONS = {
    1: """
    ALTER TABLE inode ADD COLUMN rdev INTEGER NOT NULL DEFAULT 0;
    CREATE TABLE IF NOT EXISTS xattr (
        ino INTEGER NOT NULL,
        name BLOB NOT NULL,
        value BLOB NOT NULL,
        PRIMARY KEY (ino, name)
    ) WITHOUT ROWID;
    """,
}

# One inode row, in the table's column order.
InodeRow = tuple[
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    int,
    bytes | None,
    bytes | None,
    bytes | None,
    int,
    int,
    int,
]


class TreeDB:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        exists = self.db.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        version = self.meta("schema") if exists else None
        if version is None:
            self.db.executescript(_SCHEMA)
            with self.transaction():
                self.set_meta("schema", SCHEMA_VERSION)
            return
        if not isinstance(version, int) or not 1 <= version <= SCHEMA_VERSION:
            raise P2pfsError(f"{path}: work tree schema {version} is not supported")
        while version < SCHEMA_VERSION:
            with self.transaction():
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        self.db.execute(statement)
                version += 1
                self.set_meta("schema", version)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[None]:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            self.db.execute("ROLLBACK")
            raise
        self.db.execute("COMMIT")

    def meta(self, key: str) -> object:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def set_meta(self, key: str, value: object) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))

    def inodes(self) -> Iterator[InodeRow]:
        yield from self.db.execute("SELECT * FROM inode")

    def dentries(self) -> Iterator[tuple[int, bytes, int]]:
        yield from self.db.execute("SELECT parent, name, ino FROM dentry")

    def save_inode(self, row: InodeRow) -> None:
        self.db.execute(
            "INSERT OR REPLACE INTO inode VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", row
        )

    def delete_inode(self, ino: int) -> None:
        self.db.execute("DELETE FROM inode WHERE ino = ?", (ino,))
        self.db.execute("DELETE FROM xattr WHERE ino = ?", (ino,))

    def xattrs(self) -> Iterator[tuple[int, bytes, bytes]]:
        """(ino, name, value) of every extended attribute."""
        yield from self.db.execute("SELECT ino, name, value FROM xattr")

    def set_xattr(self, ino: int, name: bytes, value: bytes) -> None:
        self.db.execute("INSERT OR REPLACE INTO xattr VALUES (?, ?, ?)", (ino, name, value))

    def remove_xattr(self, ino: int, name: bytes) -> None:
        self.db.execute("DELETE FROM xattr WHERE ino = ? AND name = ?", (ino, name))

    def add_names(self, rows: Iterable[tuple[int, bytes, int]]) -> None:
        """(parent, name, ino) rows."""
        self.db.executemany("INSERT INTO dentry VALUES (?, ?, ?)", rows)

    def remove_name(self, parent: int, name: bytes) -> None:
        self.db.execute("DELETE FROM dentry WHERE parent = ? AND name = ?", (parent, name))

    def clear(self) -> None:
        """Every inode and name goes (a reset); meta stays."""
        self.db.execute("DELETE FROM inode")
        self.db.execute("DELETE FROM dentry")
        self.db.execute("DELETE FROM xattr")

    def sync(self) -> None:
        """fsync the WAL and the database (blocking)."""
        for path in (Path(f"{self.path}-wal"), self.path):
            with contextlib.suppress(FileNotFoundError):
                fd = os.open(path, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

    def close(self) -> None:
        self.db.close()
