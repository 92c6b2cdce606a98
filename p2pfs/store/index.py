"""The store's SQLite index: the only module that imports ``sqlite3``.

Tables (docs/objects.md, "Store layout"):

- ``chunks``: one row per stored chunk or object (id, size, last access, pin
  count, where it came from). The chunk files are the truth; this index can
  always be rebuilt from them (``Store.rebuild_index``).
- ``stats``: named counters: ``corrupt_chunks`` (ever found corrupt),
  ``evictions`` (chunks ever evicted) and three totals kept by triggers in the
  same transaction as every change to ``chunks``: ``stored_chunks``,
  ``stored_bytes`` and ``pinned_bytes`` (bytes of stored chunks with pins > 0).
- ``pin_sets`` and ``pinned``: named pin sets and the ids each holds (stored or
  not). ``chunks.pins`` is the number of sets holding a chunk, kept by triggers;
  a partial index on ``last_access WHERE pins = 0`` is the LRU eviction order.
- ``intents``: what a writer is about to do to the files (``put``: a file may
  appear under this id; ``evict``: the row is gone, the file is to be deleted),
  with the writer's identity. Until it is finished an intent's bytes count
  against the quota (a put's are about to be written, an eviction's are not yet
  freed). Intents of a writer that died are finished on the next open.
- ``files``: the importer's files cache (borg's model): per volume and path, the
  (size, mtime, ctime, inode) a file had when it was last imported and the blob
  that held its content then. A file whose stat still matches is not re-read.

One connection, shared by all threads behind a lock (``check_same_thread=False``),
in WAL mode with a busy timeout so that a second process (the CLI while the daemon
runs) waits instead of failing. Writes are ``BEGIN IMMEDIATE`` transactions, so
a quota decision (read the totals, pick victims, reserve) is atomic across
processes too.

Any ``sqlite3.DatabaseError`` on open or use becomes ``IndexCorrupt``: the store
then moves the database aside and rebuilds it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .files_cache import FilesCache
from .schema import (
    EVICTIONS,
    PINNED_BYTES,
    STORED_BYTES,
    STORED_CHUNKS,
    IndexCorrupt,
    migrate,
)

log = logging.getLogger(__name__)

BUSY_TIMEOUT_MS = 30_000
# The WAL is checkpointed at this many pages and truncated back to WAL_LIMIT_BYTES
# afterwards, so the index's growth between two quota checks is bounded: the store
# keeps INDEX_HEADROOM_BYTES of the free-space floor's side for it.
WAL_CHECKPOINT_PAGES = 256
WAL_LIMIT_BYTES = 1 << 20
INDEX_HEADROOM_BYTES = 2 * WAL_LIMIT_BYTES
# Rows read per query when walking the LRU order or the whole table.
BATCH_ROWS = 512


@dataclass(frozen=True, slots=True)
class PinSet:
    name: str
    count: int  # ids in the set
    present: int  # of those, how many are stored
    present_bytes: int  # their bytes


@dataclass(frozen=True, slots=True)
class Intent:
    seq: int
    op: str  # "put" or "evict"
    id: bytes
    size: int
    owner: str


@dataclass(frozen=True, slots=True)
class Reservation:
    """The outcome of ``Index.reserve``: intents written, or why there is no room."""

    fits: bool
    put_seqs: list[int]  # the put intents (empty unless fits)
    victims: list[Intent]  # evict intents: rows already deleted, files to delete
    limit: int | None  # the effective quota applied
    stored: int  # stored bytes before any eviction
    reserved: int  # bytes of unfinished intents (all writers), before this one
    pinned: int  # stored pinned bytes
    protected: int | None  # stored unpinned bytes the protector held (None: not asked)
    ask_protector: bool = False  # eviction is needed: call again with the protected ids


class Index:
    """The chunk index, pins, intents and counters of one store (``root/index.sqlite``)."""

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
            self.db.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
            self.db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT_BYTES}")
            migrate(self.db, self.path)
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
        with self.transaction() as db:
            return _insert_chunks(db, rows, now)

    def has_chunk(self, cid: bytes) -> bool:
        return bool(self._query("SELECT 1 FROM chunks WHERE id = ?", (cid,)))

    def chunk_size(self, cid: bytes) -> int | None:
        rows = self._query("SELECT size FROM chunks WHERE id = ?", (cid,))
        return _int(rows[0][0]) if rows else None

    def chunk_ids(self) -> list[bytes]:
        return [row[0] for row in self._query("SELECT id FROM chunks") if isinstance(row[0], bytes)]

    def iter_chunks(self) -> Iterator[tuple[bytes, int]]:
        """(id, size) of every row in id order, read in batches (never all at once)."""
        after = b""
        while True:
            rows = self._query(
                "SELECT id, size FROM chunks WHERE id > ? ORDER BY id LIMIT ?", (after, BATCH_ROWS)
            )
            for cid, size in rows:
                assert isinstance(cid, bytes)
                yield cid, _int(size)
            if len(rows) < BATCH_ROWS:
                return
            last = rows[-1][0]
            assert isinstance(last, bytes)
            after = last

    # -- tags: ids of private volumes -----------------------------------------------

    def tag(self, volume: bytes, ids: Iterable[bytes]) -> None:
        with self.transaction() as db:
            db.executemany(
                "INSERT OR IGNORE INTO tags (id, volume) VALUES (?, ?)",
                ((i, volume) for i in ids),
            )

    def volumes_of(self, cid: bytes) -> list[bytes]:
        rows = self._query("SELECT volume FROM tags WHERE id = ?", (cid,))
        return [r[0] for r in rows if isinstance(r[0], bytes)]

    def tagged(self) -> dict[bytes, set[bytes]]:
        """Every tagged id and its volumes (to leave out of a peer's digest)."""
        out: dict[bytes, set[bytes]] = {}
        for cid, vol in self._query("SELECT id, volume FROM tags"):
            assert isinstance(cid, bytes) and isinstance(vol, bytes)
            out.setdefault(cid, set()).add(vol)
        return out

    def remove_chunk(self, cid: bytes) -> None:
        with self.transaction() as db:
            db.execute("DELETE FROM chunks WHERE id = ?", (cid,))

    def set_size(self, cid: bytes, size: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE chunks SET size = ? WHERE id = ?", (size, cid))

    def touch(self, touched: Mapping[bytes, int]) -> None:
        """Raise the last access of each stored id to the time given (ns)."""
        with self.transaction() as db:
            _touch(db, touched)

    def replace_chunks(self, rows: Iterable[tuple[bytes, int, str]], now: int) -> None:
        """Replace the whole chunk table (after a rebuild). Pin sets stay; intents go."""
        with self.transaction() as db:
            db.execute("DELETE FROM chunks")
            db.execute("DELETE FROM intents")
            _insert_chunks(db, rows, now)

    def usage(self) -> tuple[int, int, int, int, int]:
        """(stored chunks, stored bytes, pinned bytes, evictions, bytes of unfinished
        intents), read in one snapshot so that they agree across processes."""
        with self.snapshot() as db:
            reserved = _int(db.execute("SELECT total(size) FROM intents").fetchone()[0])
            chunks, stored, pinned, evictions = (
                _counter(db, n) for n in (STORED_CHUNKS, STORED_BYTES, PINNED_BYTES, EVICTIONS)
            )
        return chunks, stored, pinned, evictions, reserved

    def chunk_totals(self) -> tuple[int, int]:
        """(number of chunks, their total bytes), kept by triggers."""
        return self.counter(STORED_CHUNKS), self.counter(STORED_BYTES)

    # -- quota: reservations and eviction ------------------------------------------

    def reserve(
        self,
        owner: str,
        items: Sequence[tuple[bytes, int]],
        *,
        max_bytes: int | None,
        disk_room: int | None,
        protected: Collection[bytes] | None,
        touched: Mapping[bytes, int],
    ) -> Reservation:
        """Reserve room for ``items`` (id, size), evicting LRU chunks if needed.

        The effective quota is ``min(max_bytes, stored + disk_room)`` (None: no
        limit). In one transaction: apply ``touched``; if stored + reserved +
        new bytes exceed the quota, pick victims in LRU order (never pinned,
        never ``protected``), delete their rows and record evict intents; then
        record a put intent per item. If the victims cannot free enough, nothing
        is evicted or reserved and ``fits`` is False. With ``protected`` None,
        a reservation that needs eviction (and might fit) changes nothing and
        asks for the protected ids (``ask_protector``): the caller calls its
        protector without holding its own locks and tries again.
        """
        need = sum(size for _, size in items)
        with self.transaction() as db:
            _touch(db, touched)
            stored = _counter(db, STORED_BYTES)
            # Evicted files not yet deleted (by another process) still take their bytes.
            reserved = _int(db.execute("SELECT total(size) FROM intents").fetchone()[0])
            pinned = _counter(db, PINNED_BYTES)
            limit = _limit(max_bytes, disk_room, stored)
            victims: list[tuple[bytes, int]] = []
            over = 0 if limit is None else stored + reserved + need - limit
            if over > 0:
                if stored - pinned < over:
                    known = None if protected is None else _protected(db, protected)
                    return Reservation(False, [], [], limit, stored, reserved, pinned, known)
                if protected is None:
                    return Reservation(False, [], [], limit, stored, reserved, pinned, None, True)
                victims = _pick_victims(db, over, protected)
                if sum(size for _, size in victims) < over:
                    return Reservation(
                        False, [], [], limit, stored, reserved, pinned, _protected(db, protected)
                    )
            evicted = _record_evictions(db, owner, victims)
            seqs = [_insert_intent(db, "put", cid, size, owner) for cid, size in items]
        return Reservation(True, seqs, evicted, limit, stored, reserved, pinned, 0)

    def evict(
        self,
        owner: str,
        nbytes: int,
        protected: Collection[bytes],
        touched: Mapping[bytes, int],
        max_victims: int,
    ) -> list[Intent]:
        """Delete the rows of LRU unpinned unprotected chunks worth at least
        ``nbytes`` (or all there are, or ``max_victims``) and record evict intents
        for their files."""
        with self.transaction() as db:
            _touch(db, touched)
            victims = _pick_victims(db, nbytes, protected, max_victims)
            return _record_evictions(db, owner, victims)

    def commit_puts(self, seqs: Iterable[int], rows: Iterable[tuple[bytes, int, str, int]]) -> None:
        """Index the files now in place, (id, size, source, last access) each, and drop
        the batch's put intents, in one transaction. A stale row (its file had gone)
        is overwritten."""
        with self.transaction() as db:
            db.executemany(
                "INSERT INTO chunks (id, size, last_access, source) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET size = excluded.size, "
                "last_access = excluded.last_access, source = excluded.source",
                ((cid, size, t, source) for cid, size, source, t in rows),
            )
            db.executemany("DELETE FROM intents WHERE seq = ?", ((s,) for s in seqs))

    def drop_intents(self, seqs: Iterable[int]) -> None:
        with self.transaction() as db:
            db.executemany("DELETE FROM intents WHERE seq = ?", ((s,) for s in seqs))

    def has_intent(self, cid: bytes) -> bool:
        return bool(self._query("SELECT 1 FROM intents WHERE id = ? LIMIT 1", (cid,)))

    def intents(self) -> list[Intent]:
        rows = self._query("SELECT seq, op, id, size, owner FROM intents ORDER BY seq")
        out = []
        for seq, op, cid, size, owner in rows:
            assert isinstance(op, str) and isinstance(cid, bytes) and isinstance(owner, str)
            out.append(Intent(_int(seq), op, cid, _int(size), owner))
        return out

    def pin_set_names(self, limit: int) -> tuple[int, list[str]]:
        """(number of pin sets, the first ``limit`` names): cheap, for messages."""
        count = _int(self._query("SELECT count(*) FROM pin_sets")[0][0])
        rows = self._query("SELECT name FROM pin_sets ORDER BY name LIMIT ?", (limit,))
        return count, [str(r[0]) for r in rows]

    # -- pins ----------------------------------------------------------------------

    def pin(self, name: str, ids: Iterable[bytes], now: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT OR IGNORE INTO pin_sets (name, created) VALUES (?, ?)", (name, now))
            set_id = db.execute("SELECT set_id FROM pin_sets WHERE name = ?", (name,)).fetchone()[0]
            db.executemany(
                "INSERT OR IGNORE INTO pinned (set_id, id) VALUES (?, ?)",
                ((set_id, cid) for cid in ids),
            )

    def salvage_pins(self, old: Path) -> int:
        """Copy the pin sets a damaged index still yields (best effort, before a
        rebuild); returns how many sets were copied whole."""
        copied = 0
        try:
            src = sqlite3.connect(f"file:{old}?mode=ro", uri=True)
        except sqlite3.Error:
            return 0
        try:
            sets = src.execute("SELECT set_id, name, created FROM pin_sets").fetchall()
            for set_id, name, created in sets:
                try:
                    ids = [
                        r[0]
                        for r in src.execute("SELECT id FROM pinned WHERE set_id = ?", (set_id,))
                    ]
                except sqlite3.Error as e:
                    log.warning("pin set %r could not be read from %s: %s", name, old, e)
                    continue
                self.pin(str(name), (i for i in ids if isinstance(i, bytes)), int(created))
                copied += 1
        except sqlite3.Error as e:
            log.warning("no pin sets could be read from %s: %s", old, e)
        finally:
            src.close()
        return copied

    def unpin(self, name: str) -> bool:
        """Drop a pin set; False if there was none of that name."""
        with self.transaction() as db:
            row = db.execute("SELECT set_id FROM pin_sets WHERE name = ?", (name,)).fetchone()
            if row is None:
                return False
            db.execute("DELETE FROM pinned WHERE set_id = ?", (row[0],))
            db.execute("DELETE FROM pin_sets WHERE set_id = ?", (row[0],))
        return True

    def pin_sets(self) -> list[PinSet]:
        rows = self._query(
            "SELECT s.name, count(p.id), count(c.id), total(c.size) FROM pin_sets s "
            "LEFT JOIN pinned p ON p.set_id = s.set_id LEFT JOIN chunks c ON c.id = p.id "
            "GROUP BY s.set_id ORDER BY s.name"
        )
        return [PinSet(str(n), _int(k), _int(p), _int(b)) for n, k, p, b in rows]

    def pinned_missing(self, name: str) -> list[bytes] | None:
        """Ids of the set that are not stored; None if there is no such set."""
        with self.lock:
            row = self._query("SELECT set_id FROM pin_sets WHERE name = ?", (name,))
            if not row:
                return None
            rows = self._query(
                "SELECT p.id FROM pinned p WHERE p.set_id = ? "
                "AND NOT EXISTS (SELECT 1 FROM chunks c WHERE c.id = p.id) ORDER BY p.id",
                (row[0][0],),
            )
        return [r[0] for r in rows if isinstance(r[0], bytes)]

    def is_pinned(self, cid: bytes) -> bool:
        return bool(self._query("SELECT 1 FROM pinned WHERE id = ? LIMIT 1", (cid,)))

    # -- consistency (fsck) ----------------------------------------------------------

    def check_totals(self, repair: bool) -> list[str]:
        """Compare the trigger-kept totals and pin counts with a recount, in one
        consistent snapshot; fix them with ``repair``. One line per disagreement."""
        if repair:
            with self.transaction() as db:
                return _check_totals(db, repair=True)
        with self.snapshot() as db:
            return _check_totals(db, repair=False)

    @contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """The connection inside a read transaction (one consistent view), under the lock."""
        with self.lock:
            try:
                self.db.execute("BEGIN")
                try:
                    yield self.db
                finally:
                    self.db.execute("ROLLBACK")
            except sqlite3.DatabaseError as e:
                raise IndexCorrupt(f"index {self.path}: {e}") from e

    # -- counters ----------------------------------------------------------------

    def counter(self, name: str) -> int:
        rows = self._query("SELECT value FROM stats WHERE name = ?", (name,))
        return _int(rows[0][0]) if rows else 0

    def add_counter(self, name: str, delta: int = 1) -> None:
        with self.transaction() as db:
            _add_counter(db, name, delta)

    def raise_counter(self, name: str, floor: int) -> None:
        """Make the counter at least ``floor``."""
        with self.transaction() as db:
            db.execute(
                "INSERT INTO stats (name, value) VALUES (?, ?) "
                "ON CONFLICT (name) DO UPDATE SET value = max(value, excluded.value)",
                (name, floor),
            )


def _check_totals(db: sqlite3.Connection, *, repair: bool) -> list[str]:
    problems: list[str] = []
    bad_pins = _int(
        db.execute(
            "SELECT count(*) FROM chunks c "
            "WHERE pins != (SELECT count(*) FROM pinned p WHERE p.id = c.id)"
        ).fetchone()[0]
    )
    if bad_pins:
        problems.append(f"{bad_pins} chunk rows had a wrong pin count")
        if repair:
            db.execute(
                "UPDATE chunks SET pins = (SELECT count(*) FROM pinned p WHERE p.id = chunks.id) "
                "WHERE pins != (SELECT count(*) FROM pinned p WHERE p.id = chunks.id)"
            )
    count, total, pinned = db.execute(
        "SELECT count(*), coalesce(sum(size), 0), "
        "coalesce(sum(CASE WHEN pins > 0 THEN size ELSE 0 END), 0) FROM chunks"
    ).fetchone()
    for name, actual in ((STORED_CHUNKS, count), (STORED_BYTES, total), (PINNED_BYTES, pinned)):
        kept = _counter(db, name)
        if kept != actual:
            problems.append(f"counter {name} was {kept}, recounted {actual}")
            if repair:
                db.execute(
                    "INSERT OR REPLACE INTO stats (name, value) VALUES (?, ?)", (name, actual)
                )
    return problems


def _int(value: object) -> int:
    if isinstance(value, float):
        return int(value)
    assert isinstance(value, int), value
    return value


def _limit(max_bytes: int | None, disk_room: int | None, stored: int) -> int | None:
    limits = [
        x for x in (max_bytes, None if disk_room is None else stored + disk_room) if x is not None
    ]
    return max(0, min(limits)) if limits else None


def _counter(db: sqlite3.Connection, name: str) -> int:
    row = db.execute("SELECT value FROM stats WHERE name = ?", (name,)).fetchone()
    return 0 if row is None else _int(row[0])


def _add_counter(db: sqlite3.Connection, name: str, delta: int) -> None:
    db.execute(
        "INSERT INTO stats (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        (name, delta),
    )


def _insert_chunks(db: sqlite3.Connection, rows: Iterable[tuple[bytes, int, str]], now: int) -> int:
    # rowcount sums the rows each execution inserted, without the triggers' changes.
    cur = db.executemany(
        "INSERT OR IGNORE INTO chunks (id, size, last_access, source) VALUES (?, ?, ?, ?)",
        ((cid, size, now, source) for cid, size, source in rows),
    )
    return max(0, cur.rowcount)


def _touch(db: sqlite3.Connection, touched: Mapping[bytes, int]) -> None:
    if touched:
        db.executemany(
            "UPDATE chunks SET last_access = max(last_access, ?) WHERE id = ?",
            ((t, cid) for cid, t in touched.items()),
        )


def _pick_victims(
    db: sqlite3.Connection, nbytes: int, protected: Collection[bytes], max_victims: int = -1
) -> list[tuple[bytes, int]]:
    """LRU unpinned, unprotected (id, size) worth at least ``nbytes``, or all there are.

    Walks the partial LRU index in batches (keyset paging), never the whole table.
    """
    victims: list[tuple[bytes, int]] = []
    freed = 0
    after: tuple[int, bytes] = (-1, b"")
    batch = 16  # most puts need one victim or a few: grow the batch only when needed
    while freed < nbytes:
        rows = db.execute(
            "SELECT id, size, last_access FROM chunks WHERE pins = 0 "
            "AND (last_access, id) > (?, ?) ORDER BY last_access, id LIMIT ?",
            (*after, batch),
        ).fetchall()
        for cid, size, _ in rows:
            if cid in protected:
                continue
            victims.append((cid, size))
            freed += size
            if freed >= nbytes or len(victims) == max_victims:
                return victims
        if len(rows) < batch:
            break
        after = (rows[-1][2], rows[-1][0])
        batch = min(2 * batch, BATCH_ROWS)
    return victims


def _record_evictions(
    db: sqlite3.Connection, owner: str, victims: list[tuple[bytes, int]]
) -> list[Intent]:
    out = []
    for cid, size in victims:
        db.execute("DELETE FROM chunks WHERE id = ?", (cid,))
        out.append(Intent(_insert_intent(db, "evict", cid, size, owner), "evict", cid, size, owner))
    if victims:
        _add_counter(db, EVICTIONS, len(victims))
    return out


def _insert_intent(db: sqlite3.Connection, op: str, cid: bytes, size: int, owner: str) -> int:
    cur = db.execute(
        "INSERT INTO intents (op, id, size, owner) VALUES (?, ?, ?, ?)", (op, cid, size, owner)
    )
    assert cur.lastrowid is not None
    return cur.lastrowid


def _protected(db: sqlite3.Connection, protected: Collection[bytes]) -> int:
    total = 0
    for cid in protected:
        row = db.execute("SELECT size FROM chunks WHERE id = ? AND pins = 0", (cid,)).fetchone()
        if row is not None:
            total += row[0]
    return total
