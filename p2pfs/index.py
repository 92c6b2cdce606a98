"""The store's SQLite index: the only module that imports ``sqlite3``.

Tables:

- ``chunks``: one row per stored chunk or object (id, size, last access, pins,
  where it came from). The chunk files are the truth; this index can always be
  rebuilt from them (``Store.rebuild_index``).
- ``stats``: named counters (``corrupt_chunks``: chunks ever found corrupt).
- ``files``: the importer's files cache (borg's model): per volume and path, the
  (size, mtime, ctime, inode) a file had when it was last imported and the blob
  that held its content then. A file whose stat still matches is not re-read.

One connection, shared by all threads behind a lock (``check_same_thread=False``),
in WAL mode with a busy timeout so that a second process (the CLI while the daemon
runs) waits instead of failing. Every statement is short.

Any ``sqlite3.DatabaseError`` on open or use becomes ``IndexCorrupt``: the store
then moves the database aside and rebuilds it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .errors import IntegrityError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 30_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS chunks (
    id BLOB PRIMARY KEY,
    size INTEGER NOT NULL,
    last_access INTEGER NOT NULL,
    pins INTEGER NOT NULL DEFAULT 0,
    source TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS stats (
    name TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS files (
    volume TEXT NOT NULL,
    path BLOB NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    ino INTEGER NOT NULL,
    blob_id BLOB NOT NULL,
    PRIMARY KEY (volume, path)
) WITHOUT ROWID;
"""


class IndexCorrupt(IntegrityError):
    """The index database is unreadable or malformed."""


@dataclass(frozen=True, slots=True)
class CachedFile:
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    blob_id: bytes


