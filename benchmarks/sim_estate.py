"""10,000 desktops in simulation: p2pfs against a central server and a site proxy.

A discrete-event simulation (SimPy) of sites of desktops reading one snapshot, the same
workload three ways (docs/simulation.md says how to run it and what it assumes):

- ``p2pfs``: a desktop takes each piece from a same-site peer whose last digest (a real
  ``p2pfs.net.digest.Bloom``, pushed at most every ``service.DIGEST_INTERVAL`` while the
  holder's store changes) says it holds it, else from the piece's home within the site
  (``PeerTable.home_of``: rendezvous over the site's desktops), which fetches it from the
  origin once (single flight: later askers wait on that fetch);
- ``central``: every desktop fetches everything from one server through its site's uplink;
- ``proxy``: a CernVM-FS-style Squid per site fetches each piece once from the origin
  (Stratum-1; collapsed forwarding) and serves the site's desktops over its own LAN link.

Links are SimPy resources of capacity 1: each sends one piece at a time at its full rate,
first come first served; a piece crosses the links of its path one after another (store
and forward, as a home or a proxy verifies a piece before it passes it on).

    python -m benchmarks.sim_estate [--sites 100 --desktops 100 --fraction 0.3 --size 1G
                                     --uplink 100M ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import sys
import time
from collections.abc import Callable, Generator
from dataclasses import asdict, dataclass
from typing import Any

import simpy

from p2pfs.chunking.params import ChunkParams
from p2pfs.config import Config
from p2pfs.ids import content_id
from p2pfs.net.digest import Bloom, size_for
from p2pfs.net.peers import Peer, PeerTable
from p2pfs.net.service import DIGEST_INTERVAL
from p2pfs.sizes import parse_size

SCENARIOS = ("p2pfs", "central", "proxy")
HOUR = 3600.0
# mDNS as zeroconf (0.154, the one net/discovery.py runs) keeps it once the segment is up:
# after its four start-up queries the browser only refreshes a PTR record (TTL 4500 s,
# _DNS_OTHER_TTL) at 75 % of its TTL (_EXPIRE_REFRESH_TIME_PERCENT): one query, one
# multicast answer per desktop per refresh, heard by every desktop of the segment.
MDNS_PTR_TTL_S = 4500.0
MDNS_REFRESH = 0.75
DIGEST_HEADER = 40  # bytes of a digest notice besides its filter (msgpack map + frame)
Proc = Generator[simpy.Event, Any, None]


@dataclass(frozen=True)
class Params:
    sites: int = 100
    desktops: int = 100
    fraction: float = 0.3  # of all desktops, chosen at random, read the snapshot
    size: int = 1 << 30  # the snapshot
    extent: int = 4 << 20  # the unit simulated: this many bytes of consecutive chunks
    spread_s: float = 1800.0  # readers start uniformly within this
    uplink: float = 100e6 / 8  # bytes/s, each site's WAN downlink
    lan: float = 1e9 / 8  # each desktop's port, each way
    origin: float = 10e9 / 8  # object storage (p2pfs) and the Stratum-1 (proxy)
    server: float = 1e9 / 8  # the central server
    proxy_lan: float = 1e9 / 8  # the site proxy's port, each way
    wan_rtt_s: float = 0.02  # before each request that leaves the site
    window: int = 4  # pieces a reader keeps in flight (readahead)
    poll_s: float = 240.0  # central/proxy clients revalidate the snapshot pointer this often
    seed: int = 1


@dataclass
class Link:
    """One direction of one port or line: FIFO, one piece at a time at ``rate``."""

    name: str
    rate: float
    res: simpy.Resource
    bytes: int = 0

    @property
    def busy_s(self) -> float:
        return self.bytes / self.rate


class Node:
    """A desktop (or a site proxy): its port and what it holds."""

    __slots__ = (
        "announced",
        "down",
        "fetching",
        "finished",
        "held",
        "inflight",
        "nid",
        "push_pending",
        "pushed",
        "site",
        "started",
        "unpushed",
        "up",
    )

    def __init__(self, site: Site, nid: bytes, up: Link, down: Link) -> None:
        self.site, self.nid, self.up, self.down = site, nid, up, down
        self.held: set[int] = set()
        self.announced: set[int] = set()  # pieces its pushed digest is known to hold
        self.fetching: dict[int, simpy.Process] = {}  # single flight, per piece
        self.inflight = 0  # pieces it is sending to peers now
        self.pushed: Bloom | None = None  # the digest its peers hold of it
        self.unpushed: list[int] = []
        self.push_pending = False
        self.started = self.finished = -1.0


class Site:
    __slots__ = ("desktops", "holders", "homes", "index", "origin_bytes", "proxy", "uplink")

    def __init__(self, index: int, uplink: Link) -> None:
        self.index, self.uplink = index, uplink
        self.desktops: list[Node] = []
        self.homes: list[Node] = []  # piece -> its home among the site's desktops
        self.holders: list[list[Node]] = []  # piece -> desktops that hold it now
        self.proxy: Node | None = None
        self.origin_bytes = 0


class SimPeer(Peer):
    """A peer as the table sees a connected one: a simulation has no live connection."""

    @property
    def usable(self) -> bool:
        return not self.quarantined


def homes_of(site: Site, cids: list[bytes]) -> list[Node]:
    """Each piece's home, decided by the real ``PeerTable.home_of`` from one desktop's view
    (rendezvous hashing gives every desktop of the site the same answer)."""
    me, *others = site.desktops
    table = PeerTable()
    by_id = {me.nid: me}
    for node in others:
        table.peers[node.nid] = SimPeer(node.nid, state="connected")
        by_id[node.nid] = node
    out = []
    for cid in cids:
        home = table.home_of(cid, me.nid, set())
        out.append(me if home is None else by_id[home.node_id])
    return out


class Estate:
    """One scenario's run: the sites, their links, the readers and the counters."""

    def __init__(self, p: Params, scenario: str, cids: list[bytes]) -> None:
        if scenario not in SCENARIOS:
            raise ValueError(f"unknown scenario {scenario!r}")
        self.p, self.scenario, self.cids = p, scenario, cids
        self.env = simpy.Environment()
        self.pieces = len(cids)
        self.piece_bytes = [min(p.extent, p.size - i * p.extent) for i in range(self.pieces)]
        self.chunks_per_piece = max(1, round(p.extent / ChunkParams().avg_size))
        self.links: list[Link] = []
        top = "server" if scenario == "central" else "origin"
        self.origin = self.link(top, p.server if scenario == "central" else p.origin)
        rng = random.Random(p.seed)  # the same estate and readers in every scenario
        self.sites: list[Site] = []
        for s in range(p.sites):
            site = Site(s, self.link(f"site {s} uplink", p.uplink))
            for d in range(p.desktops):
                name = f"site {s} desktop {d}"
                up, down = self.link(f"{name} up", p.lan), self.link(f"{name} down", p.lan)
                site.desktops.append(Node(site, rng.randbytes(32), up, down))
            if scenario == "proxy":
                name = f"site {s} proxy"
                up, down = self.link(f"{name} up", p.proxy_lan), self.link(f"{name} down", p.lan)
                site.proxy = Node(site, rng.randbytes(32), up, down)
            self.sites.append(site)
        everyone = [n for site in self.sites for n in site.desktops]
        count = round(p.fraction * len(everyone))
        self.readers = rng.sample(everyone, count)
        self.starts = [rng.uniform(0.0, p.spread_s) for _ in self.readers]
        self.digest_msgs = self.digest_bytes = self.false_asks = 0.0
        self.rng = random.Random(p.seed + 1)
        if scenario == "p2pfs":
            for site in self.sites:
                if any(n.site is site for n in self.readers):
                    site.homes = homes_of(site, cids)
                site.holders = [[] for _ in cids]

    def link(self, name: str, rate: float) -> Link:
        link = Link(name, rate, simpy.Resource(self.env, capacity=1))
        self.links.append(link)
        return link

    # -- moving bytes --------------------------------------------------------------

    def send(self, size: int, path: tuple[Link, ...]) -> Proc:
        for link in path:
            with link.res.request() as req:
                yield req
                yield self.env.timeout(size / link.rate)
            link.bytes += size

    def from_origin(self, node: Node, piece: int) -> Proc:
        """``node`` fetches ``piece`` from the origin through its site's uplink, once."""
        size = self.piece_bytes[piece]
        yield self.env.timeout(self.p.wan_rtt_s)
        yield from self.send(size, (self.origin, node.site.uplink, node.down))
        node.site.origin_bytes += size
        del node.fetching[piece]
        self.stored(node, piece)

    def single_flight(self, node: Node, piece: int) -> simpy.Process:
        proc = node.fetching.get(piece)
        if proc is None:
            proc = node.fetching[piece] = self.env.process(self.from_origin(node, piece))
        return proc

    def serve(self, src: Node, dst: Node, piece: int) -> Proc:
        src.inflight += 1
        yield from self.send(self.piece_bytes[piece], (src.up, dst.down))
        src.inflight -= 1
        self.stored(dst, piece)

    def stored(self, node: Node, piece: int) -> None:
        node.held.add(piece)
        if self.scenario != "p2pfs":
            return
        node.site.holders[piece].append(node)
        node.unpushed.append(piece)
        if not node.push_pending:  # service._digest_loop: wait for a change, sleep, push
            node.push_pending = True
            event = self.env.timeout(DIGEST_INTERVAL, value=node)
            event.callbacks.append(self.push_digest)

    def push_digest(self, event: simpy.Event) -> None:
        """The node renews its digest and sends it to every desktop of its site."""
        node = event.value
        assert isinstance(node, Node)
        node.push_pending = False
        count = len(node.held)
        if node.pushed is None or len(node.pushed.bits) != size_for(count):
            node.pushed = Bloom.of((self.cids[i] for i in node.held), count)
        else:
            for piece in node.unpushed:
                node.pushed.add(self.cids[piece])
        node.unpushed.clear()
        if self.env.now < HOUR:
            peers = len(node.site.desktops) - 1
            wire = size_for(count * self.chunks_per_piece) + DIGEST_HEADER  # of real chunks
            self.digest_msgs += peers
            self.digest_bytes += peers * wire

    # -- where a desktop gets a piece ------------------------------------------------

    def get(self, node: Node, piece: int) -> Proc:
        if self.scenario == "central":
            yield self.env.timeout(self.p.wan_rtt_s)
            size = self.piece_bytes[piece]
            yield from self.send(size, (self.origin, node.site.uplink, node.down))
            node.site.origin_bytes += size
            node.held.add(piece)
        elif self.scenario == "proxy":
            proxy = node.site.proxy
            assert proxy is not None
            if piece not in proxy.held:
                yield self.single_flight(proxy, piece)
            yield from self.serve(proxy, node, piece)
        else:
            yield from self.get_p2pfs(node, piece)

    def get_p2pfs(self, node: Node, piece: int) -> Proc:
        site, cid = node.site, self.cids[piece]
        # PeerTable.ranked_for's order: peers whose digest says yes, least loaded first
        best: Node | None = None
        for holder in site.holders[piece]:
            if self.digest_says(holder, piece, cid):
                if best is None or holder.inflight < best.inflight:
                    best = holder
                if best.inflight == 0:
                    break
        self.sample_false_positives(site, piece, cid)
        if best is None:  # then the piece's home, which fetches it for everyone
            home = site.homes[piece]
            if home is node:
                yield self.single_flight(node, piece)
                return
            if piece not in home.held:
                yield self.single_flight(home, piece)
            best = home
        yield from self.serve(best, node, piece)

    @staticmethod
    def digest_says(holder: Node, piece: int, cid: bytes) -> bool:
        """Whether the holder's last pushed digest (a real Bloom) has the piece. A yes stays
        a yes (a digest only grows, and a rebuilt one holds all it held), so it is kept."""
        if piece in holder.announced:
            return True
        digest = holder.pushed
        if digest is not None and cid in digest:
            holder.announced.add(piece)
            return True
        return False

    def sample_false_positives(self, site: Site, piece: int, cid: bytes) -> None:
        """Ask the real digest of one random desktop that lacks the piece; a yes is a
        wasted ask ("missing", no bytes), scaled to all the desktops that lack it."""
        lacking = len(site.desktops) - 1 - len(site.holders[piece])
        other = site.desktops[self.rng.randrange(len(site.desktops))]
        digest = other.pushed
        if lacking > 0 and piece not in other.held and digest is not None and cid in digest:
            self.false_asks += lacking

    def reader(self, node: Node, start: float) -> Proc:
        yield self.env.timeout(start)
        node.started = self.env.now
        todo = iter(range(self.pieces))  # a sequential read, ``window`` pieces ahead

        def worker() -> Proc:
            for piece in todo:
                if piece not in node.held:
                    yield from self.get(node, piece)

        yield self.env.all_of([self.env.process(worker()) for _ in range(self.p.window)])
        node.finished = self.env.now

    def run(self) -> dict[str, Any]:
        for node, start in zip(self.readers, self.starts, strict=True):
            self.env.process(self.reader(node, start))
        t0 = time.perf_counter()
        self.env.run()
        return self.report(time.perf_counter() - t0)

    # -- what it shows -----------------------------------------------------------------

    def report(self, wall_s: float) -> dict[str, Any]:
        p, mib = self.p, float(1 << 20)
        reading = {n.site.index for n in self.readers}
        copies = [self.sites[s].origin_bytes / p.size for s in sorted(reading)]
        desktops = [n for site in self.sites for n in site.desktops]
        down = [n.down.bytes / mib for n in desktops]
        up = [n.up.bytes / mib for n in desktops]
        busiest = max(self.links, key=lambda link: link.busy_s)
        finish = sorted(n.finished for n in self.readers)
        durations = sorted(n.finished - n.started for n in self.readers)
        per_min = len(desktops) * HOUR / 60
        peers = p.desktops - 1
        if self.scenario == "p2pfs":
            mdns = 2 * 60 / (MDNS_REFRESH * MDNS_PTR_TTL_S)  # a query and an answer
            keepalive = peers * 60 / Config().keepalive_s  # a ping or a pong per link
            discovery, discovery_heard, polls = mdns, mdns * peers, 0.0
            digests = self.digest_msgs / per_min
        else:
            discovery = discovery_heard = digests = keepalive = 0.0
            polls = 60 / p.poll_s
        return {
            "scenario": self.scenario,
            "readers": len(self.readers),
            "unfinished": sum(1 for n in self.readers if n.finished < 0),
            "sites_with_readers": len(reading),
            "origin_copies_per_site_mean": _mean(copies),
            "origin_copies_per_site_max": max(copies, default=0.0),
            "origin_link_gib": self.origin.bytes / (1 << 30),
            "desktop_down_mib_mean": _mean(down),
            "desktop_down_mib_max": max(down),
            "desktop_up_mib_mean": _mean(up),
            "desktop_up_mib_max": max(up),
            "busiest_link": busiest.name,
            "busiest_link_gib": busiest.bytes / (1 << 30),
            "busiest_link_busy_min": busiest.busy_s / 60,
            "discovery_sent_per_node_min": discovery,
            "discovery_heard_per_node_min": discovery_heard,
            "digest_msgs_per_node_min": digests,
            "digest_kib_per_node_min": self.digest_bytes / per_min / 1024,
            "keepalive_msgs_per_node_min": keepalive,
            "polls_per_node_min": polls,
            "false_positive_asks": round(self.false_asks),
            "p95_finished_min": _pct(finish, 0.95) / 60,
            "p95_read_min": _pct(durations, 0.95) / 60,
            "wall_s": wall_s,
        }


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def _pct(sorted_xs: list[float], q: float) -> float:
    return sorted_xs[max(0, math.ceil(q * len(sorted_xs)) - 1)] if sorted_xs else 0.0


