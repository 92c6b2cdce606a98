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
    """The peers a node knows, and whom to ask for a chunk.

    ``site`` is this node's own ([network] site; None: none). DESIGN's fetch order
    beyond one LAN is: the local store, LAN peers of the same site (chunk homes
    within the site), peers of other sites, object-storage/HTTP origins, the
    publisher. A chunk's home is chosen among the peers of our site only, so every
    site has its own home for each chunk: the site's desktops ask it, and it alone
    fetches the chunk from outside, once per site. An estate without sites is one
    site (every peer without one), as before sites existed.
    """

    def __init__(self, site: str | None = None) -> None:
        self.peers: dict[bytes, Peer] = {}
        self.site = site

    def get(self, node_id: bytes) -> Peer:
        peer = self.peers.get(node_id)
        if peer is None:
            peer = self.peers[node_id] = Peer(node_id)
        return peer

    def connected(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.usable]

    def quarantined(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.quarantined]

    def same_site(self, peer: Peer) -> bool:
        """Whether ``peer`` is of our site (with no site of ours: whether it has none).

        A peer that has not said (no hello yet, or a release before sites) counts as
        having none.
        """
        return peer.site == self.site

    def home_of(self, cid: bytes, me: bytes, origins: set[bytes]) -> Peer | None:
        """The chunk's home among this node and the connected followers of its site:
        rendezvous hashing (the highest BLAKE3(cid || node id)). None when this node
        is the home.

        When several desktops want a chunk nobody holds yet (they all read the same
        file at once), each asks the chunk's home, and only the home fetches it
        from outside: about one copy however many read (Squirrel's home nodes).
        Only peers of our own site compete, so another site's node is never our home
        and each site's home fetches the chunk (one copy per site from outside, over
        the WAN link once); every member of a site that sees the same members picks
        the same home.
        """
        best, best_score = None, _score(cid, me)
        for p in self.connected():
            if p.node_id in origins or not self.same_site(p):
                continue
            score = _score(cid, p.node_id)
            if score > best_score:
                best, best_score = p, score
        return best

    def ranked(
        self, cid: bytes, *, others: int, origins: set[bytes], home: Peer | None
    ) -> tuple[list[tuple[Peer, bool]], list[tuple[Peer, bool]]]:
        """Whom to ask for a chunk, as (near, far), each best first, each peer with
        "fetch it for me if you lack it".

        ``near``, before any origin: peers of our site whose digest says they hold
        it (least loaded, fastest first); then the chunk's ``home``, which fetches it
        for the whole site; then peers of other sites whose digest says yes. ``far``:
        the publishers (``origins``: node ids; they hold everything); then up to
        ``others`` other peers, of our site first, whose digests may lag behind what
        they just stored. DESIGN's fetch order puts object-storage and HTTP origins
        between the two: the fetcher asks them after ``near`` and before ``far``.
        """
        usable = [p for p in self.connected() if p.node_id not in origins]

        def key(p: Peer) -> tuple[int, float]:
            return (p.inflight, p.latency_s)

        yes = [p for p in usable if p.digest is not None and cid in p.digest]
        near = [(p, False) for p in sorted(yes, key=key) if self.same_site(p)]
        if home is not None and home not in yes:
            near.append((home, True))
        near += [(p, False) for p in sorted(yes, key=key) if not self.same_site(p)]
        far: list[tuple[Peer, bool]] = []
        for origin in sorted(origins):
            o = self.peers.get(origin)
            if o is not None and o.usable:
                far.append((o, False))
        asked = {p.node_id for p, _ in near + far}
        rest = sorted(
            (p for p in usable if p.node_id not in asked),
            key=lambda p: (not self.same_site(p), p.digest is not None, *key(p)),
        )
        far += [(p, False) for p in rest[:others]]
        return near, far

    def ranked_for(
        self, cid: bytes, *, others: int, origins: set[bytes], home: Peer | None
    ) -> list[tuple[Peer, bool]]:
        """``ranked``'s near, then far, in one list (for a fetcher that asks no
        object-storage origins between them)."""
        near, far = self.ranked(cid, others=others, origins=origins, home=home)
        return near + far
