"""What a desktop sees of its appliance: ``status`` and ``peers`` over the desktop link.

The node's full status (``node/status.py``, the JSON of ``p2pfs status --json``) is
for the admin: it names the node's home, its mountpoint, every peer's address and
port. A desktop user needs something else: can I read, is anything wrong, how much
is cached, is it ready for offline use. These pure functions derive that view from
the full status's JSON (one rendering of the status, not a second model), keeping
only counts, names of volumes, snapshot numbers and times, and shortened peer ids:
no file path, no home, no IP address and no port can appear in their answers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from p2pfs.fs.vfs import Head

PEER_ID_CHARS = 16  # a peer is named by this many hex digits of its node id
CACHE_FULL = 0.95  # a cache this full of its quota is a problem worth showing


def _connected(peers: Sequence[Mapping[str, Any]]) -> int:
    return sum(1 for p in peers if p.get("state") == "connected")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def health(
    full: Mapping[str, Any], pins: Sequence[Mapping[str, Any]], volumes: int
) -> tuple[str, list[str]]:
    """("ok" | "degraded" | "offline", problems): offline when the appliance reaches no
    peer (it serves only what it holds), degraded when anything else is wrong.
    ``volumes``: how many the desktop can read."""
    problems: list[str] = []
    peers = full.get("peers") or []
    offline = False
    if full.get("estate") is None:
        offline = True
        problems.append("the appliance has joined no estate: only what it holds can be read")
    elif _connected(peers) == 0:
        offline = True
        problems.append("no peer is connected: only what the appliance holds can be read")
    if not volumes:
        problems.append("no volume to read yet")
    quarantined = int(full.get("quarantined_peers") or 0)
    if quarantined:
        problems.append(f"{_plural(quarantined, 'peer')} quarantined for sending bad data")
    unhealed = int((full.get("scrub") or {}).get("unhealed") or 0)
    if unhealed:
        problems.append(f"{_plural(unhealed, 'stored chunk')} found corrupt and not healed")
    if full.get("fuse_errors"):
        problems.append(
            f"{_plural(int(full['fuse_errors']), 'internal error')} (see the appliance's log)"
        )
    incomplete = sum(1 for p in pins if not p.get("complete"))
    if incomplete:
        problems.append(
            f"{incomplete} of {_plural(len(pins), 'pin')} not complete: "
            "not everything pinned reads offline yet"
        )
    cache = full.get("cache") or {}
    used, quota = int(cache.get("bytes") or 0), cache.get("quota")
    if quota and used >= CACHE_FULL * quota:
        problems.append(f"the cache is {round(100 * used / quota)}% full")
    if offline:
        return "offline", problems
    return ("degraded" if problems else "ok"), problems


def desktop_status(
    full: Mapping[str, Any],
    pins: Sequence[Mapping[str, Any]],
    heads: Mapping[str, Head],
    *,
    allow_pin: bool,
    snapshots: bool,
) -> dict[str, Any]:
    """The desktop's ``status``: from the full status JSON, the pins (the ``pins``
    operation's list) and the volumes the desktop can read (``heads``)."""
    state, problems = health(full, pins, len(heads))
    peers = full.get("peers") or []
    cache = full.get("cache") or {}
    bytes_from = full.get("bytes_from") or {}
    daemon = full.get("daemon") or {}
    return {
        "appliance": full.get("node_id"),
        "estate": full.get("estate"),
        "health": state,
        "problems": problems,
        "volumes": [
            {
                "name": name,
                "seq": head.snapshot.seq,
                "snapshot_time": round(head.snapshot.time_ns / 1e9, 3),
            }
            for name, head in sorted(heads.items())
        ],
        "offline_ready": all(p.get("complete") for p in pins),
        "pins": {
            "count": len(pins),
            "complete": sum(1 for p in pins if p.get("complete")),
            "bytes": sum(int(p.get("bytes") or 0) for p in pins),
        },
        "peers": {"connected": _connected(peers), "known": len(peers)},
        "cache": {"used": int(cache.get("bytes") or 0), "quota": cache.get("quota")},
        "bytes_from": {k: int(bytes_from.get(k) or 0) for k in ("local", "peers", "origin")},
        "corrupt_chunks_rejected": int(full.get("corrupt_chunks_rejected") or 0),
        "uptime_s": daemon.get("uptime_s"),
        "policy": {"pin": allow_pin, "snapshots": snapshots},
    }


def desktop_peers(full: Mapping[str, Any]) -> dict[str, Any]:
    """The desktop's ``peers``: each peer as the first PEER_ID_CHARS hex digits of its id,
    its state and the bytes the appliance got from it; never an address or a port."""
    peers = full.get("peers") or []
    return {
        "peers": [
            {
                "peer": str(p.get("node_id", ""))[:PEER_ID_CHARS],
                "state": p.get("state"),
                "bytes_from": int(p.get("bytes_from") or 0),
            }
            for p in peers
        ],
        "connected": _connected(peers),
        "known": len(peers),
    }