def piece_ids(p: Params) -> list[bytes]:
    """Content ids of the snapshot's pieces (BLAKE3, like every id in p2pfs)."""
    count = max(1, math.ceil(p.size / p.extent))
    return [content_id(b"sim piece %d of %d" % (i, p.seed)) for i in range(count)]


def simulate(p: Params, scenarios: tuple[str, ...] = SCENARIOS) -> list[dict[str, Any]]:
    cids = piece_ids(p)
    return [Estate(p, s, cids).run() for s in scenarios]


# -- the table -------------------------------------------------------------------------

Row = tuple[str, Callable[[dict[str, Any]], str]]
ROWS: list[Row] = [
    ("origin copies per site, mean", lambda r: f"{r['origin_copies_per_site_mean']:.2f}"),
    ("origin copies per site, max", lambda r: f"{r['origin_copies_per_site_max']:.2f}"),
    ("origin (or server) link, GiB", lambda r: f"{r['origin_link_gib']:.1f}"),
    ("desktop download MiB, mean", lambda r: f"{r['desktop_down_mib_mean']:.0f}"),
    ("desktop download MiB, max", lambda r: f"{r['desktop_down_mib_max']:.0f}"),
    ("desktop upload MiB, mean", lambda r: f"{r['desktop_up_mib_mean']:.0f}"),
    ("desktop upload MiB, max", lambda r: f"{r['desktop_up_mib_max']:.0f}"),
    ("busiest link (by busy time)", lambda r: r["busiest_link"]),
    (
        "  its GiB / busy minutes",
        lambda r: f"{r['busiest_link_gib']:.1f} / {r['busiest_link_busy_min']:.1f}",
    ),
    (
        "mDNS msgs/node/min sent (heard)",
        lambda r: (
            f"{r['discovery_sent_per_node_min']:.3f} ({r['discovery_heard_per_node_min']:.1f})"
        ),
    ),
    (
        "digest msgs/node/min (KiB)",
        lambda r: f"{r['digest_msgs_per_node_min']:.1f} ({r['digest_kib_per_node_min']:.1f})",
    ),
    ("keepalive msgs/node/min", lambda r: f"{r['keepalive_msgs_per_node_min']:.0f}"),
    ("snapshot polls/node/min", lambda r: f"{r['polls_per_node_min']:.2f}"),
    ("95 % of readers done at (min)", lambda r: f"{r['p95_finished_min']:.1f}"),
    ("95th pct read time (min)", lambda r: f"{r['p95_read_min']:.1f}"),
    ("readers unfinished", lambda r: str(r["unfinished"])),
]


