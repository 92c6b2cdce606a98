"""The store's quota: how many bytes it may hold, reservations, LRU eviction.

The bytes of stored chunks and objects never exceed the effective quota,
``min(max_bytes, stored + free - min_free_bytes)``, not even while puts are in
flight: a put first reserves its bytes (a put intent in the index, in the same
transaction that reads the totals and, if needed, deletes the rows of least
recently used victims), deletes the victims' files, and only then writes. Pinned
chunks (held by any pin set) and protected ones (the protector's answer: chunks
of open files) are never victims; when they leave no room, ``QuotaExceeded`` and
nothing is stored.

Every method runs under the store's lock (passed in), as the store's own
check-then-act sequences do; the protector is called without it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from p2pfs.errors import EXIT_ERROR, P2pfsError, UsageError
from p2pfs.fsutil import process_token
from p2pfs.sizes import format_size

from .index import INDEX_HEADROOM_BYTES, Index, Intent, Reservation

log = logging.getLogger(__name__)

EVICT_BATCH = 1024  # chunks per transaction (and per hold of the store's lock) in evict()


class QuotaExceeded(P2pfsError):
    """The store cannot make room: what is left is pinned or in use."""

    exit_code = EXIT_ERROR
    errno = errno.ENOSPC


@dataclass(frozen=True)
class CacheUsage:
    bytes: int  # stored chunks and objects
    quota: int | None  # the effective quota now (None: no limit)
    max_bytes: int | None  # the configured quota
    min_free_bytes: int  # the free-space floor
    pinned_bytes: int  # stored bytes held by pin sets (each chunk once)
    evictions: int  # chunks ever evicted (persistent)
    chunks: int  # stored chunks and objects
    reserved: int  # bytes of puts in flight and evicted files not yet deleted (all processes)


_owners: dict[int, str] = {}


def _owner() -> str:
    """This process as an intent owner: pid and start time, so a reused pid differs."""
    pid = os.getpid()
    if pid not in _owners:
        _owners[pid] = process_token(pid)
    return _owners[pid]


class Quota:
    """The quota of one store: limits, the bytes its puts have reserved, eviction."""

    def __init__(
        self,
        root: Path,
        index: Index,
        lock: threading.RLock,
        path_of: Callable[[bytes], Path],
        take_touched: Callable[[], Mapping[bytes, int]],
        *,
        max_bytes: int | None,
        min_free_bytes: int,
    ) -> None:
        self.root = root
        self.index = index
        self._lock = lock
        self._path_of = path_of
        self._take_touched = take_touched
        self._room = threading.Condition(lock)  # notified when a reservation ends
        self._inflight = 0  # bytes this process has reserved and not yet committed
        self._max_bytes, self._min_free = self._check(max_bytes, min_free_bytes)
        self._protector: Callable[[], Collection[bytes]] | None = None

    @property
    def limited(self) -> bool:
        return self._max_bytes is not None or self._min_free > 0

    @staticmethod
    def _check(max_bytes: int | None, min_free_bytes: int) -> tuple[int | None, int]:
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes < 0):
            raise UsageError(f"the cache quota must be a number of bytes >= 0, not {max_bytes!r}")
        if not isinstance(min_free_bytes, int) or min_free_bytes < 0:
            raise UsageError(f"the free-space floor must be bytes >= 0, not {min_free_bytes!r}")
        return max_bytes, min_free_bytes

    def set(self, max_bytes: int | None, min_free_bytes: int = 0) -> None:
        """Change the quota; evicts (LRU, unpinned, unprotected) until the store fits it,
        as far as pins and the protector allow."""
        limits = self._check(max_bytes, min_free_bytes)
        with self._lock:
            self._max_bytes, self._min_free = limits
        self.fit()

    def set_protector(self, protect: Callable[[], Collection[bytes]] | None) -> None:
        """``protect()`` answers the ids that must not be evicted right now (chunks
        of open files). It is called at eviction time, from the evicting thread,
        without the store's lock held."""
        self._protector = protect

    def _protected(self) -> Collection[bytes]:
        protect = self._protector
        if protect is None:
            return frozenset()
        ids = protect()
        return ids if isinstance(ids, set | frozenset) else frozenset(ids)

    def _disk_room(self, *, headroom: bool = True) -> int | None:
        """Free bytes on the store's file system above the floor; None without any quota.

        With a floor, puts also leave INDEX_HEADROOM_BYTES free: the index (on the
        same file system) may grow by that much after a check (its WAL is bounded),
        and the floor must hold through that too. The quota reported by
        ``cache_usage`` is the plain ``stored + free - min_free_bytes``."""
        if self._max_bytes is None and self._min_free == 0:
            return None
        st = os.statvfs(self.root)
        extra = INDEX_HEADROOM_BYTES if self._min_free and headroom else 0
        return st.f_bavail * st.f_frsize - self._min_free - extra

    def reserve(self, items: list[tuple[bytes, int]]) -> list[int]:
        """Reserve room for ``items``, evicting as needed; returns the put intents.

        Raises QuotaExceeded (having changed nothing) when pinned and protected
        chunks leave no room. A failure caused only by this process's own puts in
        flight waits for them to finish and tries again.
        """
        need = sum(size for _, size in items)
        protected: Collection[bytes] | None = None if self._protector else frozenset()
        while True:
            with self._lock:
                r = self.index.reserve(
                    _owner(),
                    items,
                    max_bytes=self._max_bytes,
                    disk_room=self._disk_room(),
                    protected=protected,
                    touched=self._take_touched(),
                )
                if r.fits:
                    self._inflight += need
                    self._unlink_evicted(r.victims)
                    return r.put_seqs
                if not r.ask_protector:
                    if self._inflight == 0:
                        raise QuotaExceeded(self._no_room(r, need))
                    self._room.wait()  # our own puts in flight become evictable when done
                    protected = None if self._protector else frozenset()
                    continue
            protected = self._protected()

    def _no_room(self, r: Reservation, need: int) -> str:
        limit = 0 if r.limit is None else r.limit
        how = [f"max_bytes {format_size(self._max_bytes)}"] if self._max_bytes is not None else []
        if self._min_free:
            how.append(f"min_free_bytes {format_size(self._min_free)} of free disk kept")
        count, names = self.index.pin_set_names(3)
        pinned = f"{format_size(r.pinned)} is pinned"
        if count:
            more = f" and {count - len(names)} more" if count > len(names) else ""
            pinned += f" by {count} pin set{'s' * (count > 1)}: " + ", ".join(map(repr, names))
            pinned += more
        return (
            f"cannot store {format_size(need)}: the local store's quota is {format_size(limit)}"
            f" ({'; '.join(how) or 'disk full'}): {format_size(r.stored)} is stored, {pinned}"
            + (
                ""
                if r.protected is None
                else f", {format_size(r.protected)} is in use by open files"
            )
            + f" and {format_size(r.reserved)} is being written; unpin something or raise the quota"
        )

    def _unlink_evicted(self, victims: list[Intent]) -> None:
        """Delete evicted files (rows already gone, intents recorded); under self._lock."""
        if not victims:
            return
        for v in victims:
            with contextlib.suppress(FileNotFoundError):
                self._path_of(v.id).unlink()
        self.index.drop_intents(v.seq for v in victims)
        log.debug("evicted %d chunks (%d bytes)", len(victims), sum(v.size for v in victims))

    def end_reservation(self, need: int) -> None:
        """Under self._lock: the reservation's bytes are committed or released."""
        self._inflight -= need
        self._room.notify_all()

    def abandon(self, seqs: list[int], need: int) -> None:
        with self._lock:
            try:
                self.index.drop_intents(seqs)
            finally:
                self.end_reservation(need)

    def evict(self, nbytes: int) -> tuple[int, int]:
        """Evict least recently used, unpinned, unprotected chunks worth at least
        ``nbytes`` (or all there are): returns (chunks evicted, bytes freed).

        Works in batches of EVICT_BATCH chunks, each one transaction and its
        unlinks, so puts from other threads interleave with a big eviction."""
        count = freed = 0
        if nbytes <= 0:
            return 0, 0
        protected = self._protected()
        while freed < nbytes:
            with self._lock:
                victims = self.index.evict(
                    _owner(), nbytes - freed, protected, self._take_touched(), EVICT_BATCH
                )
                self._unlink_evicted(victims)
            count += len(victims)
            freed += sum(v.size for v in victims)
            if len(victims) < EVICT_BATCH:
                break
        return count, freed

    def usage(self) -> CacheUsage:
        with self._lock:
            room = self._disk_room(headroom=False)
            chunks, stored, pinned, evictions, reserved = self.index.usage()
        limit = self._max_bytes
        if room is not None:
            limit = stored + room if limit is None else min(limit, stored + room)
        return CacheUsage(
            bytes=stored,
            quota=None if limit is None else max(0, limit),
            max_bytes=self._max_bytes,
            min_free_bytes=self._min_free,
            pinned_bytes=pinned,
            evictions=evictions,
            chunks=chunks,
            reserved=reserved,
        )

    def fit(self) -> None:
        usage = self.usage()
        if usage.quota is not None and usage.bytes + usage.reserved > usage.quota:
            n, freed = self.evict(usage.bytes + usage.reserved - usage.quota)
            log.info(
                "quota %s: evicted %d chunks (%s)", format_size(usage.quota), n, format_size(freed)
            )
