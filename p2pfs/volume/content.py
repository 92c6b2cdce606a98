"""Verified content in memory: chunks, decoded trees and file layouts.

Every chunk is verified once, when it enters memory (the store hashes what it
reads from disk; a network loader will hash what it receives), and is then
served from memory without hashing again: that is how integrity and speed go
together. Loads run in worker threads; concurrent misses on one chunk share one
load.

A private volume's objects are named by sealed refs (id and key, ``p2pfs/seal.py``):
the stored bytes are fetched and verified by their id like any chunk, then opened
(AES-GCM checks its tag) in the same worker-thread trip; the caches hold plaintext
keyed by the ref, in memory only.

Atomicity under trio: the LRU dicts are only touched from the event loop
thread, between checkpoints, so they need no lock; worker threads only see the
store and the ids they are given.
"""

from __future__ import annotations

import logging
from bisect import bisect_right
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from itertools import accumulate
from typing import Protocol

import trio

from p2pfs.errors import CorruptChunk, IntegrityError, MissingChunk, P2pfsError
from p2pfs.objects.model import Blob, Tree, decode_blob, decode_tree
from p2pfs.seal import is_sealed, stored_id, unseal
from p2pfs.store.cas import Store

log = logging.getLogger(__name__)

ChunkLoader = Callable[[bytes], Awaitable[bytes]]
# Loads several chunks in one go: a result per id, bytes or the error it raised.
BatchLoader = Callable[[list[bytes]], Awaitable[list[bytes | BaseException]]]


# Fetches verified bytes the local store lacks (from peers or the origin); ``urgent``
# when a reader is blocked on them (readahead and pins are not).
class RemoteLoader(Protocol):
    def __call__(
        self, cid: bytes, *, urgent: bool = ..., wait_stored: bool = ...
    ) -> Awaitable[bytes]: ...


@dataclass(frozen=True)
class CacheStats:
    bytes: int  # verified chunks held now
    hits: int
    misses: int
    loaded_bytes: int
    evictions: int


@dataclass(frozen=True)
class ContentStats:
    bytes_from_local: int  # chunk bytes read from the local store
    chunks: CacheStats


# Chunks fetched ahead of a sequential reader, in batches of PREFETCH_BATCH per
# worker-thread trip (or concurrently from peers).
READAHEAD_CHUNKS = 32
# The scan LRU: what sequential readers have loaded and readahead loads ahead of them
# (a window of READAHEAD_CHUNKS for several readers at once).
SCAN_BYTES = 64 * 1024 * 1024
PREFETCH_BATCH = 4
# From the network: the chunks the measured rate moves in READAHEAD_SECONDS (at least
# READAHEAD_MIN, so a fast link measured through a small window can show its speed;
# READAHEAD_UNMEASURED before anything was measured), counted in average chunks.
READAHEAD_SECONDS = 2.0
READAHEAD_MIN = 4
READAHEAD_UNMEASURED = 8
AVERAGE_CHUNK = 256 * 1024


class _Abandoned(Exception):
    """A background load was cancelled: whoever waits on it loads the chunk itself."""


class _Pending:
    __slots__ = ("done", "error", "result")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.result: bytes | None = None
        self.error: BaseException | None = None


