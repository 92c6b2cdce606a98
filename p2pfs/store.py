"""The local content-addressed store: one file per chunk or object, and an index.

Layout under ``root`` (docs/objects.md, "Store layout"):

- ``chunks/xx/yy/<64 hex digits>``: a chunk's or object's bytes, named by its
  BLAKE3-256 id; ``xx`` and ``yy`` are the id's first two bytes in hex.
- ``tmp/``: files being written (``<pid>-<random>.tmp``); renamed into
  ``chunks/`` only once complete and durable, so a crash never leaves a half
  chunk under a real id. Temp files of dead processes are removed on open.
- ``quarantine/``: files that failed verification, kept for inspection.
- ``index.sqlite``: the index (p2pfs/index.py). The chunk files are the truth:
  a missing, truncated or garbage index is moved aside and rebuilt from them.

Every read verifies the bytes against the id. A mismatch moves the file to
``quarantine/``, drops its index row, adds one to the persistent
``corrupt_chunks`` counter and raises ``CorruptChunk``: a wrong byte is never
returned.

All methods block (disk, fsync, hashing): trio callers run them with
``trio.to_thread.run_sync``. They are safe to call from several threads at
once: files are only ever created by an atomic rename, the index is behind its
own lock, and the one check-then-act sequence (does the file exist? rename it
in) is under ``self._lock``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import blake3

from .errors import CorruptChunk, IntegrityError, MissingChunk, UsageError
from .ids import ID_SIZE, ChunkId
from .index import FilesCache, Index, IndexCorrupt
from .objects import object_id

log = logging.getLogger(__name__)

CORRUPT_COUNTER = "corrupt_chunks"
# put_many's durability barrier: "syncfs" (one syncfs(2) on the store's file
# system for the whole batch) or "fsync" (one fsync(2) per file). Measured in
# docs/objects.md: syncfs is faster for batches of small chunks on ext4.
BATCH_BARRIER = "syncfs"


@dataclass(frozen=True)
class StoreStats:
    chunks: int  # chunks and objects in the index
    bytes: int  # their total size
    corrupt_chunks: int  # chunks ever found corrupt (persistent)
    quarantined: int  # files now in quarantine/


def _check_id(cid: bytes) -> None:
    if not isinstance(cid, bytes) or len(cid) != ID_SIZE:
        raise UsageError(f"a chunk id must be {ID_SIZE} bytes")


def _hash(data: bytes | memoryview) -> bytes:
    return blake3.blake3(data, max_threads=1).digest()


_libc: ctypes.CDLL | None = None


def _syncfs(fd: int) -> None:
    """syncfs(2) on the file system holding ``fd``; falls back to sync(2)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    if _libc.syncfs(fd) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"syncfs failed: {os.strerror(err)}")


