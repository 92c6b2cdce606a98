"""What a node knows of each peer: where it is, how the link is, what it holds.

States, as ``status`` shows them:

* ``candidate``: an address from mDNS or the config; not tried yet
* ``connecting``: TLS handshake and hello under way
* ``connected``: authenticated; requests flow
* ``unreachable``: the last attempt failed (retried with backoff)
* ``rejected``: the TLS handshake failed or the certificate was refused
* ``quarantined``: it served bytes that did not match their hash; never asked again
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from p2pfs.ids import derive

from .connection import Connection
from .digest import Bloom
from .messages import Hello


@dataclass(frozen=True)
class PeerStats:
    """What status and ``p2pfs peers`` show of one peer."""

    node_id: str
    address: str | None
    state: str
    connections: int
    bytes_from: int
    chunks_from: int
    bad_chunks: int
    latency_ms: float
    volumes: tuple[str, ...]
    digest_ids: int | None
    last_error: str | None
    quarantine_reason: str | None
    protocol_errors: int = 0
    site: str | None = None  # from its hello: [network] site (None: none, or not told)


@dataclass
class Peer:
    node_id: bytes
    address: str | None = None
    port: int | None = None
    state: str = "candidate"
    conns: list[Connection] = field(default_factory=list)
    hello: Hello | None = None
    digest: Bloom | None = None
    digest_generation: int = -1
    quarantine_reason: str = ""
    last_error: str = ""
    bytes_from: int = 0
    chunks_from: int = 0
    bad_chunks: int = 0
    failures: int = 0
    inflight: int = 0
    latency_s: float = 0.05  # smoothed time to a chunk answer, for ranking
    next_attempt: float = 0.0
    since: float = field(default_factory=time.monotonic)
    protocol_errors: int = 0  # connections it broke the protocol on
    backoff_until: float = 0.0  # trio clock: refused (and not dialled) until then

    @property
    def conn(self) -> Connection | None:
        for c in reversed(self.conns):
            if not c.closed.is_set():
                return c
        return None

    @property
    def site(self) -> str | None:
        """Its site as its hello says (None: it has none, is of a release before sites,
        or has not greeted yet)."""
        return self.hello.site if self.hello is not None else None

    @property
    def quarantined(self) -> bool:
        return self.state == "quarantined"

    @property
    def usable(self) -> bool:
        return not self.quarantined and self.conn is not None

    def observe_latency(self, seconds: float) -> None:
        self.latency_s = 0.8 * self.latency_s + 0.2 * seconds

    def statistics(self) -> PeerStats:
        return PeerStats(
            node_id=self.node_id.hex(),
            address=f"{self.address}:{self.port}" if self.address else None,
            state=self.state,
            connections=sum(1 for c in self.conns if not c.closed.is_set()),
            bytes_from=self.bytes_from,
            chunks_from=self.chunks_from,
            bad_chunks=self.bad_chunks,
            latency_ms=round(self.latency_s * 1000, 1),
            volumes=tuple(v.name for v in self.hello.volumes) if self.hello else (),
            digest_ids=None if self.digest is None else self.digest_generation,
            last_error=self.last_error or None,
            quarantine_reason=self.quarantine_reason or None,
            protocol_errors=self.protocol_errors,
            site=self.site,
        )


def _score(cid: bytes, node_id: bytes) -> bytes:
    return derive(cid, node_id, 8)  # rendezvous: BLAKE3(cid || node id)


class PeerTable:
    def __init__(self) -> None:
        self.peers: dict[bytes, Peer] = {}

    def get(self, node_id: bytes) -> Peer:
        peer = self.peers.get(node_id)
        if peer is None:
            peer = self.peers[node_id] = Peer(node_id)
        return peer

    def connected(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.usable]

    def quarantined(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.quarantined]

    def home_of(self, cid: bytes, me: bytes, origins: set[bytes]) -> Peer | None:
        """The chunk's home among the connected followers and this node: rendezvous hashing.

        When several desktops want a chunk nobody holds yet (they all read the same
        file at once), each asks the chunk's home, and only the home fetches it
        from the origin: the origin sends about one copy however many read
        (Squirrel's home nodes). None when this node is the home.
        """
        best, best_score = None, _score(cid, me)
        for p in self.connected():
            if p.node_id in origins:
                continue
            score = _score(cid, p.node_id)
            if score > best_score:
                best, best_score = p, score
        return best

    def ranked_for(
        self, cid: bytes, *, others: int, origins: set[bytes], home: Peer | None
    ) -> list[tuple[Peer, bool]]:
        """Whom to ask for a chunk, best first, each with "fetch it for me if you lack it".

        Peers whose digest says they hold it (least loaded, fastest first); then the
        chunk's home, which fetches it for everyone; then the origins (publishers,
        which hold everything); then up to ``others`` other peers, whose digests may
        lag behind what they just stored.
        """
        usable = [p for p in self.connected() if p.node_id not in origins]

        def key(p: Peer) -> tuple[int, float]:
            return (p.inflight, p.latency_s)

        yes = sorted((p for p in usable if p.digest is not None and cid in p.digest), key=key)
        order = [(p, False) for p in yes]
        if home is not None and home not in yes:
            order.append((home, True))
        for origin in sorted(origins):
            o = self.peers.get(origin)
            if o is not None and o.usable:
                order.append((o, False))
        asked = {p.node_id for p, _ in order}
        rest = sorted(
            (p for p in usable if p.node_id not in asked),
            key=lambda p: (p.digest is not None, *key(p)),
        )
        order += [(p, False) for p in rest[:others]]
        return order