class ChunkCache:
    """A byte-bounded LRU of verified chunks with shared in-flight loads.

    Scan resistant (2Q's idea): chunks a sequential reader loads (``scan=True``, and
    readahead) go to a small LRU of their own, ``scan_bytes``, since the kernel's page
    cache keeps the pages read (keep_cache) and a second pass re-reads from there. Only
    chunks read at random, whose other pages the kernel does not hold, stay in the main
    LRU (``max_bytes``), and a scanned chunk read at random moves there. So one large
    sequential read leaves the daemon at its idle size plus ``scan_bytes``, not at the
    size of the file (docs/architecture.md, Memory).
    """

    def __init__(
        self,
        loader: ChunkLoader,
        *,
        max_bytes: int = 256 * 1024 * 1024,
        batch_loader: BatchLoader | None = None,
        scan_bytes: int = SCAN_BYTES,
    ) -> None:
        self.loader = loader
        self.batch_loader = batch_loader
        self.max_bytes = max_bytes
        self.scan_bytes = min(scan_bytes, max_bytes)
        self.bytes = 0  # both LRUs
        self._scanned = 0  # of which the scan LRU
        self._lru: OrderedDict[bytes, bytes] = OrderedDict()
        self._scan: OrderedDict[bytes, bytes] = OrderedDict()
        self._pending: dict[bytes, _Pending] = {}
        # Counters, touched on the event loop only (see statistics()).
        self._hits = self._misses = self._loaded_bytes = self._evictions = 0

    def statistics(self) -> CacheStats:
        return CacheStats(self.bytes, self._hits, self._misses, self._loaded_bytes, self._evictions)

    def peek(self, cid: bytes) -> bytes | None:
        """A chunk held now, without counting a hit or moving it (to hand it on)."""
        data = self._lru.get(cid)
        return data if data is not None else self._scan.get(cid)

    def get_cached(self, cid: bytes, *, scan: bool = False) -> bytes | None:
        data = self._lru.get(cid)
        if data is not None:
            self._lru.move_to_end(cid)
            self._hits += 1
            return data
        data = self._scan.get(cid)
        if data is not None:
            self._hits += 1
            if scan:
                self._scan.move_to_end(cid)
            else:  # read at random after all: worth keeping
                del self._scan[cid]
                self._scanned -= len(data)
                self.bytes -= len(data)
                self._keep(cid, data, scan=False)
        return data

    def is_loading(self, cid: bytes) -> bool:
        return cid in self._pending

    def holds(self, cid: bytes) -> bool:
        """Whether the chunk is in memory (without counting a use of it)."""
        return cid in self._lru or cid in self._scan

    async def get(self, cid: bytes, *, scan: bool = False) -> bytes:
        while True:
            data = self.get_cached(cid, scan=scan)
            if data is not None:
                return data
            pending = self._pending.get(cid)
            if pending is None:
                return await self._load(cid, scan)
            await pending.done.wait()
            if isinstance(pending.error, _Abandoned):
                continue
            if pending.error is not None:
                raise pending.error
            assert pending.result is not None
            return pending.result

    async def _load(self, cid: bytes, scan: bool = False) -> bytes:
        pending = self._pending[cid] = _Pending()
        self._misses += 1
        try:
            data = await self.loader(cid)
        except BaseException as e:
            pending.error = e
            raise
        else:
            pending.result = data
            self._insert(cid, data, scan=scan)
            return data
        finally:
            del self._pending[cid]
            pending.done.set()

    def _insert(self, cid: bytes, data: bytes, *, scan: bool = False) -> None:
        self._loaded_bytes += len(data)
        if cid in self._lru or cid in self._scan:
            return
        self._keep(cid, data, scan=scan)

    def _keep(self, cid: bytes, data: bytes, *, scan: bool) -> None:
        lru = self._scan if scan else self._lru
        lru[cid] = data
        self.bytes += len(data)
        if scan:
            self._scanned += len(data)
        while len(lru) > 1 and (
            self._scanned > self.scan_bytes if scan else self.bytes - self._scanned > self.max_bytes
        ):
            _, old = lru.popitem(last=False)
            self.bytes -= len(old)
            if scan:
                self._scanned -= len(old)
            self._evictions += 1

    async def prefetch(self, cid: bytes) -> None:
        """Load a chunk in the background (readahead: into the scan LRU); failures are
        left for the real read to report."""
        if cid in self._lru or cid in self._scan or cid in self._pending:
            return
        try:
            await self._load(cid, scan=True)
        except P2pfsError as e:
            log.debug("prefetch of %s failed: %s", cid.hex(), e)

    async def prefetch_run(self, cids: list[bytes]) -> None:
        """Load several chunks in the background with one batch (one worker-thread trip).

        Handing each chunk to a thread on its own made the thread handoffs and the
        GIL traffic they cause cost more than reading and hashing the chunk.
        """
        todo = [
            c
            for c in dict.fromkeys(cids)
            if c not in self._lru and c not in self._scan and c not in self._pending
        ]
        if not todo:
            return
        if self.batch_loader is None:
            for cid in todo:
                await self.prefetch(cid)
            return
        pendings = {cid: _Pending() for cid in todo}
        self._pending.update(pendings)
        self._misses += len(todo)
        results: list[bytes | BaseException] = []
        try:
            results = await self.batch_loader(todo)
        except Exception as e:
            results = [e] * len(todo)
        finally:
            # Cancelled: the waiters retry the load themselves.
            results += [_Abandoned()] * (len(todo) - len(results))
            for cid, result in zip(todo, results, strict=True):
                pending = pendings[cid]
                if isinstance(result, BaseException):
                    pending.error = result
                else:
                    pending.result = result
                    self._insert(cid, result, scan=True)
                del self._pending[cid]
                pending.done.set()