class Index:
    """The chunk index and counters of one store (``root/index.sqlite``)."""

    def __init__(self, path: Path, *, check: bool = True) -> None:
        self.path = Path(path)
        self.lock = threading.RLock()
        self.created = not self.path.exists()
        try:
            self.db = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_MS / 1000,
                check_same_thread=False,
                isolation_level=None,
            )
        except sqlite3.Error as e:
            raise IndexCorrupt(f"cannot open index {self.path}: {e}") from None
        try:
            self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            self.db.execute("PRAGMA journal_mode = WAL")
            self.db.execute("PRAGMA synchronous = NORMAL")
            version = self.db.execute("PRAGMA user_version").fetchone()[0]
            if version not in (0, SCHEMA_VERSION):
                raise IndexCorrupt(f"index {self.path} has unknown schema version {version}")
            self.db.executescript(_SCHEMA)
            self.db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if check:
                result = self.db.execute("PRAGMA quick_check").fetchall()
                if result != [("ok",)]:
                    raise IndexCorrupt(f"index {self.path} fails its check: {result[:3]}")
            self.db.execute("SELECT count(*), total(size) FROM chunks").fetchone()
        except IndexCorrupt:
            self.db.close()
            raise
        except sqlite3.Error as e:
            self.db.close()
            raise IndexCorrupt(f"index {self.path} is unreadable: {e}") from None
        self.files = FilesCache(self)

    def close(self) -> None:
        with self.lock:
            self.db.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """The connection inside BEGIN IMMEDIATE .. COMMIT, under the lock."""
        with self.lock:
            try:
                self.db.execute("BEGIN IMMEDIATE")
                try:
                    yield self.db
                except BaseException:
                    self.db.execute("ROLLBACK")
                    raise
                self.db.execute("COMMIT")
            except sqlite3.DatabaseError as e:
                raise IndexCorrupt(f"index {self.path}: {e}") from e

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
        with self.lock:
            try:
                return self.db.execute(sql, args).fetchall()
            except sqlite3.DatabaseError as e:
                raise IndexCorrupt(f"index {self.path}: {e}") from e

    # -- chunks ------------------------------------------------------------------

    def add_chunks(self, rows: Iterable[tuple[bytes, int, str]], now: int) -> int:
        """Insert (id, size, source) rows not yet present; returns how many were new."""
        new = 0
        with self.transaction() as db:
            for cid, size, source in rows:
                cur = db.execute(
                    "INSERT OR IGNORE INTO chunks (id, size, last_access, source) VALUES (?, ?, ?, ?)",
                    (cid, size, now, source),
                )
                new += cur.rowcount
        return new

    def has_chunk(self, cid: bytes) -> bool:
        return bool(self._query("SELECT 1 FROM chunks WHERE id = ?", (cid,)))

    def chunk_ids(self) -> list[bytes]:
        return [row[0] for row in self._query("SELECT id FROM chunks") if isinstance(row[0], bytes)]

    def remove_chunk(self, cid: bytes) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM chunks WHERE id = ?", (cid,))

    def touch(self, cids: Iterable[bytes], now: int) -> None:
        with self.transaction() as db:
            db.executemany(
                "UPDATE chunks SET last_access = ? WHERE id = ?", ((now, c) for c in cids)
            )

    def replace_chunks(self, rows: Iterable[tuple[bytes, int, str]], now: int) -> None:
        """Replace the whole chunk table (after a rebuild), keeping pins of survivors."""
        with self.transaction() as db:
            pins = dict(db.execute("SELECT id, pins FROM chunks WHERE pins > 0").fetchall())
            db.execute("DELETE FROM chunks")
            db.executemany(
                "INSERT OR REPLACE INTO chunks (id, size, last_access, pins, source) VALUES (?, ?, ?, ?, ?)",
                ((cid, size, now, pins.get(cid, 0), source) for cid, size, source in rows),
            )

    def chunk_totals(self) -> tuple[int, int]:
        """(number of chunks, their total bytes)."""
        count, total = self._query("SELECT count(*), total(size) FROM chunks")[0]
        assert isinstance(count, int) and isinstance(total, float | int)
        return count, int(total)

    # -- counters ----------------------------------------------------------------

    def counter(self, name: str) -> int:
        rows = self._query("SELECT value FROM stats WHERE name = ?", (name,))
        value = rows[0][0] if rows else 0
        assert isinstance(value, int)
        return value

    def add_counter(self, name: str, delta: int = 1) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT INTO stats (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                (name, delta),
            )

    def raise_counter(self, name: str, floor: int) -> None:
        """Make the counter at least ``floor``."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO stats (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
                (name, floor),
            )


class FilesCache:
    """The importer's files cache, per volume: path -> CachedFile."""

    def __init__(self, index: Index) -> None:
        self._index = index

    def lookup(self, volume: str, path: bytes) -> CachedFile | None:
        rows = self._index._query(
            "SELECT size, mtime_ns, ctime_ns, ino, blob_id FROM files WHERE volume = ? AND path = ?",
            (volume, path),
        )
        if not rows:
            return None
        size, mtime_ns, ctime_ns, ino, blob_id = rows[0]
        assert isinstance(size, int) and isinstance(mtime_ns, int) and isinstance(ctime_ns, int)
        assert isinstance(ino, int) and isinstance(blob_id, bytes)
        return CachedFile(size, mtime_ns, ctime_ns, ino, blob_id)

    def replace(self, volume: str, rows: Iterable[tuple[bytes, CachedFile]]) -> None:
        """Replace the whole cache of ``volume`` with ``rows``, in one transaction."""
        with self._index.transaction() as db:
            db.execute("DELETE FROM files WHERE volume = ?", (volume,))
            db.executemany(
                "INSERT OR REPLACE INTO files (volume, path, size, mtime_ns, ctime_ns, ino, blob_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    (volume, path, f.size, f.mtime_ns, f.ctime_ns, f.ino, f.blob_id)
                    for path, f in rows
                ),
            )

    def count(self, volume: str) -> int:
        value = self._index._query("SELECT count(*) FROM files WHERE volume = ?", (volume,))[0][0]
        assert isinstance(value, int)
        return value
