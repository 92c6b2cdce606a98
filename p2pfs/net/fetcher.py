"""Getting a chunk the local store lacks: from peers, then the origin, verified.

Order (DESIGN.md, Network): peers whose digest says they hold it, then up to k
other peers, then the origin. One peer is asked at a time; if it has not
answered after ``hedge_after_s`` (longer for a peer whose answers are slow, never
more than half the deadline) a second is asked too, and the first verified answer
wins (the Tail at Scale's hedged requests). A "missing" answer moves on
at once. Bytes that do not hash to the id quarantine the peer that sent them and
are never stored or returned. A fetch fails (EIO) once no byte of an answer has
arrived from any peer it asked for ``deadline_s`` (nobody to ask counts as silence):
a slow link that moves bytes delivers them, however long they take, while an
offline node fails within the deadline as ever; it never hangs.

Urgent fetches (the chunk an application is blocked on) mark their requests
urgent, so the peer sends that answer ahead of readahead queued before it.

``fetch_into_store`` is what the node uses: fetch, then cache the verified bytes in
the local store. Our own reads and peers that made us a chunk's home share one
fetch per chunk: a second fetch of a chunk already on its way would cost the origin
a copy. (Concurrent reads through the mount already share one load in
``content.ChunkCache``; this is the network's side of it.) A reader's fetch
(``wait_stored=False``) returns as soon as its chunk is verified; the store write
goes on in ``run``'s nursery, and the chunk stays in flight until it is stored, so a
second fetch of it waits and then finds it in the store. Pins wait for the write.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from p2pfs.errors import MissingChunk, P2pfsError
from p2pfs.ids import matches
from p2pfs.store.cas import Store
from p2pfs.store.quota import QuotaExceeded

from . import messages
from .cache_writer import CacheWriter, NotCached
from .connection import Connection, PeerUnavailable
from .peers import Peer, PeerTable

log = logging.getLogger(__name__)

RATE_WINDOW_S = 3.0
HOME_WAIT_DEADLINES = 4  # a home is waited for alone at most this many deadlines
MAX_RECENT = 4096  # answers remembered for the rate (beyond: the oldest are forgotten)
# Upper bounds (seconds) of the fetch-time histogram's buckets; one more counts the rest.
FETCH_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Quarantine(Protocol):
    def quarantine(self, peer: Peer, reason: str) -> None: ...


class Progressing(Protocol):
    @property
    def progress_at(self) -> float: ...


class ObjectSource(Protocol):
    """An origin beyond the peers (object storage, an HTTP mirror: ``p2pfs.origin``):
    asked after the peers near us and before the publisher, never made a home."""

    node_id: bytes  # its key among what a fetch tried (never a node's id)
    label: str
    latency_s: float

    async def fetch(self, cid: bytes, moved: Callable[[], None]) -> bytes:
        """The bytes it holds under ``cid``, unverified; ``moved()`` (from any thread)
        as they arrive."""
        ...

    def delivered(self, size: int) -> None: ...

    def rejected(self) -> None: ...


Source = Peer | ObjectSource


class _Transfer:
    """One read from an origin, as a fetch's watchdog sees it: progress while its bytes
    arrive, none at all once they fail their hash (an origin that keeps sending wrong
    bytes must not hold a reader for ever)."""

    def __init__(self) -> None:
        self._offset = trio.current_time() - time.perf_counter()
        self._moved = -math.inf  # perf_counter of the last bytes (set in worker threads)

    @property
    def progress_at(self) -> float:
        return self._offset + self._moved

    def moved(self) -> None:
        self._moved = time.perf_counter()

    def revoke(self) -> None:
        self._moved = -math.inf


@dataclass(frozen=True)
class FetchStats:
    bytes_from_peers: int
    bytes_from_origin: int
    chunks_fetched: int
    corrupt_chunks_rejected: int
    hedged_requests: int
    failed_fetches: int
    fetch_seconds: tuple[int, ...] = ()  # successful fetches per FETCH_SECONDS_BUCKETS, +1
    fetch_seconds_sum: float = 0.0


class _BadChunk(Exception):
    pass


class Fetcher:
    def __init__(
        self,
        node_id: bytes,
        table: PeerTable,
        quarantine: Quarantine,
        *,
        deadline_s: float = 10.0,
        hedge_after_s: float = 0.5,
        others: int = 3,
        peer_fetch: bool = True,
        store: Store | None = None,
        on_stored: Callable[[], None] = lambda: None,
        disk: trio.CapacityLimiter | None = None,
    ) -> None:
        self.node_id = node_id
        self.table = table
        self.quarantine = quarantine
        self.deadline_s = deadline_s
        self.hedge_after_s = hedge_after_s
        self.others = others
        self.peer_fetch = peer_fetch
        self.store = store
        self.on_stored = on_stored
        self.disk = disk or trio.CapacityLimiter(4)
        self._writer = CacheWriter(store, self.disk) if store is not None else None
        self.origins: set[bytes] = set()  # node ids of the publishers of the volumes we follow
        # The object-storage and HTTP origins of the volumes we hold (set by the daemon).
        self.sources: list[ObjectSource] = []
        self._inflight: dict[bytes, trio.Event] = {}
        self._behind: trio.Nursery | None = None  # store writes readers do not wait for
        self._watching: dict[bytes, dict[int, Progressing]] = {}  # what each inflight asked
        self._recent: deque[tuple[float, int]] = deque()  # (when, bytes) of recent answers
        self._recent_bytes = 0  # their sum: rate() runs on every read, so it must be O(1)
        self._bytes_from_peers = self._bytes_from_origin = self._chunks_fetched = 0
        self._corrupt_rejected = self._hedged = self._failed = 0
        self._fetch_seconds = [0] * (len(FETCH_SECONDS_BUCKETS) + 1)
        self._fetch_seconds_sum = 0.0

    def statistics(self) -> FetchStats:
        return FetchStats(
            self._bytes_from_peers,
            self._bytes_from_origin,
            self._chunks_fetched,
            self._corrupt_rejected,
            self._hedged,
            self._failed,
            tuple(self._fetch_seconds),
            self._fetch_seconds_sum,
        )

    def rate(self) -> float | None:
        """Bytes per second received in answers over the last RATE_WINDOW_S (None: none).

        What readahead sizes its window by (``volume/content.py``).
        """
        self._forget_before(trio.current_time() - RATE_WINDOW_S)
        if not self._recent:
            return None
        return self._recent_bytes / RATE_WINDOW_S

    def _forget_before(self, when: float) -> None:
        recent = self._recent
        while recent and (recent[0][0] < when or len(recent) > MAX_RECENT):
            self._recent_bytes -= recent.popleft()[1]

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the store writes of fetches that returned before them, until cancelled."""
        try:
            async with trio.open_nursery() as nursery:
                self._behind = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._behind = None

    async def fetch_into_store(
        self,
        cid: bytes,
        *,
        proxy: bool = True,
        origins_only: bool = False,
        urgent: bool = False,
        wait_stored: bool = True,
        asked: dict[int, Progressing] | None = None,
    ) -> bytes:
        """A chunk or object the store lacks: fetched verified, stored, then returned.

        ``proxy=False`` when a peer made us the chunk's home (see ``fetch``);
        ``origins_only`` when nothing we follow vouches for the id: then only the
        publishers of what we follow are asked, so a peer cannot make us store bytes of
        its own choosing by serving them itself (cache stuffing). ``wait_stored=False``
        (a reader's fetch): returned once verified, stored behind (while ``run`` runs).
        """
        assert self.store is not None and self._writer is not None
        store = self.store
        while (pending := self._inflight.get(cid)) is not None:
            if asked is not None:  # watch the fetch we wait for: its progress is ours
                asked.update(self._watching.get(cid, {}))
            await pending.wait()
            try:  # the fetch we waited for stored it
                return await trio.to_thread.run_sync(store.get, cid, limiter=self.disk)
            except P2pfsError:
                continue  # it failed, or could not be cached: fetch it ourselves
        event = self._inflight[cid] = trio.Event()
        asked = {} if asked is None else asked
        self._watching[cid] = asked
        behind = False
        try:
            data, _peer = await self.fetch(
                cid, proxy=proxy, origins_only=origins_only, urgent=urgent, asked=asked
            )
            if not wait_stored and self._behind is not None:
                # The reader has its verified bytes; the store write costs it nothing.
                self._behind.start_soon(self._store_behind, cid, data, event)
                behind = True
            else:
                await self._store(cid, data)
            return data
        finally:
            if not behind:
                self._landed(cid, event)

    async def _store(self, cid: bytes, data: bytes) -> None:
        assert self._writer is not None
        try:
            await self._writer.put(cid, data)
        except (QuotaExceeded, NotCached) as e:
            # Everything stored is pinned or in use: serve the read from memory, uncached.
            log.debug("not caching %s: %s", cid.hex(), e)
        else:
            self.on_stored()

    async def _store_behind(self, cid: bytes, data: bytes, event: trio.Event) -> None:
        try:
            await self._store(cid, data)
        except Exception as e:  # an OSError too: its reader was served, the network stays up
            log.warning("could not cache chunk %s: %s", cid.hex(), e)
        finally:
            self._landed(cid, event)

    def _landed(self, cid: bytes, event: trio.Event) -> None:
        del self._inflight[cid]
        self._watching.pop(cid, None)
        event.set()

    async def fetch_for_peer(
        self, conn: Connection, rid: int, header: dict[str, Any], *, origins_only: bool
    ) -> bytes:
        """Fetch and store a chunk for a peer that made us its home, telling it we are at it.

        Every third of the deadline, if bytes reached our fetch since the last word
        (and the asker's ``get`` takes interim answers), the asker hears so and keeps
        waiting, however slow the source behind us is. Only real progress is told: a
        fetch that merely lasts (its sources silent, or answering "missing") must not
        keep the asker waiting, or asking again, for ever.
        """
        cid = messages.parse_get(header)
        stored: bytes | None = None
        failed: P2pfsError | None = None
        asked: dict[int, Progressing] = {}
        async with trio.open_nursery() as nursery:

            async def tell() -> None:
                told = trio.current_time()
                with contextlib.suppress(PeerUnavailable):  # (then our answer fails too)
                    while True:
                        await trio.sleep(self.deadline_s / 3)
                        heard = max((c.progress_at for c in asked.values()), default=told)
                        if heard > told:
                            told = heard
                            await conn.send(messages.progress(rid))

            if messages.get_takes_progress(header):
                nursery.start_soon(tell)
            # Caught here, not around the nursery, which would wrap it in a group.
            try:
                stored = await self.fetch_into_store(
                    cid,
                    proxy=False,
                    origins_only=origins_only,
                    urgent=messages.get_is_urgent(header),
                    asked=asked,
                )
            except P2pfsError as e:
                failed = e
            nursery.cancel_scope.cancel()
        if failed is not None:
            raise failed
        assert stored is not None
        return stored

    def candidates(
        self, cid: bytes, *, proxy: bool = True, origins_only: bool = False
    ) -> list[tuple[Source, bool]]:
        """Whom to ask, best first (DESIGN.md, Beyond one LAN): the peers of our site
        that hold it and the chunk's home, peers of other sites that hold it, then the
        object-storage and HTTP origins, then the publishers and a few other peers."""
        sources: list[tuple[Source, bool]] = [(s, False) for s in self.sources]
        if not self.peer_fetch or origins_only:
            found = (self.table.peers.get(o) for o in sorted(self.origins))
            return [*sources, *((p, False) for p in found if p is not None and p.usable)]
        home = self.table.home_of(cid, self.node_id, self.origins) if proxy else None
        near, far = self.table.ranked(cid, others=self.others, origins=self.origins, home=home)
        return [*near, *sources, *far]

    async def fetch(
        self,
        cid: bytes,
        *,
        proxy: bool = True,
        origins_only: bool = False,
        urgent: bool = False,
        asked: dict[int, Progressing] | None = None,
    ) -> tuple[bytes, Source]:
        """The verified bytes of ``cid`` and who sent them; MissingChunk (EIO) once
        ``deadline_s`` pass without a byte from anyone asked.

        ``proxy=False`` when fetching on behalf of a peer that made us the chunk's
        home: then we do not hand it on to another home (no loops).
        """
        tried: set[bytes] = set()
        errors: list[str] = []
        # The connections asked, for their progress (the caller's map, to watch it too).
        asked = {} if asked is None else asked
        start = trio.current_time()
        got: tuple[bytes, Source] | None = None

        # Who is being asked now, since when: said when the fetch gives up on them.
        waiting: dict[str, tuple[float, Connection | None]] = {}

        # Ended by ``finished``, not cancelled: cancelling a sleeping task throws an
        # exception through its frames, and with the lone attempt below ending without
        # a cancel too, a fetch's own trio work went from 89 to 56 us a chunk.
        finished = trio.Event()

        async def watchdog(scope: trio.CancelScope) -> None:
            while not finished.is_set():
                quiet_until = max([start, *(c.progress_at for c in asked.values())])
                quiet_until += self.deadline_s
                now = trio.current_time()
                if now >= quiet_until:
                    errors.extend(
                        _silence(who, since, conn, now) for who, (since, conn) in waiting.items()
                    )
                    scope.cancel()
                    return
                with trio.move_on_at(quiet_until):
                    await finished.wait()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watchdog, nursery.cancel_scope)
            try:
                while True:
                    order = [
                        c
                        for c in self.candidates(cid, proxy=proxy, origins_only=origins_only)
                        if c[0].node_id not in tried
                    ]
                    if order:
                        got = await self._race(cid, order, tried, errors, asked, urgent, waiting)
                        if got is not None:
                            break
                    # Nobody had it (or nobody is connected yet): wait a moment for peers to
                    # appear or reconnect, then ask again the ones not asked yet or all anew.
                    await trio.sleep(0.2)
                    again = self.candidates(cid, proxy=proxy, origins_only=origins_only)
                    if not [c for c in again if c[0].node_id not in tried]:
                        tried.clear()
            finally:
                finished.set()
        if got is not None:
            data, peer = got
            self._chunks_fetched += 1
            took = trio.current_time() - start
            self._fetch_seconds[bisect.bisect_left(FETCH_SECONDS_BUCKETS, took)] += 1
            self._fetch_seconds_sum += took
            if not isinstance(peer, Peer) or peer.node_id in self.origins:
                self._bytes_from_origin += len(data)
            else:
                self._bytes_from_peers += len(data)
            return data, peer
        self._failed += 1
        detail = "; ".join(errors[-3:]) or self._nobody()
        log.info("chunk %s: nothing arrived for %g s (%s)", cid.hex(), self.deadline_s, detail)
        raise MissingChunk(
            f"chunk {cid.hex()}: nothing arrived for {self.deadline_s:g} s ({detail})"
        )

    async def _race(
        self,
        cid: bytes,
        order: list[tuple[Source, bool]],
        tried: set[bytes],
        errors: list[str],
        asked: dict[int, Progressing],
        urgent: bool,
        waiting: dict[str, tuple[float, Connection | None]],
    ) -> tuple[bytes, Source] | None:
        result: tuple[bytes, Source] | None = None
        running = 0  # attempts under way
        async with trio.open_nursery() as nursery:

            async def attempt(peer: Source, fetch: bool, ended: trio.Event) -> None:
                nonlocal result, running
                who = peer.node_id.hex()[:8] if isinstance(peer, Peer) else peer.label
                conn = peer.conn if isinstance(peer, Peer) else None
                waiting[who] = (trio.current_time(), conn)
                try:
                    if isinstance(peer, Peer):
                        data = await self._ask(peer, cid, fetch, asked, urgent)
                    else:
                        data = await self._ask_source(peer, cid, asked)
                except PeerUnavailable as e:
                    errors.append(f"{who}: {e}")
                except _BadChunk:
                    errors.append(f"{who}: sent a corrupt chunk")
                else:
                    if result is None:
                        result = (data, peer)
                        # Others still asking are stopped; a lone attempt just ends (the
                        # loop below sees the result): a cancel costs an exception.
                        if running > 1:
                            nursery.cancel_scope.cancel()
                finally:
                    running -= 1
                    waiting.pop(who, None)
                    ended.set()

            for i, (peer, fetch) in enumerate(order):
                tried.add(peer.node_id)
                if i:
                    self._hedged += 1
                ended = trio.Event()
                running += 1
                nursery.start_soon(attempt, peer, fetch, ended)
                # Move on when this one failed, or hedge when it is slow: slow for this
                # peer, as a busy link makes every answer slower. But never wait out
                # the deadline on one peer: its latency is the time to a whole chunk,
                # which on a slow shared link grows to seconds, and a peer whose
                # answer is stuck (TCP backing off on a full queue) must not hold the
                # fetch until its watchdog gives up without asking anyone else.
                cap = self.deadline_s / 2
                if not fetch:
                    with trio.move_on_after(min(max(self.hedge_after_s, 4 * peer.latency_s), cap)):
                        await ended.wait()
                    if result is not None:
                        break
                    continue
                # A home is waited for as long as it says it is getting the chunk
                # (interim answers), and half a deadline of its silence: asking the
                # origin behind its back costs the origin a copy, and a slow origin
                # that every desktop asks at once gets slower for all of them.
                patience = cap
                began = trio.current_time()
                assert isinstance(peer, Peer)  # only a peer is asked to fetch
                while not ended.is_set():
                    conn = peer.conn
                    heard = max(began, conn.progress_at if conn is not None else began)
                    now = trio.current_time()
                    # Interim answers cannot be verified: a home that only keeps saying
                    # "coming" (a hostile one) is hedged after HOME_WAIT_DEADLINES.
                    if now >= heard + patience or now >= began + HOME_WAIT_DEADLINES * (
                        self.deadline_s
                    ):
                        break
                    with trio.move_on_at(heard + patience):
                        await ended.wait()
                if result is not None:
                    break
        return result

    def _nobody(self) -> str:
        known = len(self.table.peers)
        usable = sum(1 for p in self.table.peers.values() if p.usable)
        return f"no peer or origin reachable: {usable} of {known} known peers connected"

    async def _ask_source(
        self, source: ObjectSource, cid: bytes, asked: dict[int, Progressing]
    ) -> bytes:
        transfer = _Transfer()
        asked[id(transfer)] = transfer
        data = await source.fetch(cid, transfer.moved)
        if not matches(cid, data):  # an origin is untrusted storage
            transfer.revoke()
            source.rejected()
            self._corrupt_rejected += 1
            log.warning("origin %s holds a corrupt copy of %s", source.label, cid.hex())
            raise _BadChunk
        source.delivered(len(data))
        now = trio.current_time()
        self._recent.append((now, len(data)))
        self._recent_bytes += len(data)
        self._forget_before(now - RATE_WINDOW_S)
        return data

    async def _ask(
        self,
        peer: Peer,
        cid: bytes,
        fetch: bool,
        asked: dict[int, Progressing],
        urgent: bool,
    ) -> bytes:
        conn = peer.conn
        if conn is None:
            raise PeerUnavailable("not connected")
        asked[id(conn)] = conn
        peer.inflight += 1
        start = trio.current_time()
        try:
            header, payload = await conn.request(
                messages.get(cid, fetch=fetch, urgent=urgent), within=self.deadline_s
            )
        finally:
            peer.inflight -= 1
        err = messages.answer_error(header)
        if err is not None:
            raise PeerUnavailable(err)
        # Hash as the bytes enter memory; nothing unverified goes further.
        if not matches(cid, payload):
            peer.bad_chunks += 1
            self._corrupt_rejected += 1
            self.quarantine.quarantine(peer, f"served a corrupt copy of chunk {cid.hex()}")
            raise _BadChunk
        now = trio.current_time()
        peer.observe_latency(now - start)
        self._recent.append((now, len(payload)))
        self._recent_bytes += len(payload)
        self._forget_before(now - RATE_WINDOW_S)
        peer.bytes_from += len(payload)
        peer.chunks_from += 1
        return payload


def _silence(who: str, since: float, conn: Connection | None, now: float) -> str:
    """What a source asked and given up on was doing, for the fetch's error."""
    said = f"{who}: no answer bytes {now - since:.1f} s after asking"
    if conn is None:
        return said
    if conn.closed.is_set():
        return f"{said} (connection closed: {conn.close_reason})"
    return f"{said} (last frame from it {now - conn.last_received:.1f} s ago)"