@dataclass(frozen=True)
class FileLayout:
    """Where each chunk of a file starts and ends: offset lookups by bisection."""

    size: int
    ids: tuple[bytes, ...]
    ends: tuple[int, ...]  # cumulative end offset of each chunk

    def index_of(self, offset: int) -> int:
        return bisect_right(self.ends, offset)

    def start_of(self, index: int) -> int:
        return self.ends[index - 1] if index else 0


class Content:
    """Loads verified objects and chunks for the filesystem layer."""

    def __init__(
        self,
        store: Store,
        *,
        chunk_cache_bytes: int = 256 * 1024 * 1024,
        max_trees: int = 256,
        max_layouts: int = 1024,
        remote: RemoteLoader | None = None,
        limiter: trio.CapacityLimiter | None = None,
        rate: Callable[[], float | None] | None = None,
    ) -> None:
        self.store = store
        self.remote = remote
        # The network's recent receive rate in bytes/s (None: nothing measured yet).
        self.rate = rate or (lambda: None)
        self._ahead_local = True  # the last readahead batch was all in the local store
        # Bounds the worker threads reading the store (shared with the network's writes).
        self.limiter = limiter or trio.CapacityLimiter(4)
        self.chunks = ChunkCache(
            self.load_chunk, max_bytes=chunk_cache_bytes, batch_loader=self.load_chunks
        )
        self._objects = ChunkCache(self.load_chunk, max_bytes=32 * 1024 * 1024)
        self._trees: OrderedDict[bytes, tuple[Tree, list[bytes]]] = OrderedDict()
        self._layouts: OrderedDict[bytes, FileLayout] = OrderedDict()
        self.max_trees = max_trees
        self.max_layouts = max_layouts
        self.bytes_from_local = 0

    def statistics(self) -> ContentStats:
        return ContentStats(self.bytes_from_local, self.chunks.statistics())

    async def load_stored(
        self, cid: bytes, *, urgent: bool = False, wait_stored: bool = True
    ) -> bytes:
        """Verified stored bytes of ``cid`` (a plain id): from the local store, else
        (missing or corrupt here) from the network. Never opened: what pins fetch.
        ``wait_stored=False``: a fetched chunk is returned before it is stored (a read)."""
        try:
            # Store.get hashes what it read and quarantines a mismatch.
            data = await trio.to_thread.run_sync(self.store.get, cid, limiter=self.limiter)
        except (MissingChunk, CorruptChunk):
            if self.remote is None:
                raise
            return await self.remote(cid, urgent=urgent, wait_stored=wait_stored)
        self.bytes_from_local += len(data)
        return data

    async def load_chunk(self, ref: bytes) -> bytes:
        """The verified plaintext of a chunk or object by its ref."""
        if not is_sealed(ref):
            return await self.load_stored(ref, urgent=True, wait_stored=False)
        sid = stored_id(ref)

        def read_open() -> tuple[bytes, int] | None:
            try:
                data = self.store.get(sid)
            except (MissingChunk, CorruptChunk):
                return None
            return unseal(ref, data), len(data)

        found = await trio.to_thread.run_sync(read_open, limiter=self.limiter)
        if found is not None:
            self.bytes_from_local += found[1]  # counters: on the event loop only
            return found[0]
        if self.remote is None:
            raise MissingChunk(f"chunk {sid.hex()} is not here")
        data = await self.remote(sid, urgent=True, wait_stored=False)
        return await trio.to_thread.run_sync(unseal, ref, data, limiter=self.limiter)

    async def load_chunks(self, cids: list[bytes]) -> list[bytes | BaseException]:
        """Several chunks with one worker-thread trip; missing ones fetched concurrently."""

        def read_all() -> tuple[list[bytes | BaseException], int]:
            out: list[bytes | BaseException] = []
            read = 0
            for cid in cids:
                try:
                    data = self.store.get(stored_id(cid))
                    read += len(data)
                    out.append(unseal(cid, data) if is_sealed(cid) else data)
                except P2pfsError as e:
                    out.append(e)
            return out, read

        results, read = await trio.to_thread.run_sync(read_all, limiter=self.limiter)
        self.bytes_from_local += read
        self._ahead_local = not any(isinstance(r, MissingChunk | CorruptChunk) for r in results)
        if self.remote is not None:
            remote = self.remote

            async def fetch(i: int) -> None:
                try:
                    data = await remote(stored_id(cids[i]), wait_stored=False)
                    if is_sealed(cids[i]):
                        data = await trio.to_thread.run_sync(
                            unseal, cids[i], data, limiter=self.limiter
                        )
                    results[i] = data
                except P2pfsError as e:
                    results[i] = e

            async with trio.open_nursery() as nursery:
                for i, r in enumerate(results):
                    if isinstance(r, MissingChunk | CorruptChunk):
                        nursery.start_soon(fetch, i)
        return results

    def readahead_window(self, most: int = READAHEAD_CHUNKS) -> int:
        """How many chunks to keep loading ahead of a sequential reader.

        From the local store, ``most``: the disk keeps up. From the network, what it
        delivers in READAHEAD_SECONDS at the rate measured: a window fixed in chunks
        queues, on a slow link, more than the link moves before the reader needs
        it, and every request for a chunk read out of order (or a peer's) waits
        behind that queue at the sender.
        """
        if self.remote is None or self._ahead_local:
            return most
        rate = self.rate()
        if rate is None:
            return min(most, READAHEAD_UNMEASURED)
        window = int(rate * READAHEAD_SECONDS) // AVERAGE_CHUNK
        return max(READAHEAD_MIN, min(most, window))

    async def object_bytes(self, oid: bytes) -> bytes:
        # Through a small cache of its own, so concurrent lookups of one missing
        # object share one fetch, and objects never push file data out.
        return await self._objects.get(oid)

    async def tree(self, tid: bytes) -> tuple[Tree, list[bytes]]:
        """A decoded tree and its sorted names (for bisection)."""
        hit = self._trees.get(tid)
        if hit is not None:
            self._trees.move_to_end(tid)
            return hit
        data = await self.object_bytes(tid)
        tree = await trio.to_thread.run_sync(decode_tree, data, limiter=self.limiter)
        value = (tree, [e.name for e in tree.entries])
        self._trees[tid] = value
        if len(self._trees) > self.max_trees:
            self._trees.popitem(last=False)
        return value

    async def layout(self, blob_id: bytes) -> FileLayout:
        hit = self._layouts.get(blob_id)
        if hit is not None:
            self._layouts.move_to_end(blob_id)
            return hit
        root = decode_blob(await self.object_bytes(blob_id))
        ids: list[bytes] = []
        lengths: list[int] = []
        await self._flatten(root, ids, lengths)
        layout = FileLayout(root.size, tuple(ids), tuple(accumulate(lengths)))
        if (layout.ends[-1] if layout.ends else 0) != root.size:
            raise IntegrityError(f"blob {blob_id.hex()} covers a different size than it claims")
        self._layouts[blob_id] = layout
        if len(self._layouts) > self.max_layouts:
            self._layouts.popitem(last=False)
        return layout

    async def _flatten(self, blob: Blob, ids: list[bytes], lengths: list[int]) -> None:
        if blob.level == 0:
            for ref in blob.refs:
                ids.append(ref.id)
                lengths.append(ref.length)
            return
        for ref in blob.refs:
            child = decode_blob(await self.object_bytes(ref.id))
            if child.level != blob.level - 1 or child.size != ref.length:
                raise IntegrityError(f"blob index node {ref.id.hex()} does not fit its parent")
            await self._flatten(child, ids, lengths)


