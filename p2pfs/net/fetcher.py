"""Getting a chunk the local store lacks: from peers, then the origin, verified.

Order (DESIGN.md, Network): peers whose digest says they hold it, then up to k
other peers, then the origin. One peer is asked at a time; if it has not
answered after ``hedge_after_s`` a second is asked too, and the first verified
answer wins (the Tail at Scale's hedged requests). A "missing" answer moves on
at once. Bytes that do not hash to the id quarantine the peer that sent them and
are never stored or returned. The whole fetch has a deadline: past it the read
fails (EIO), it never hangs. Concurrent reads of one chunk already share one
fetch in ``content.ChunkCache``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Protocol

import trio

from p2pfs.errors import MissingChunk
from p2pfs.ids import matches

from . import messages
from .connection import PeerUnavailable
from .peers import Peer, PeerTable

log = logging.getLogger(__name__)


class Quarantine(Protocol):
    def quarantine(self, peer: Peer, reason: str) -> None: ...


@dataclass
class FetchStats:
    bytes_from_peers: int = 0
    bytes_from_origin: int = 0
    chunks_fetched: int = 0
    corrupt_chunks_rejected: int = 0
    hedged_requests: int = 0
    failed_fetches: int = 0


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
    ) -> None:
        self.node_id = node_id
        self.table = table
        self.quarantine = quarantine
        self.deadline_s = deadline_s
        self.hedge_after_s = hedge_after_s
        self.others = others
        self.peer_fetch = peer_fetch
        self.stats = FetchStats()
        self.origins: set[bytes] = set()  # node ids of the publishers of the volumes we follow

    def candidates(self, cid: bytes, *, proxy: bool = True) -> list[tuple[Peer, bool]]:
        if not self.peer_fetch:
            found = (self.table.peers.get(o) for o in sorted(self.origins))
            return [(p, False) for p in found if p is not None and p.usable]
        home = self.table.home_of(cid, self.node_id, self.origins) if proxy else None
        return self.table.ranked_for(cid, others=self.others, origins=self.origins, home=home)

    async def fetch(self, cid: bytes, *, proxy: bool = True) -> tuple[bytes, Peer]:
        """The verified bytes of ``cid`` and who sent them; MissingChunk (EIO) past the deadline.

        ``proxy=False`` when fetching on behalf of a peer that made us the chunk's
        home: then we do not hand it on to another home (no loops).
        """
        tried: set[bytes] = set()
        errors: list[str] = []
        with trio.move_on_after(self.deadline_s):
            while True:
                order = [c for c in self.candidates(cid, proxy=proxy) if c[0].node_id not in tried]
                if order:
                    got = await self._race(cid, order, tried, errors)
                    if got is not None:
                        data, peer = got
                        self.stats.chunks_fetched += 1
                        if peer.node_id in self.origins:
                            self.stats.bytes_from_origin += len(data)
                        else:
                            self.stats.bytes_from_peers += len(data)
                        return data, peer
                # Nobody had it (or nobody is connected yet): wait a moment for peers to
                # appear or reconnect, then ask again the ones not asked yet or all anew.
                await trio.sleep(0.2)
                if not [c for c in self.candidates(cid, proxy=proxy) if c[0].node_id not in tried]:
                    tried.clear()
        self.stats.failed_fetches += 1
        detail = "; ".join(errors[-3:]) or "no peer or origin reachable"
        raise MissingChunk(
            f"chunk {cid.hex()} is not available within {self.deadline_s:g} s ({detail})"
        )

    async def _race(
        self, cid: bytes, order: list[tuple[Peer, bool]], tried: set[bytes], errors: list[str]
    ) -> tuple[bytes, Peer] | None:
        result: tuple[bytes, Peer] | None = None
        async with trio.open_nursery() as nursery:

            async def attempt(peer: Peer, fetch: bool, ended: trio.Event) -> None:
                nonlocal result
                try:
                    data = await self._ask(peer, cid, fetch)
                except PeerUnavailable as e:
                    errors.append(f"{peer.node_id.hex()[:8]}: {e}")
                except _BadChunk:
                    errors.append(f"{peer.node_id.hex()[:8]}: sent a corrupt chunk")
                else:
                    if result is None:
                        result = (data, peer)
                        nursery.cancel_scope.cancel()
                finally:
                    ended.set()

            for i, (peer, fetch) in enumerate(order):
                tried.add(peer.node_id)
                if i:
                    self.stats.hedged_requests += 1
                ended = trio.Event()
                nursery.start_soon(attempt, peer, fetch, ended)
                # Move on when this one failed, or hedge when it is slow: slow for this
                # peer, as a busy link makes every answer slower. A home gets longer:
                # it may be fetching the chunk for everyone, and asking the origin
                # behind its back costs the origin a copy.
                patience = max(self.hedge_after_s, 4 * peer.latency_s)
                if fetch:
                    patience = max(patience, self.deadline_s / 2)
                with trio.move_on_after(patience):
                    await ended.wait()
        return result

    async def _ask(self, peer: Peer, cid: bytes, fetch: bool = False) -> bytes:
        conn = peer.conn
        if conn is None:
            raise PeerUnavailable("not connected")
        peer.inflight += 1
        start = trio.current_time()
        try:
            header, payload = await conn.request(
                messages.get(cid, fetch=fetch), within=self.deadline_s
            )
        finally:
            peer.inflight -= 1
        err = messages.answer_error(header)
        if err is not None:
            raise PeerUnavailable(err)
        # Hash as the bytes enter memory; nothing unverified goes further.
        if not matches(cid, payload):
            peer.bad_chunks += 1
            self.stats.corrupt_chunks_rejected += 1
            self.quarantine.quarantine(peer, f"served a corrupt copy of chunk {cid.hex()}")
            raise _BadChunk
        peer.observe_latency(trio.current_time() - start)
        peer.bytes_from += len(payload)
        peer.chunks_from += 1
        return payload