def _write_file(fd: int, data: bytes | memoryview) -> None:
    view = memoryview(data).cast("B")
    while view:
        view = view[os.write(fd, view) :]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    """A local CAS of chunks and objects under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.chunks_dir = self.root / "chunks"
        self.tmp_dir = self.root / "tmp"
        self.quarantine_dir = self.root / "quarantine"
        self.index_path = self.root / "index.sqlite"
        for d in (self.root, self.chunks_dir, self.tmp_dir, self.quarantine_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        self._clean_tmp()
        self.index = self._open_index()

    # -- opening and rebuilding --------------------------------------------------

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

    def _clean_tmp(self) -> None:
        """Remove temp files left by processes that are gone."""
        for p in self.tmp_dir.iterdir():
            pid_text = p.name.split("-", 1)[0]
            if pid_text.isdigit() and _pid_alive(int(pid_text)):
                continue
            with contextlib.suppress(OSError):
                p.unlink()
                log.info("removed stale temp file %s", p)

    def rebuild_index(self) -> tuple[int, list[ChunkId]]:
        """Rebuild the chunk index from the chunk files, verifying each one.

        Files whose bytes do not match their name are quarantined and counted;
        files whose name is not an id are quarantined too. Returns (good, bad ids).
        """
        rows: list[tuple[bytes, int, str]] = []
        bad: list[ChunkId] = []
        for path in self._chunk_files():
            try:
                cid = bytes.fromhex(path.name)
            except ValueError:
                cid = b""
            if len(cid) != ID_SIZE or path.parent != self._shard_dir(cid):
                log.warning("quarantining stray file %s in the store", path)
                self._quarantine(path, None)
                continue
            try:
                data = path.read_bytes()
            except OSError as e:
                log.warning("cannot read %s while rebuilding: %s", path, e)
                continue
            if _hash(data) != cid:
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

    def _temp(self) -> tuple[int, Path]:
        path = self.tmp_dir / f"{os.getpid()}-{secrets.token_hex(8)}.tmp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return fd, path

    # -- writing -------------------------------------------------------------------

    def chunk_ids(self) -> list[bytes]:
        """Every id the index lists (chunks and objects): what this node can serve."""
        return self.index.chunk_ids()

    def has(self, cid: bytes) -> bool:
        return self.path_of(cid).exists()

    def put(
        self, cid: bytes, data: bytes | memoryview, *, verify: bool = True, source: str = "local"
    ) -> bool:
        """Store ``data`` under ``cid``; True if it was not stored before.

        With ``verify`` (the default) the bytes must hash to ``cid``, else
        IntegrityError and nothing is stored.
        """
        _check_id(cid)
        if verify and _hash(data) != cid:
            raise IntegrityError(f"data does not hash to chunk id {cid.hex()}; not stored")
        final = self.path_of(cid)
        if final.exists():
            return False
        fd, tmp = self._temp()
        try:
            try:
                _write_file(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            return self._commit([(cid, tmp, len(data))], source) == 1
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def put_many(
        self, items: Iterable[tuple[bytes, bytes | memoryview]], *, source: str = "local"
    ) -> int:
        """Store many verified chunks with one durability barrier; returns how many were new.

        Every item is verified before anything is written (IntegrityError names
        the first bad one). Then: temp files, one barrier, renames, one index
        transaction.
        """
        todo: dict[bytes, bytes | memoryview] = {}
        for cid, data in items:
            _check_id(cid)
            if cid in todo:
                continue
            if _hash(data) != cid:
                raise IntegrityError(
                    f"data does not hash to chunk id {cid.hex()}; batch not stored"
                )
            if not self.path_of(cid).exists():
                todo[cid] = data
        if not todo:
            return 0
        written: list[tuple[bytes, Path, int]] = []
        try:
            for cid, data in todo.items():
                fd, tmp = self._temp()
                written.append((cid, tmp, len(data)))
                try:
                    _write_file(fd, data)
                    if BATCH_BARRIER == "fsync":
                        os.fsync(fd)
                finally:
                    os.close(fd)
            if BATCH_BARRIER == "syncfs":
                dfd = os.open(self.tmp_dir, os.O_RDONLY | os.O_DIRECTORY)
                try:
                    _syncfs(dfd)
                finally:
                    os.close(dfd)
            return self._commit(written, source)
        finally:
            for _, tmp, _ in written:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()

    def _commit(self, written: list[tuple[bytes, Path, int]], source: str) -> int:
        """Rename durable temp files into place and index them; returns how many were new."""
        rows: list[tuple[bytes, int, str]] = []
        with self._lock:
            for cid, tmp, size in written:
                final = self.path_of(cid)
                if final.exists():
                    continue
                try:
                    os.rename(tmp, final)
                except FileNotFoundError:
                    final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
                    os.rename(tmp, final)
                rows.append((cid, size, source))
            if rows:
                self.index.add_chunks(rows, time.time_ns())
        return len(rows)

    def put_object(self, data: bytes) -> ChunkId:
        """Store an encoded object (blob, tree, snapshot); returns its id."""
        oid = object_id(data)
        self.put(oid, data, verify=False, source="object")
        return oid

    # -- reading ---------------------------------------------------------------------

    def get(self, cid: bytes) -> bytes:
        """The bytes of ``cid``, verified; MissingChunk if absent, CorruptChunk if bad."""
        path = self.path_of(cid)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            if self.index.has_chunk(cid):
                log.warning("chunk %s is indexed but its file is gone", cid.hex())
                self.index.remove_chunk(cid)
            raise MissingChunk(f"chunk {cid.hex()} is not in the local store") from None
        if _hash(data) != cid:
            self._quarantine(path, cid)
            raise CorruptChunk(f"chunk {cid.hex()} in the local store is corrupt (quarantined)")
        return data

    def get_object(self, oid: bytes) -> bytes:
        return self.get(oid)

    def _quarantine(self, path: Path, cid: bytes | None) -> None:
        """Move a bad file to quarantine/, drop its index row and count it."""
        dest = self.quarantine_dir / f"{path.name}.{time.time_ns()}"
        try:
            os.rename(path, dest)
        except FileNotFoundError:
            return  # another thread got there first and counted it
        if cid is not None:
            self.index.remove_chunk(cid)
            self.index.add_counter(CORRUPT_COUNTER)
            log.warning("chunk %s failed verification; moved to %s", cid.hex(), dest)

    def scrub(self) -> tuple[int, list[ChunkId]]:
        """Verify every stored file; quarantine the bad ones. Returns (good, bad ids)."""
        good = 0
        bad: list[ChunkId] = []
        for path in list(self._chunk_files()):
            try:
                cid = bytes.fromhex(path.name)
            except ValueError:
                continue
            if len(cid) != ID_SIZE:
                continue
            try:
                self.get(cid)
            except CorruptChunk:
                bad.append(ChunkId(cid))
            except MissingChunk:
                continue
            else:
                good += 1
        return good, bad

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