async def read_span(
    chunks: ChunkCache, layout: FileLayout, offset: int, end: int, *, scan: bool = False
) -> bytes | memoryview:
    """Bytes ``offset`` to ``end`` of a file, from its verified chunks (``scan``: read by
    a sequential reader, see ChunkCache)."""
    i = layout.index_of(offset)
    parts: list[memoryview] = []
    pos = offset
    while pos < end:
        cid = layout.ids[i]
        data = chunks.get_cached(cid, scan=scan)
        if data is None:
            data = await chunks.get(cid, scan=scan)
        start = layout.start_of(i)
        stop = min(end, layout.ends[i])
        parts.append(memoryview(data)[pos - start : stop - start])
        pos = stop
        if pos < end:
            i += 1
    if len(parts) == 1:
        return parts[0]
    return b"".join(parts)


# The kernel keeps several readahead requests in flight, so they may arrive slightly out
# of order: a read that starts this near where the last one ended is still sequential.
SEQUENTIAL_SLACK = 4 * 1024 * 1024


def read_ahead(
    chunks: ChunkCache,
    layout: FileLayout,
    end: int,
    nursery: trio.Nursery,
    window: int = READAHEAD_CHUNKS,
) -> None:
    """Start loading the ``window`` chunks after ``end`` that are not loaded or loading."""
    last = layout.index_of(end - 1)
    ahead = [
        cid
        for cid in layout.ids[last + 1 : last + 1 + window]
        if not chunks.holds(cid) and not chunks.is_loading(cid)
    ]
    for k in range(0, len(ahead), PREFETCH_BATCH):
        nursery.start_soon(chunks.prefetch_run, ahead[k : k + PREFETCH_BATCH])
