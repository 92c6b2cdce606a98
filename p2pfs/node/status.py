"""One status model: what ``p2pfs status`` shows, built alike by the daemon and offline.

Every service reports its counters as ``statistics()``, a frozen record; this
module gathers them into ``NodeStatus`` and renders the one JSON shape
(docs/cli.md, "status"). The daemon fills in everything; without a daemon
(``offline``) the parts read from disk are the same code, and what only a running
node knows (peers, fetches, the mount) is absent.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any

from p2pfs import config as config_mod
from p2pfs.errors import P2pfsError
from p2pfs.fs.api import FuseStats
from p2pfs.fs.vfs import FsStats
from p2pfs.home import Home
from p2pfs.net.following import SyncStats
from p2pfs.net.service import NetworkStats
from p2pfs.origin.watch import OriginStats
from p2pfs.store.cas import StoreStats
from p2pfs.store.quota import CacheUsage
from p2pfs.trust.estate import Estate
from p2pfs.volume.content import ContentStats
from p2pfs.volume.pins import PinRegistry, PinState, pin_states
from p2pfs.volume.publish import PublisherStats
from p2pfs.volume.registry import VolumeRegistry

from .desktop_api import LinkStats
from .keeper import ScrubStats


@dataclass(frozen=True)
class DaemonInfo:
    pid: int
    started: float  # time.time() at start
    mountpoint: str | None  # while mounted
    loop_stalls: int = 0  # times the event loop was blocked (node/stalls.py)
    longest_loop_stall_s: float = 0.0


@dataclass(frozen=True)
class VolumeInfo:
    name: str
    id: str
    seq: int  # 0: nothing committed yet
    snapshot: str | None
    writable: bool
    live: PublisherStats | None = None  # a writable volume's publisher
    access: str = "public"  # or, for a private volume: reader, cache-only, none
    problem: str | None = None  # why this node cannot read it, or gets no newer snapshot


@dataclass(frozen=True)
class DiskParts:
    """What status reads from disk: the store's index, the pins, the registry. Blocking."""

    node_id: str
    home: str
    store: StoreStats
    cache: CacheUsage
    pins: tuple[PinState, ...]


@dataclass(frozen=True)
class NodeStatus:
    disk: DiskParts
    volumes: tuple[VolumeInfo, ...]
    estate: str | None = None
    daemon: DaemonInfo | None = None
    content: ContentStats | None = None
    scrub: ScrubStats | None = None
    fs: FsStats | None = None
    network: NetworkStats | None = None
    sync: SyncStats | None = None
    desktop_link: LinkStats | None = None
    fuse: FuseStats | None = None  # while mounted
    origins: OriginStats | None = None

    def to_json(self) -> dict[str, Any]:
        d = self.disk
        out: dict[str, Any] = {
            "node_id": d.node_id,
            "home": d.home,
            "daemon": None,
            "volumes": [_volume(v) for v in self.volumes],
            "store": dataclasses.asdict(d.store),
            "cache": {
                "bytes": d.cache.bytes,
                "quota": d.cache.quota,
                "max_bytes": d.cache.max_bytes,
                "min_free_bytes": d.cache.min_free_bytes,
                "pinned_bytes": d.cache.pinned_bytes,
                "evictions": d.cache.evictions,
            },
            "offline_ready": all(p.complete for p in d.pins),
            "pins": len(d.pins),
            "estate": self.estate,
            "peers": [],
            "bytes_from": {
                "local": self.content.bytes_from_local if self.content else 0,
                "peers": 0,
                "origin": 0,
            },
            "bytes_served": 0,
            "corrupt_chunks_rejected": 0,
            "quarantined_peers": 0,
        }
        if self.daemon is not None:
            out["daemon"] = {
                "pid": self.daemon.pid,
                "uptime_s": round(time.time() - self.daemon.started, 1),
                "mountpoint": self.daemon.mountpoint,
                "loop_stalls": self.daemon.loop_stalls,
                "longest_loop_stall_s": round(self.daemon.longest_loop_stall_s, 1),
            }
        if self.content is not None:
            c = self.content.chunks
            out["memory_cache"] = {
                "bytes": c.bytes,
                "hits": c.hits,
                "misses": c.misses,
                "evictions": c.evictions,
            }
        if self.scrub is not None:
            out["scrub"] = dataclasses.asdict(self.scrub)
        if self.fs is not None:
            out["fuse_errors"] = self.fs.errors
            out["inodes"] = self.fs.inodes
        if self.fuse is not None:
            out["fuse_requests"] = {
                "calls": dict(self.fuse.calls),
                "errors": dict(self.fuse.errors),
                "page_cache_pushed_bytes": self.fuse.page_cache_pushed_bytes,
                "page_cache_dropped": self.fuse.page_cache_dropped,
            }
        if self.network is not None:
            n, f = self.network, self.network.fetch
            out |= {
                "port": n.port,
                "peers": [peer_json(p) for p in n.peers],
                "bytes_served": n.bytes_served,
                "chunks_served": n.chunks_served,
                "corrupt_chunks_rejected": f.corrupt_chunks_rejected,
                "quarantined_peers": n.quarantined_peers,
                "fetch": {
                    "chunks": f.chunks_fetched,
                    "hedged": f.hedged_requests,
                    "failed": f.failed_fetches,
                },
                "connections_refused": n.connections_refused,
                "connections_dropped": n.connections_dropped,
                "protocol_errors": n.protocol_errors,
                "peers_from_hints": n.peers_from_hints,
            }
            out["bytes_from"] |= {"peers": f.bytes_from_peers, "origin": f.bytes_from_origin}
        if self.sync is not None:
            out["snapshots"] = {
                "accepted": self.sync.accepted,
                "refused": self.sync.refused,
                "recent_refusals": list(self.sync.recent_refusals),
            }
        if self.origins is not None:
            o = self.origins
            out["origins"] = {
                "sources": [dataclasses.asdict(s) for s in o.sources],
                "uploads": [dataclasses.asdict(u) for u in o.uploads],
                "snapshots_taken": o.snapshots_from_origins,
                "poll_errors": o.poll_errors,
            }
        if self.desktop_link is not None:
            link = dataclasses.asdict(self.desktop_link)
            out["desktop_link"] = link | {
                "listening": list(link["listening"]),
                "desktops": list(link["desktops"]),
            }
        return out


