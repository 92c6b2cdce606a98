"""A node's summary: what it tells a member that asks (the ``summary`` request), for the
estate view (docs/monitoring.md, "The estate view").

A summary is a few hundred bytes of counters and names: the node's name and site, its
version, the volumes it follows and the snapshot it is on, cache fill, whether its
pins are all held (offline-ready), corruption and quarantine counts, bytes by source,
and a history of bytes by source (one sample a minute for an hour), so that the
view's chart covers the last hour whoever opened it when. A node tells only the
volumes the asker may see; a received summary is hostile input like any other and
``NodeSummary.from_wire`` checks every field.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from p2pfs.errors import DecodeError, P2pfsError
from p2pfs.objects import codec
from p2pfs.objects.model import validate_volume_name

from .status import NodeStatus

MAX_SUMMARY_BYTES = 64 * 1024
MAX_LABEL = 64
MAX_VOLUMES = 256
MAX_PROBLEMS = 16
MAX_PROBLEM_TEXT = 200
HISTORY_INTERVAL_S = 60
HISTORY_SAMPLES = 61  # an hour of intervals
_U64 = 2**64 - 1


class BadSummary(P2pfsError):
    """A peer's summary that is not one (malformed, out of bounds)."""


@dataclass(frozen=True)
class VolumeSummary:
    name: str
    seq: int
    snapshot: str | None  # hex id of the snapshot the node is on
    access: str  # public, reader, cache-only, none


# One history sample: (unix time, bytes read from local, from peers, from origins), as
# running totals since the daemon started.
Sample = tuple[int, int, int, int]


@dataclass(frozen=True)
class NodeSummary:
    name: str
    site: str | None
    version: str
    uptime_s: int
    volumes: tuple[VolumeSummary, ...]
    cache_bytes: int
    cache_quota: int | None
    offline_ready: bool
    pins: int
    corrupt_chunks_rejected: int
    quarantined_peers: int
    peers_connected: int
    bytes_from: tuple[int, int, int]  # local, peers, origin
    bytes_served: int
    problems: tuple[str, ...]
    history: tuple[Sample, ...]

    def to_wire(self) -> bytes:
        return codec.pack(
            {
                "name": self.name,
                "site": self.site,
                "ver": self.version,
                "up": self.uptime_s,
                "vols": [[v.name, v.seq, v.snapshot, v.access] for v in self.volumes],
                "cache": [self.cache_bytes, self.cache_quota],
                "ready": self.offline_ready,
                "pins": self.pins,
                "corrupt": self.corrupt_chunks_rejected,
                "quar": self.quarantined_peers,
                "peers": self.peers_connected,
                "from": list(self.bytes_from),
                "served": self.bytes_served,
                "probs": list(self.problems),
                "hist": [list(s) for s in self.history],
            }
        )

    @classmethod
    def from_wire(cls, data: bytes) -> NodeSummary:
        try:
            doc = codec.unpack(data, max_size=MAX_SUMMARY_BYTES, max_depth=4)
        except DecodeError as e:
            raise BadSummary(f"summary: {e}") from None
        if not isinstance(doc, dict):
            raise BadSummary("summary: not a map")
        quota = _field(doc, "cache", list)
        if len(quota) != 2:
            raise BadSummary("summary: cache must be [bytes, quota]")
        sources = _field(doc, "from", list)
        if len(sources) != 3:
            raise BadSummary("summary: from must be [local, peers, origin]")
        return cls(
            name=_label(doc.get("name"), "name"),
            site=None if doc.get("site") is None else _label(doc.get("site"), "site"),
            version=_label(doc.get("ver"), "version"),
            uptime_s=_count(doc.get("up"), "up"),
            volumes=tuple(_volume(v) for v in _bounded(doc, "vols", MAX_VOLUMES)),
            cache_bytes=_count(quota[0], "cache"),
            cache_quota=None if quota[1] is None else _count(quota[1], "quota"),
            offline_ready=_field(doc, "ready", bool),
            pins=_count(doc.get("pins"), "pins"),
            corrupt_chunks_rejected=_count(doc.get("corrupt"), "corrupt"),
            quarantined_peers=_count(doc.get("quar"), "quar"),
            peers_connected=_count(doc.get("peers"), "peers"),
            bytes_from=(
                _count(sources[0], "from"),
                _count(sources[1], "from"),
                _count(sources[2], "from"),
            ),
            bytes_served=_count(doc.get("served"), "served"),
            problems=tuple(_text(p) for p in _bounded(doc, "probs", MAX_PROBLEMS)),
            history=tuple(_sample(s) for s in _bounded(doc, "hist", HISTORY_SAMPLES)),
        )


def _field(doc: dict[str, Any], key: str, kind: type) -> Any:
    value = doc.get(key)
    if not isinstance(value, kind):
        raise BadSummary(f"summary: {key} must be {kind.__name__}")
    return value