def table(results: list[dict[str, Any]]) -> str:
    heads = ["", *(r["scenario"] for r in results)]
    cells = [[label, *(fmt(r) for r in results)] for label, fmt in ROWS]
    widths = [max(len(row[i]) for row in [heads, *cells]) for i in range(len(heads))]

    def line(row: list[str]) -> str:
        first = row[0].ljust(widths[0])
        return (
            "| "
            + " | ".join([first, *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))])
            + " |"
        )

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(heads), rule, *(line(row) for row in cells)])


# -- the command line ------------------------------------------------------------------

_RATE = re.compile(r"(\d+(?:\.\d*)?)([KMG]?)(?:bit/?s|bps)?", re.IGNORECASE)


def rate(text: str) -> float:
    """Bytes per second of a line rate in bits: "100M" (Mbit/s), "1G", "10G"."""
    m = _RATE.fullmatch(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"a rate like 100M or 1G (bits/s), not {text!r}")
    scale = {"": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}[m.group(2).upper()]
    return float(m.group(1)) * scale / 8


def size(text: str) -> int:
    try:
        return parse_size(text, "size")
    except Exception as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def parse(argv: list[str] | None) -> tuple[Params, argparse.Namespace]:
    d = Params()
    ap = argparse.ArgumentParser(prog="benchmarks.sim_estate", description=__doc__.split("\n")[0])
    ap.add_argument("--sites", type=int, default=d.sites)
    ap.add_argument("--desktops", type=int, default=d.desktops, help="per site")
    ap.add_argument("--fraction", type=float, default=d.fraction, help="of desktops that read")
    ap.add_argument("--size", type=size, default=d.size, help="the snapshot (1G)")
    ap.add_argument("--extent", type=size, default=d.extent, help="simulated piece (4M)")
    ap.add_argument("--spread", type=float, default=d.spread_s / 60, help="minutes of starts")
    ap.add_argument("--uplink", type=rate, default=d.uplink, help="site WAN, bits/s (100M)")
    ap.add_argument("--lan", type=rate, default=d.lan, help="desktop port (1G)")
    ap.add_argument("--origin", type=rate, default=d.origin, help="object storage (10G)")
    ap.add_argument("--server", type=rate, default=d.server, help="central server (1G)")
    ap.add_argument("--proxy-lan", type=rate, default=d.proxy_lan, help="site proxy (1G)")
    ap.add_argument("--rtt", type=float, default=d.wan_rtt_s * 1000, help="WAN ms")
    ap.add_argument("--window", type=int, default=d.window, help="pieces in flight")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--scenario", choices=SCENARIOS, action="append")
    ap.add_argument("--json", action="store_true", help="print the results as JSON")
    a = ap.parse_args(argv)
    if a.sites < 1 or a.desktops < 2 or not 0 < a.fraction <= 1 or a.window < 1:
        ap.error("need sites >= 1, desktops >= 2, 0 < fraction <= 1, window >= 1")
    if a.size < 1 or a.extent < 1:
        ap.error("size and extent must be positive")
    p = Params(
        sites=a.sites,
        desktops=a.desktops,
        fraction=a.fraction,
        size=a.size,
        extent=a.extent,
        spread_s=a.spread * 60,
        uplink=a.uplink,
        lan=a.lan,
        origin=a.origin,
        server=a.server,
        proxy_lan=a.proxy_lan,
        wan_rtt_s=a.rtt / 1000,
        window=a.window,
        seed=a.seed,
    )
    return p, a


def main(argv: list[str] | None = None) -> int:
    p, a = parse(argv)
    results = simulate(p, tuple(a.scenario or SCENARIOS))
    if a.json:
        print(json.dumps({"params": asdict(p), "results": results}, indent=2))
        return 0
    mbit = 8 / 1e6
    print(
        f"  {p.sites} sites x {p.desktops} desktops, {p.fraction:.0%} read a "
        f"{p.size / 2**30:.2f} GiB snapshot starting within {p.spread_s / 60:.0f} min; "
        f"pieces of {p.extent >> 10} KiB, uplinks {p.uplink * mbit:.0f} Mbit/s, "
        f"LAN {p.lan * mbit:.0f}, origin {p.origin * mbit:.0f}, server {p.server * mbit:.0f}"
    )
    print(table(results))
    print("  simulated in " + ", ".join(f"{r['scenario']} {r['wall_s']:.0f} s" for r in results))
    return 1 if any(r["unfinished"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
