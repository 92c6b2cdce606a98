"""The importer's files cache (borg's model), kept in the store's index.

Per volume and path: the (size, mtime, ctime, inode) a file had when it was last
imported and the blob that held its content then. A file whose stat still matches
is not read again.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol


class _Rows(Protocol):
    """What the cache needs of the index (``index.Index``)."""

    def _query(self, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]: ...
    def transaction(self) -> AbstractContextManager[Any]: ...


@dataclass(frozen=True, slots=True)
class CachedFile:
    size: int
    mtime_ns: int
    ctime_ns: int
    ino: int
    blob_id: bytes


class FilesCache:
    """The importer's files cache, per volume: path -> CachedFile."""

    def __init__(self, index: _Rows) -> None:
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
