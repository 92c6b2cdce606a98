"""Fetched chunks into the local store, many per trip: a group commit.

Storing each fetched chunk on its own cost about a millisecond of CPU (a quota
reservation, a temp file, a rename and an index transaction each, and a thread
handoff): on a fast link that was a third of a peer read's CPU. Chunks that
arrive while a batch is being written wait for the next one, which then takes
them all with one reservation and one index transaction (``Store.put_many``). A
reader's fetch does not wait for its batch (``Fetcher.fetch_into_store``), but the
chunk stays in flight until it is stored (or could not be), so a second reader that
waits for the fetch finds it in the store.

The bytes are verified by the fetcher before they get here; nothing is fsynced
(see ``Store.put``: peers and origins still hold what a power cut tears).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import trio

from p2pfs.errors import P2pfsError
from p2pfs.store.cas import Store

MAX_BATCH = 64  # chunks per trip: bounds the time a batch holds the store's lock


class NotCached(P2pfsError):
    """The batch writer was cancelled before this chunk's turn: it was not stored."""


@dataclass
class _Entry:
    cid: bytes
    data: bytes
    done: trio.Event = field(default_factory=trio.Event)
    error: BaseException | None = None


class CacheWriter:
    def __init__(self, store: Store, limiter: trio.CapacityLimiter) -> None:
        self.store = store
        self.limiter = limiter
        self._queue: list[_Entry] = []
        self._writing = False

    async def put(self, cid: bytes, data: bytes) -> None:
        """Store ``cid`` (already verified); QuotaExceeded and the store's errors pass
        through, to every chunk of the batch that failed."""
        entry = _Entry(cid, data)
        self._queue.append(entry)
        if not self._writing:
            # The first to find no batch under way writes batches until none is left.
            self._writing = True
            try:
                while self._queue:
                    batch, self._queue = self._queue[:MAX_BATCH], self._queue[MAX_BATCH:]
                    await self._write(batch)
            finally:
                self._writing = False
                # Cancelled between batches: whoever still waits is told its chunk
                # was not stored (its read is served from memory, uncached).
                for left in self._queue:
                    left.error = NotCached("the cache writer was cancelled")
                    left.done.set()
                self._queue = []
        await entry.done.wait()
        if entry.error is not None:
            raise entry.error

    async def _write(self, batch: list[_Entry]) -> None:
        try:
            # Not abandoned on cancel: a batch once begun is finished and reported.
            await trio.to_thread.run_sync(
                functools.partial(
                    self.store.put_many,
                    [(e.cid, e.data) for e in batch],
                    source="peer",
                    verify=False,
                    durable=False,
                ),
                limiter=self.limiter,
            )
        except Exception as e:
            # This batch's chunks only: the writer goes on with the next batch, and
            # whoever wrote an earlier one is not told of this failure.
            for entry in batch:
                entry.error = e
        except BaseException:
            for entry in batch:
                entry.error = NotCached("the cache writer was cancelled")
            raise
        finally:
            for entry in batch:
                entry.done.set()