def _bounded(doc: dict[str, Any], key: str, limit: int) -> list[Any]:
    items: list[Any] = _field(doc, key, list)
    if len(items) > limit:
        raise BadSummary(f"summary: more than {limit} {key}")
    return items


def _count(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U64:
        raise BadSummary(f"summary: {what} must be a count")
    return value


def _label(value: object, what: str) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= MAX_LABEL or not value.isprintable():
        raise BadSummary(f"summary: {what} must be printable text of 1..{MAX_LABEL} characters")
    return value


def _text(value: object) -> str:
    if not isinstance(value, str) or len(value) > MAX_PROBLEM_TEXT or not value.isprintable():
        raise BadSummary(f"summary: a problem must be printable text up to {MAX_PROBLEM_TEXT}")
    return value


def _volume(item: object) -> VolumeSummary:
    if not isinstance(item, list) or len(item) != 4:
        raise BadSummary("summary: a volume must be [name, seq, snapshot, access]")
    name, seq, snapshot, access = item
    if snapshot is not None and (
        not isinstance(snapshot, str)
        or len(snapshot) != 64
        or not all(c in "0123456789abcdef" for c in snapshot)
    ):
        raise BadSummary("summary: a volume's snapshot must be a hex id")
    if access not in ("public", "reader", "cache-only", "none"):
        raise BadSummary("summary: a volume's access is unknown")
    if not isinstance(name, str):
        raise BadSummary("summary: a volume name must be text")
    try:
        validate_volume_name(name)  # the one name rule, as every other message has it
    except DecodeError as e:
        raise BadSummary(f"summary: {e}") from None
    return VolumeSummary(name, _count(seq, "seq"), snapshot, access)


def _sample(item: object) -> Sample:
    if not isinstance(item, list) or len(item) != 4:
        raise BadSummary("summary: a history sample must be [time, local, peers, origin]")
    t, local, peers, origin = (_count(x, "history") for x in item)
    return t, local, peers, origin


class History:
    """Bytes by source, sampled once a minute (the running totals), for an hour."""

    def __init__(self, totals: Callable[[], tuple[int, int, int]]) -> None:
        self.totals = totals
        self.samples: deque[Sample] = deque(maxlen=HISTORY_SAMPLES)

    def sample(self, now: float | None = None) -> None:
        local, peers, origin = self.totals()
        self.samples.append((int(now if now is not None else time.time()), local, peers, origin))

    def with_now(self) -> tuple[Sample, ...]:
        """The samples and, last, the totals as they are now (the current minute)."""
        local, peers, origin = self.totals()
        now: Sample = (int(time.time()), local, peers, origin)
        return (*tuple(self.samples)[-(HISTORY_SAMPLES - 1) :], now)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else " " for c in text)[:MAX_PROBLEM_TEXT]


def summarize(
    status: NodeStatus,
    *,
    name: str,
    site: str | None,
    version: str,
    history: tuple[Sample, ...],
    may_see: Callable[[str], bool] = lambda volume_id: True,
) -> NodeSummary:
    """This node's summary as ``may_see`` (by volume id, hex) lets the asker see it."""
    s = status.to_json()
    volumes = tuple(
        VolumeSummary(v["name"], v["seq"], v["snapshot"], v["access"])
        for v in s["volumes"]
        if may_see(v["id"])
    )[:MAX_VOLUMES]
    problems = [
        _printable(f"{v['name']}: {v['problem']}")
        for v in s["volumes"]
        if v["problem"] and may_see(v["id"])
    ]
    for v in s["volumes"]:
        why = (v.get("live") or {}).get("failsafe")
        if why and may_see(v["id"]):
            problems.append(_printable(f"{v['name']}: writes refused until restart: {why}"))
    if s.get("fuse_errors"):
        problems.append(f"{s['fuse_errors']} unexpected filesystem errors (see the log)")
    frm = s["bytes_from"]
    daemon = s.get("daemon") or {}
    return NodeSummary(
        name=name,
        site=site,
        version=version[:MAX_LABEL],
        uptime_s=int(daemon.get("uptime_s", 0)),
        volumes=volumes,
        cache_bytes=s["cache"]["bytes"],
        cache_quota=s["cache"]["quota"],
        offline_ready=bool(s["offline_ready"]),
        pins=s["pins"],
        corrupt_chunks_rejected=s["corrupt_chunks_rejected"],
        quarantined_peers=s["quarantined_peers"],
        peers_connected=sum(1 for p in s["peers"] if p["state"] == "connected"),
        bytes_from=(frm["local"], frm["peers"], frm["origin"]),
        bytes_served=s["bytes_served"],
        problems=tuple(problems[:MAX_PROBLEMS]),
        history=history,
    )
