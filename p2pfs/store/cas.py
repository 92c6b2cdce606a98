"""The local content-addressed store: one file per chunk or object, and an index.

Layout under ``root`` (docs/objects.md, "Store layout"):

- ``chunks/xx/yy/<64 hex digits>``: a chunk's or object's bytes, named by its
  BLAKE3-256 id; ``xx`` and ``yy`` are the id's first two bytes in hex.
- ``tmp/``: files being written (``<pid>-<random>.tmp``); renamed into
  ``chunks/`` only once complete and durable, so a crash never leaves a half
  chunk under a real id. Temp files of dead processes are removed on open.
- ``quarantine/``: files that failed verification, kept for inspection.
- ``index.sqlite``: the index (``index.py``). The chunk files are the truth:
  a missing, truncated or garbage index is moved aside and rebuilt from them.

Every read verifies the bytes against the id. A mismatch moves the file to
``quarantine/``, drops its index row, adds one to the persistent
``corrupt_chunks`` counter and raises ``CorruptChunk``: a wrong byte is never
returned.

Quota and pins: ``quota.py``. Pinned chunks and those of open files are never evicted.

Crash safety. Files change only after an intent naming them is committed
(put: reserve, write, rename, index; evict: delete row + record intent, unlink,
drop intent), so after a kill -9 the index and the files disagree only about
ids named by intents of a dead writer; opening the store finishes them
(``_recover``). ``fsck`` compares everything.

All methods block (disk, fsync, hashing): trio callers run them with
``trio.to_thread.run_sync``. They are safe to call from several threads at
once: files are only ever created by an atomic rename, the index is behind its
own lock, and the check-then-act sequences (reserve and evict victims; does the
file exist? rename it in and index it) are under ``self._lock``. The protector
is called without that lock held.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from p2pfs.errors import (
    CorruptChunk,
    IntegrityError,
    MissingChunk,
    NotFound,
    UsageError,
)
from p2pfs.fsutil import pid_alive, syncfs, token_alive, write_all
from p2pfs.ids import ID_SIZE, ChunkId, matches
from p2pfs.objects.model import object_id

from .files_cache import FilesCache
from .fsck import FsckMixin, FsckReport
from .index import Index, Intent, PinSet
from .quota import CacheUsage, Quota, QuotaExceeded
from .schema import PINNED_BYTES, IndexCorrupt

__all__ = ["CacheUsage", "FsckReport", "PinSet", "QuotaExceeded", "Store", "StoreStats"]

log = logging.getLogger(__name__)

CORRUPT_COUNTER = "corrupt_chunks"
# put_many's durability barrier: "syncfs" (one syncfs(2) on the store's file
# system for the whole batch) or "fsync" (one fsync(2) per file). Measured in
# docs/objects.md: syncfs is faster for batches of small chunks on ext4.
BATCH_BARRIER = "syncfs"
# touch() and get() note accesses in memory; they reach the index at most this
# often, when this many are pending, before any eviction, and on close.
TOUCH_FLUSH_SECONDS = 5.0
TOUCH_FLUSH_MAX = 50_000
MAX_PIN_NAME = 4096  # bytes of UTF-8


@dataclass(frozen=True)
class StoreStats:
    chunks: int  # chunks and objects in the index
    bytes: int  # their total size
    corrupt_chunks: int  # chunks ever found corrupt (persistent)
    quarantined: int  # files now in quarantine/


def _check_id(cid: bytes) -> None:
    if not isinstance(cid, bytes) or len(cid) != ID_SIZE:
        raise UsageError(f"a chunk id must be {ID_SIZE} bytes")


def _checked_ids(ids: Iterable[bytes]) -> Iterator[bytes]:
    for cid in ids:
        _check_id(cid)
        yield cid


def _check_pin_name(name: str) -> None:
    if not isinstance(name, str) or not name:
        raise UsageError("a pin name must be a non-empty string")
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError("a pin name must be valid Unicode (no lone surrogates)") from None
    if len(raw) > MAX_PIN_NAME:
        raise UsageError(f"a pin name must be at most {MAX_PIN_NAME} bytes of UTF-8")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise UsageError("a pin name must not contain control characters")


def _discard(paths: Iterable[str | Path | None]) -> None:
    for p in paths:
        if p is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(p)


class Store(FsckMixin):
    """A local CAS of chunks and objects under ``root``, with pins and a quota."""

    def __init__(
        self,
        root: Path,
        *,
        max_bytes: int | None = None,
        min_free_bytes: int = 0,
        evict_to_fit: bool = True,
    ) -> None:
        """Open (or create) the store. With a quota it evicts at once to fit it, unless
        ``evict_to_fit`` is False (a reader that only reports, such as offline status)."""
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.index_path = self.root / "index.sqlite"
        # The per-chunk paths as plain strings: pathlib cost a fifth of a small-file import.
        self._chunks_str = str(self.chunks_dir)
        self._tmp_prefix = f"{self.tmp_dir}/{os.getpid()}-{secrets.token_hex(8)}-"
        self._tmp_seq = itertools.count()
        for d in (self.root, self.chunks_dir, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.RLock()  # re-entrant: fsck and recovery quarantine under it
        Quota._check(max_bytes, min_free_bytes)  # before anything is opened
        self._touch_lock = threading.Lock()
        self._touched: dict[bytes, int] = {}
        self._last_flush = time.monotonic()
        self._clock = 0
        self._clean_tmp()
        self.index = self._open_index()
        self.quota = Quota(
            self.root,
            self.index,
            self._lock,
            self.path_of,
            self._take_touched,
            max_bytes=max_bytes,
            min_free_bytes=min_free_bytes,
        )
        self._recover()
        if self.quota.limited and evict_to_fit:
            self.quota.fit()

    # -- opening, recovering and rebuilding ----------------------------------------

    def _open_index(self) -> Index:
        try:
            index = Index(self.index_path)
        except IndexCorrupt as e:
            aside = self.index_path.with_name(f"index.sqlite.corrupt-{time.time_ns()}")
            log.error("%s; moving it to %s and rebuilding from the chunk files", e, aside.name)
            for suffix in ("", "-wal", "-shm"):
                src = Path(str(self.index_path) + suffix)
                if src.exists():
                    os.replace(src, Path(str(aside) + suffix))
            index = Index(self.index_path)
            self.index = index
            sets = index.salvage_pins(Path(str(aside)))
            if sets:
                log.warning("kept %d pin sets from the damaged index", sets)
            self.rebuild_index()
            return index
        self.index = index
        if index.created and self._any_chunk_file():
            log.warning("index %s was missing; rebuilding it from the chunk files", self.index_path)
            self.rebuild_index()
        return index

    def _any_chunk_file(self) -> bool:
        for _ in self._chunk_files():
            return True
        return False

    def _chunk_files(self) -> Iterable[Path]:
        for d1 in sorted(self.chunks_dir.iterdir()):
            if not d1.is_dir():
                continue
            for d2 in sorted(d1.iterdir()):
                if not d2.is_dir():
                    continue
                yield from sorted(d2.iterdir())

    def _dead_temp_files(self) -> list[Path]:
        dead = []
        for p in self.tmp_dir.iterdir():
            pid_text = p.name.split("-", 1)[0]
            if not (pid_text.isdigit() and pid_alive(int(pid_text))):
                dead.append(p)
        return dead

    def _clean_tmp(self) -> None:
        """Remove temp files left by processes that are gone."""
        for p in self._dead_temp_files():
            with contextlib.suppress(OSError):
                p.unlink()
                log.info("removed stale temp file %s", p)

    def _recover(self, intents: list[Intent] | None = None) -> list[str]:
        """Finish the puts and evictions of writers that died (kill -9, power cut).

        A put intent's file, if it was renamed into place, is verified and
        indexed; an evict intent's file is deleted unless the id was stored
        again since. Returns what was done, one line each.
        """
        if intents is None:
            intents = [i for i in self.index.intents() if not token_alive(i.owner)]
        done: list[str] = []
        if not intents:
            return done
        with self._lock:
            for i in sorted(intents, key=lambda i: i.op != "put"):  # puts first
                path = self.path_of(i.id)
                if i.op == "put":
                    try:
                        data = path.read_bytes()
                    except FileNotFoundError:
                        done.append(f"put of {i.id.hex()} never completed; dropped")
                        continue
                    if not matches(i.id, data):
                        self._quarantine(path, i.id)
                        done.append(f"put of {i.id.hex()} left a corrupt file; quarantined")
                        continue
                    if self.index.add_chunks([(i.id, len(data), "recovered")], self._now()):
                        done.append(f"put of {i.id.hex()} completed; indexed")
                elif not self.index.has_chunk(i.id):
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        done.append(f"eviction of {i.id.hex()} completed; file deleted")
            self.index.drop_intents(i.seq for i in intents)
        log.warning(
            "finished %d puts or evictions of a writer that died: %d changes",
            len(intents),
            len(done),
        )
        return done

    def rebuild_index(self) -> tuple[int, list[ChunkId]]:
        """Rebuild the chunk index from the chunk files, verifying each one.

        Files whose bytes do not match their name are quarantined and counted;
        files whose name is not an id are quarantined too. Pin sets are kept.
        Returns (good, bad ids).
        """
        rows: list[tuple[bytes, int, str]] = []
        bad: list[ChunkId] = []
        for path in self._chunk_files():
            cid = self._id_of(path)
            if cid is None:
                log.warning("quarantining stray file %s in the store", path)
                self._quarantine(path, None)
                continue
            try:
                data = path.read_bytes()
            except OSError as e:
                log.warning("cannot read %s while rebuilding: %s", path, e)
                continue
            if not matches(cid, data):
                self._quarantine(path, cid)
                bad.append(ChunkId(cid))
                continue
            rows.append((cid, len(data), "rebuilt"))
        self.index.replace_chunks(rows, time.time_ns())
        # The counter lived in the old index; what is in quarantine/ is a floor.
        self.index.raise_counter(CORRUPT_COUNTER, self._quarantine_count())
        log.info("index rebuilt: %d chunks, %d corrupt", len(rows), len(bad))
        return len(rows), bad

    def close(self) -> None:
        with contextlib.suppress(IndexCorrupt):
            self.flush_touches()
        self.index.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def files_cache(self) -> FilesCache:
        return self.index.files

    # -- paths ---------------------------------------------------------------------

    def _shard_dir(self, cid: bytes) -> Path:
        h = cid.hex()
        return self.chunks_dir / h[0:2] / h[2:4]

    def path_of(self, cid: bytes) -> Path:
        _check_id(cid)
        return self._shard_dir(cid) / cid.hex()

    def _file_of(self, cid: bytes) -> str:
        """``path_of`` for an id already checked, as a str: the put and read paths."""
        h = cid.hex()
        return f"{self._chunks_str}/{h[0:2]}/{h[2:4]}/{h}"

    def _id_of(self, path: Path) -> bytes | None:
        """The id a file under chunks/ is named by, or None if it is not in its place."""
        try:
            cid = bytes.fromhex(path.name)
        except ValueError:
            return None
        if len(cid) != ID_SIZE or path.name != cid.hex() or path.parent != self._shard_dir(cid):
            return None
        return cid

    def _temp(self) -> tuple[int, str]:
        path = f"{self._tmp_prefix}{next(self._tmp_seq)}.tmp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return fd, path

    def _now(self) -> int:
        """Nanoseconds since the epoch, strictly increasing within this Store (LRU order)."""
        with self._touch_lock:
            self._clock = max(time.time_ns(), self._clock + 1)
            return self._clock

    # -- quota ---------------------------------------------------------------------

    def set_quota(self, max_bytes: int | None, min_free_bytes: int = 0) -> None:
        """Change the quota; evicts (LRU, unpinned, unprotected) until the store fits it,
        as far as pins and the protector allow."""
        self.quota.set(max_bytes, min_free_bytes)

    def set_protector(self, protect: Callable[[], Collection[bytes]] | None) -> None:
        """``protect()`` answers the ids that must not be evicted right now (chunks
        of open files). It is called at eviction time, from the evicting thread,
        without the store's lock held."""
        self.quota.set_protector(protect)

    def evict(self, nbytes: int) -> tuple[int, int]:
        """Evict LRU, unpinned, unprotected chunks worth at least ``nbytes`` (or all there
        are): returns (chunks evicted, bytes freed)."""
        return self.quota.evict(nbytes)

    def cache_usage(self) -> CacheUsage:
        return self.quota.usage()

    # -- access times --------------------------------------------------------------

    def touch(self, cids: Iterable[bytes]) -> None:
        """Mark ids as just used (LRU). Kept in memory; see TOUCH_FLUSH_SECONDS."""
        now = self._now()
        with self._touch_lock:
            for cid in cids:
                self._touched[cid] = now
        self._maybe_flush()

    def _take_touched(self) -> dict[bytes, int]:
        with self._touch_lock:
            touched, self._touched = self._touched, {}
            self._last_flush = time.monotonic()
        return touched

    def _maybe_flush(self) -> None:
        if (
            len(self._touched) >= TOUCH_FLUSH_MAX
            or time.monotonic() - self._last_flush >= TOUCH_FLUSH_SECONDS
        ):
            self.flush_touches()

    def flush_touches(self) -> None:
        """Write the access times noted in memory to the index."""
        touched = self._take_touched()
        if touched:
            self.index.touch(touched)

    # -- pins ----------------------------------------------------------------------

    def pin(self, name: str, ids: Iterable[bytes]) -> None:
        """Add ids to pin set ``name`` (creating it), in one transaction. Ids need
        not be stored yet: a pin is recorded before its chunks are fetched."""
        _check_pin_name(name)
        self.index.pin(name, _checked_ids(ids), time.time_ns())

    def unpin(self, name: str) -> None:
        """Drop pin set ``name``; its chunks become evictable (unless another set holds
        them). NotFound if there is no such set."""
        _check_pin_name(name)
        if not self.index.unpin(name):
            raise NotFound(f"no pin set named {name!r}")

    def pin_sets(self) -> list[PinSet]:
        return self.index.pin_sets()

    def pinned_missing(self, name: str) -> list[bytes]:
        """Ids of pin set ``name`` that are not stored (what a resumed pin must fetch)."""
        _check_pin_name(name)
        missing = self.index.pinned_missing(name)
        if missing is None:
            raise NotFound(f"no pin set named {name!r}")
        return missing

    def is_pinned(self, cid: bytes) -> bool:
        _check_id(cid)
        return self.index.is_pinned(cid)

    def pinned_bytes(self) -> int:
        """Bytes of stored pinned chunks, each counted once."""
        return self.index.counter(PINNED_BYTES)

    # -- writing -------------------------------------------------------------------

    def chunk_ids(self) -> list[bytes]:
        """Every id the index lists (chunks and objects): what this node can serve."""
        return self.index.chunk_ids()

    def tag(self, volume: bytes, ids: Iterable[bytes]) -> None:
        """Record that ``ids`` belong to private volume ``volume`` (stored or not yet)."""
        self.index.tag(volume, ids)

    def volumes_of(self, cid: bytes) -> list[bytes]:
        """The private volumes ``cid`` belongs to; empty for a public one."""
        return self.index.volumes_of(cid)

    def tagged(self) -> dict[bytes, set[bytes]]:
        return self.index.tagged()

    def has(self, cid: bytes) -> bool:
        _check_id(cid)
        return os.path.exists(self._file_of(cid))

    def put(
        self,
        cid: bytes,
        data: bytes | memoryview,
        *,
        verify: bool = True,
        source: str = "local",
        durable: bool = True,
    ) -> bool:
        """Store ``data`` under ``cid``; True if it was not stored before.

        With ``verify`` (the default) the bytes must hash to ``cid``, else
        IntegrityError and nothing is stored. QuotaExceeded (nothing stored) if
        the quota leaves no room. ``durable=False`` skips the fsync: for chunks
        fetched into the cache, which peers or the origin still hold; a file torn
        by a power cut fails verification when read, is quarantined and fetched
        again (an fsync per fetched chunk cost a quarter of a peer read's CPU).
        """
        _check_id(cid)
        if verify and not matches(cid, data):
            raise IntegrityError(f"data does not hash to chunk id {cid.hex()}; not stored")
        if os.path.exists(self._file_of(cid)):
            return False
        size = len(memoryview(data).cast("B"))
        seqs = self.quota.reserve([(cid, size)])
        tmp: str | None = None
        try:
            fd, tmp = self._temp()
            try:
                write_all(fd, data)
                if durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
        except BaseException:
            _discard([tmp])  # before the reservation ends: the bytes stay counted
            self.quota.abandon(seqs, size)
            raise
        return self._commit(seqs, [(cid, tmp, size)], size, source) == 1

    def put_many(
        self,
        items: Iterable[tuple[bytes, bytes | memoryview]],
        *,
        source: str = "local",
        verify: bool = True,
        durable: bool = True,
    ) -> int:
        """Store many verified chunks with one durability barrier; returns how many were new.

        Every item is verified before anything is written (IntegrityError names
        the first bad one; ``verify=False`` for bytes the caller has just hashed).
        Then: one reservation for the whole batch (all or nothing: QuotaExceeded
        stores none), temp files, one barrier (none with ``durable=False``, as for
        ``put``), renames, one index transaction.
        """
        todo: dict[bytes, bytes | memoryview] = {}
        for cid, data in items:
            _check_id(cid)
            if cid in todo:
                continue
            if verify and not matches(cid, data):
                raise IntegrityError(
                    f"data does not hash to chunk id {cid.hex()}; batch not stored"
                )
            if not os.path.exists(self._file_of(cid)):
                todo[cid] = data
        if not todo:
            return 0
        sizes = [(cid, len(memoryview(data).cast("B"))) for cid, data in todo.items()]
        need = sum(size for _, size in sizes)
        seqs = self.quota.reserve(sizes)
        written: list[tuple[bytes, str, int]] = []
        try:
            for (cid, size), data in zip(sizes, todo.values(), strict=True):
                fd, tmp = self._temp()
                written.append((cid, tmp, size))
                try:
                    write_all(fd, data)
                    if durable and BATCH_BARRIER == "fsync":
                        os.fsync(fd)
                finally:
                    os.close(fd)
            if durable and BATCH_BARRIER == "syncfs":
                dfd = os.open(self.tmp_dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    syncfs(dfd)
                finally:
                    os.close(dfd)
        except BaseException:
            _discard(tmp for _, tmp, _ in written)
            self.quota.abandon(seqs, need)
            raise
        return self._commit(seqs, written, need, source)

    def _commit(
        self, seqs: list[int], written: list[tuple[bytes, str, int]], need: int, source: str
    ) -> int:
        """Rename durable temp files into place, index them and end their reservation;
        returns how many were new. Whatever was renamed is indexed even if a later
        rename fails; temp files not renamed are deleted before the reservation
        ends, so they never count outside the quota."""
        rows: list[tuple[bytes, int, str, int]] = []
        renamed: set[str] = set()
        with self._lock:
            try:
                for cid, tmp, size in written:
                    final = self._file_of(cid)
                    if not os.path.exists(final):
                        try:
                            os.rename(tmp, final)
                        except FileNotFoundError:  # a new shard (nearly always, on a cold store)
                            os.makedirs(os.path.dirname(final), mode=0o700, exist_ok=True)
                            os.rename(tmp, final)
                        renamed.add(tmp)
                        rows.append((cid, size, source, self._now()))  # batch order: LRU order
            finally:
                try:
                    # Temp files not renamed (already stored, or a rename failed) go.
                    _discard(tmp for _, tmp, _ in written if tmp not in renamed)
                    self.index.commit_puts(seqs, rows)
                finally:
                    self.quota.end_reservation(need)
        return len(rows)

    def put_object(self, data: bytes) -> ChunkId:
        """Store an encoded object (blob, tree, snapshot); returns its id."""
        oid = object_id(data)
        self.put(oid, data, verify=False, source="object")
        return oid

    # -- reading ---------------------------------------------------------------------

    def get(self, cid: bytes) -> bytes:
        """The bytes of ``cid``, verified; MissingChunk if absent, CorruptChunk if bad.

        Marks ``cid`` as just used (like ``touch``)."""
        data = self._read(cid)
        with self._touch_lock:
            self._clock = max(time.time_ns(), self._clock + 1)
            self._touched[cid] = self._clock
        self._maybe_flush()
        return data

    def _read(self, cid: bytes) -> bytes:
        _check_id(cid)
        path = self._file_of(cid)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            # Under the lock: a put renames and indexes as one step, so a file that
            # appeared since our open is seen here and its fresh row is kept. A chunk
            # with no row (a cold read's every miss) skips the lock, which a batch of
            # fetched chunks holds while it is renamed in.
            if not self.index.has_chunk(cid):
                raise MissingChunk(f"chunk {cid.hex()} is not in the local store") from None
            with self._lock:
                if not os.path.exists(path) and self.index.has_chunk(cid):
                    log.warning("chunk %s is indexed but its file is gone", cid.hex())
                    self.index.remove_chunk(cid)
            raise MissingChunk(f"chunk {cid.hex()} is not in the local store") from None
        if not matches(cid, data):
            self._quarantine(Path(path), cid)
            raise CorruptChunk(f"chunk {cid.hex()} in the local store is corrupt (quarantined)")
        return data

    def get_object(self, oid: bytes) -> bytes:
        return self.get(oid)

    def _quarantine(self, path: Path, cid: bytes | None) -> None:
        """Move a bad file to quarantine/, drop its index row and count it.

        Under the lock, so that a good copy put meanwhile keeps its row."""
        dest = self.quarantine_dir / f"{path.name}.{time.time_ns()}"
        with self._lock:
            try:
                os.rename(path, dest)
            except FileNotFoundError:
                return  # another thread got there first and counted it
            if cid is not None:
                self.index.remove_chunk(cid)
                self.index.add_counter(CORRUPT_COUNTER)
        if cid is not None:
            log.warning("chunk %s failed verification; moved to %s", cid.hex(), dest)

    # -- counters --------------------------------------------------------------------

    def _quarantine_count(self) -> int:
        return sum(1 for _ in self.quarantine_dir.iterdir())

    def statistics(self) -> StoreStats:
        chunks, total = self.index.chunk_totals()
        return StoreStats(
            chunks=chunks,
            bytes=total,
            corrupt_chunks=self.index.counter(CORRUPT_COUNTER),
            quarantined=self._quarantine_count(),
        )