def peer_json(p: Any) -> dict[str, Any]:
    d = dataclasses.asdict(p)
    d["volumes"] = list(d["volumes"])
    return d


def _volume(v: VolumeInfo) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": v.name,
        "id": v.id,
        "seq": v.seq,
        "snapshot": v.snapshot,
        "writable": v.writable,
        "access": v.access,
        "problem": v.problem,
    }
    if v.live is not None:
        out["live"] = dataclasses.asdict(v.live)
    return out


def read_disk(home: Home, store: Any) -> DiskParts:
    """The on-disk parts of the status (blocking: run it in a worker thread)."""
    return DiskParts(
        node_id=home.node_id().hex(),
        home=str(home.root),
        store=store.statistics(),
        cache=store.cache_usage(),
        pins=tuple(pin_states(PinRegistry(home), store)),
    )


def registry_volumes(registry: VolumeRegistry) -> tuple[VolumeInfo, ...]:
    """The volumes as the registry records them (their heads), for a node not running."""
    out = []
    for name in registry.names():
        r = registry.get(name)
        if r.head is not None:
            out.append(VolumeInfo(name, r.id.hex(), r.seq, r.head.hex(), False))
    return tuple(out)


def offline(home: Home) -> NodeStatus:
    """The status of a node whose daemon is not running (blocking)."""
    from p2pfs.store.cas import Store

    cfg = config_mod.load(home.config_file)
    store = Store(
        home.store_dir,
        max_bytes=cfg.cache_max_bytes,
        min_free_bytes=cfg.cache_min_free_bytes,
        evict_to_fit=False,  # status reports; it changes nothing
    )
    try:
        disk = read_disk(home, store)
    finally:
        store.close()
    try:
        estate = Estate.load(home)
    except P2pfsError:
        estate = None
    return NodeStatus(
        disk=disk,
        volumes=registry_volumes(VolumeRegistry(home)),
        estate=estate.estate_id.hex() if estate else None,
    )


def daemon_info(
    started: float, mountpoint: str | None, stalls: int = 0, longest_stall_s: float = 0.0
) -> DaemonInfo:
    return DaemonInfo(os.getpid(), started, mountpoint, stalls, longest_stall_s)
