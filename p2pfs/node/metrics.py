"""The node's metrics in Prometheus text format: ``[metrics] listen`` (docs/monitoring.md).

Every scrape takes one ``NodeStatus`` on the trio thread (``Daemon.status``, the
record ``p2pfs status --json`` renders) and turns that frozen snapshot into metric
families. Nothing here reads a service's live counters, so no other thread ever
touches the event loop's state, and the numbers a scrape shows are the numbers
status shows. The HTTP side is a few lines on trio rather than prometheus_client's
server thread for the same reason; prometheus_client (this library's only home)
writes the exposition format.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Iterator

import trio
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry

from p2pfs import __version__
from p2pfs.errors import P2pfsError
from p2pfs.net.fetcher import FETCH_SECONDS_BUCKETS

from .http import HttpServer, Request, Response, text
from .status import NodeStatus

log = logging.getLogger(__name__)

# Every peer state the peer table uses: each is exported, 0 when no peer is in it, so an
# alert on a state has a series to compare even before a peer enters it.
PEER_STATES = ("candidate", "connecting", "connected", "unreachable", "quarantined", "rejected")


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _labelled(
    family: type[CounterMetricFamily] | type[GaugeMetricFamily],
    name: str,
    doc: str,
    label: str,
    values: Iterable[tuple[str, float]],
) -> Metric:
    m = family(name, doc, labels=[label])
    for key, value in values:
        m.add_metric([key], value)
    return m


def families(s: NodeStatus) -> Iterator[Metric]:
    """The metric families of one status snapshot (names and meanings: docs/monitoring.md)."""
    d = s.disk
    info = InfoMetricFamily("p2pfs_node", "This node: its id, estate and p2pfs version.")
    info.add_metric([], {"node_id": d.node_id, "estate": s.estate or "", "version": __version__})
    yield info
    if s.daemon is not None:
        yield _gauge(
            "p2pfs_start_time_seconds", "When the daemon started (Unix time).", s.daemon.started
        )
        yield _gauge(
            "p2pfs_mounted", "1 while the volumes are mounted.", float(bool(s.daemon.mountpoint))
        )
        yield _counter(
            "p2pfs_event_loop_stalls",
            "Times the daemon's event loop was blocked for a second or more (each logged).",
            s.daemon.loop_stalls,
        )

    local = s.content.bytes_from_local if s.content else 0
    fetch = s.network.fetch if s.network else None
    yield _labelled(
        CounterMetricFamily,
        "p2pfs_read_bytes",
        "Chunk bytes read, by where they came from (local store, peers, the origin).",
        "source",
        [
            ("local", local),
            ("peers", fetch.bytes_from_peers if fetch else 0),
            ("origin", fetch.bytes_from_origin if fetch else 0),
        ],
    )

    # The store and its quota.
    c = d.cache
    yield _gauge("p2pfs_cache_bytes", "Bytes of chunks and objects in the local store.", c.bytes)
    yield _gauge("p2pfs_cache_chunks", "Chunks and objects in the local store.", c.chunks)
    if c.quota is not None:
        yield _gauge(
            "p2pfs_cache_quota_bytes",
            "The store's effective quota now: [cache] max_bytes, less if the disk is short.",
            c.quota,
        )
    if c.max_bytes is not None:
        yield _gauge(
            "p2pfs_cache_max_bytes", "The configured quota ([cache] max_bytes).", c.max_bytes
        )
    yield _gauge(
        "p2pfs_cache_min_free_bytes", "Free disk space the store never takes.", c.min_free_bytes
    )
    yield _gauge("p2pfs_cache_pinned_bytes", "Stored bytes held by pins.", c.pinned_bytes)
    yield _counter(
        "p2pfs_cache_evictions", "Chunks evicted from the store to stay in its quota.", c.evictions
    )
    yield _counter(
        "p2pfs_store_corrupt_chunks",
        "Chunks found corrupt in the local store, ever (read or scrub).",
        d.store.corrupt_chunks,
    )
    yield _gauge(
        "p2pfs_store_quarantined_files", "Files now in the store's quarantine.", d.store.quarantined
    )

    # Pins and offline readiness.
    yield _gauge("p2pfs_pins", "Pins on this node.", len(d.pins))
    yield _gauge(
        "p2pfs_offline_ready",
        "1 when every pin is wholly stored here (it reads with no network).",
        float(all(p.complete for p in d.pins)),
    )
    pin_complete = GaugeMetricFamily(
        "p2pfs_pin_complete", "1 when the pin is wholly stored here.", labels=["pin", "volume"]
    )
    pin_bytes = GaugeMetricFamily(
        "p2pfs_pin_stored_bytes", "Bytes of the pin stored here.", labels=["pin", "volume"]
    )
    pin_missing = GaugeMetricFamily(
        "p2pfs_pin_missing_chunks", "Chunks of the pin not stored here.", labels=["pin", "volume"]
    )
    for p in d.pins:
        pin_complete.add_metric([p.name, p.volume], float(p.complete))
        pin_bytes.add_metric([p.name, p.volume], p.bytes)
        pin_missing.add_metric([p.name, p.volume], p.ids - p.present)
    yield from (pin_complete, pin_bytes, pin_missing)

    # Volumes and commits.
    yield _gauge("p2pfs_volumes", "Volumes this node shows or follows.", len(s.volumes))
    seq = GaugeMetricFamily(
        "p2pfs_volume_snapshot_seq", "The sequence number of the volume's head.", labels=["volume"]
    )
    readable = GaugeMetricFamily(
        "p2pfs_volume_readable",
        "0 when status names a problem: the volume is not readable here, or gets no newer snapshot.",
        labels=["volume"],
    )
    commits = CounterMetricFamily(
        "p2pfs_commits", "Snapshots committed here by a writable volume.", labels=["volume"]
    )
    uncommitted = GaugeMetricFamily(
        "p2pfs_volume_uncommitted",
        "1 while a writable volume has changes not yet committed.",
        labels=["volume"],
    )
    failsafe = GaugeMetricFamily(
        "p2pfs_volume_failsafe",
        "1 while a writable volume refuses writes (failsafe).",
        labels=["volume"],
    )
    for v in s.volumes:
        seq.add_metric([v.name], v.seq)
        readable.add_metric([v.name], float(v.problem is None))
        if v.live is not None:
            commits.add_metric([v.name], v.live.commits)
            uncommitted.add_metric([v.name], float(v.live.uncommitted))
            failsafe.add_metric([v.name], float(v.live.failsafe is not None))
    yield from (seq, readable, commits, uncommitted, failsafe)

    if s.content is not None:
        m = s.content.chunks
        yield _gauge("p2pfs_memory_cache_bytes", "Verified chunk bytes held in memory.", m.bytes)
        yield _counter("p2pfs_memory_cache_hits", "Chunk reads served from memory.", m.hits)
        yield _counter("p2pfs_memory_cache_misses", "Chunk reads that loaded the chunk.", m.misses)
        yield _counter("p2pfs_memory_cache_evictions", "Chunks dropped from memory.", m.evictions)

    if s.scrub is not None:
        sc = s.scrub
        if sc.last_run is not None:
            yield _gauge(
                "p2pfs_scrub_last_run_timestamp_seconds",
                "When the last scrub of the store finished (Unix time).",
                sc.last_run,
            )
        yield _counter(
            "p2pfs_scrub_checked_chunks", "Chunks the scrubs verified.", sc.chunks_checked
        )
        yield _counter(
            "p2pfs_scrub_corrupt_chunks", "Corrupt chunks the scrubs found.", sc.corrupt_found
        )
        yield _counter(
            "p2pfs_scrub_healed_chunks", "Corrupt chunks fetched again whole.", sc.healed
        )
        yield _counter(
            "p2pfs_scrub_unhealed_chunks",
            "Corrupt chunks no peer or origin could replace.",
            sc.unhealed,
        )
        yield _gauge("p2pfs_scrub_running", "1 while a scrub runs.", float(sc.running))

    if s.fs is not None:
        yield _counter(
            "p2pfs_fuse_unexpected_errors",
            "FUSE requests that hit a bug and were answered EIO (logged with a traceback).",
            s.fs.errors,
        )
        yield _gauge("p2pfs_fuse_inodes", "Snapshot inodes the kernel holds.", s.fs.inodes)
    if s.fuse is not None:
        yield _labelled(
            CounterMetricFamily,
            "p2pfs_fuse_requests",
            "FUSE requests, by operation.",
            "operation",
            s.fuse.calls,
        )
        yield _labelled(
            CounterMetricFamily,
            "p2pfs_fuse_errors",
            "FUSE requests answered with an errno, by operation (ENOENT included).",
            "operation",
            s.fuse.errors,
        )
        yield _counter(
            "p2pfs_page_cache_pushed_bytes",
            "Bytes of verified chunks handed to the kernel's page cache after random reads.",
            s.fuse.page_cache_pushed_bytes,
        )

    if s.network is not None:
        n = s.network
        assert fetch is not None
        yield _counter("p2pfs_served_bytes", "Chunk bytes served to peers.", n.bytes_served)
        yield _counter("p2pfs_served_chunks", "Chunks served to peers.", n.chunks_served)
        yield _counter(
            "p2pfs_fetched_chunks", "Chunks fetched from peers or the origin.", fetch.chunks_fetched
        )
        yield _counter(
            "p2pfs_fetch_hedged_requests",
            "Second requests sent because the first was slow.",
            fetch.hedged_requests,
        )
        yield _counter(
            "p2pfs_fetch_failures",
            "Fetches that failed: nothing arrived from anyone within [fetch] deadline_s.",
            fetch.failed_fetches,
        )
        yield _counter(
            "p2pfs_corrupt_chunks_rejected",
            "Chunks a peer sent that did not hash to their id (the peer is quarantined).",
            fetch.corrupt_chunks_rejected,
        )
        if fetch.fetch_seconds:
            cumulative, buckets = 0, []
            for bound, count in zip(
                (*FETCH_SECONDS_BUCKETS, math.inf), fetch.fetch_seconds, strict=True
            ):
                cumulative += count
                buckets.append(("+Inf" if bound == math.inf else repr(bound), float(cumulative)))
            yield HistogramMetricFamily(
                "p2pfs_chunk_fetch_seconds",
                "Time to fetch a chunk the store lacked, from the first request to verified bytes.",
                buckets=buckets,
                sum_value=fetch.fetch_seconds_sum,
            )
        yield _gauge("p2pfs_quarantined_peers", "Peers now quarantined.", n.quarantined_peers)
        states = Counter({state: 0 for state in PEER_STATES})
        states.update(p.state for p in n.peers)
        yield _labelled(
            GaugeMetricFamily, "p2pfs_peers", "Peers, by state.", "state", sorted(states.items())
        )
        yield _counter(
            "p2pfs_connections_refused", "Connections refused at the door.", n.connections_refused
        )
        yield _counter(
            "p2pfs_connections_dropped",
            "Connections dropped before they authenticated (too many at once).",
            n.connections_dropped,
        )
        yield _counter(
            "p2pfs_protocol_errors",
            "Connections closed because the peer broke the protocol.",
            n.protocol_errors,
        )

    if s.sync is not None:
        yield _counter(
            "p2pfs_snapshots_accepted", "Newer snapshots accepted from peers.", s.sync.accepted
        )
        yield _counter(
            "p2pfs_snapshots_refused",
            "Snapshots refused (unendorsed, bad signature, replayed, ...).",
            s.sync.refused,
        )

    if s.desktop_link is not None:
        link = s.desktop_link
        yield _gauge("p2pfs_desktop_link_active", "Desktop link connections open now.", link.active)
        yield _counter("p2pfs_desktop_link_requests", "Desktop link requests.", link.requests)
        yield _counter(
            "p2pfs_desktop_link_read_bytes", "Bytes desktops read over the link.", link.bytes_read
        )
        yield _counter(
            "p2pfs_desktop_link_refused_tokens", "Desktop tokens refused.", link.refused_tokens
        )


class _Snapshot:
    """A collector over one status snapshot (prometheus_client's Collector protocol)."""

    def __init__(self, status: NodeStatus) -> None:
        self.status = status

    def collect(self) -> Iterable[Metric]:
        return list(families(self.status))


def render(status: NodeStatus) -> bytes:
    """The exposition text of one status snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshot(status))
    return generate_latest(registry)


class MetricsServer:
    """``GET /metrics`` on one TCP address, answered from a fresh status snapshot."""

    def __init__(
        self, address: tuple[str, int], snapshot: Callable[[], Awaitable[NodeStatus]]
    ) -> None:
        self.http = HttpServer(address, self._answer, what="metrics", setting="[metrics] listen")
        self.address = address
        self.snapshot = snapshot
        self.scrapes = 0
        # One snapshot at a time: scrapers that arrive together wait rather than
        # multiply the disk reads status makes.
        self._lock = trio.Lock()

    async def listen(self) -> None:
        """Bind now, so that a bad or busy address is a clear start-up error."""
        await self.http.listen()
        log.info("metrics on http://%s:%d/metrics", *self.address)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        await self.http.run(task_status=task_status)

    async def _answer(self, request: Request) -> Response:
        if request.path not in ("/metrics", "/"):
            return text("404 Not Found", "metrics are at /metrics")
        async with self._lock:
            try:
                status = await self.snapshot()
            except P2pfsError as e:
                log.warning("metrics: no status: %s", e)
                return text("503 Service Unavailable", str(e))
        self.scrapes += 1
        return Response("200 OK", render(status), CONTENT_TYPE_LATEST)
