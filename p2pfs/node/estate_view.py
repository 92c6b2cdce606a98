"""The estate as one node sees it: its own summary and its peers', for ``p2pfs web``.

A node's peers tell their summaries when asked (the ``summary`` request). Asking every
peer costs each a status, so a node asks only while somebody looks: for a minute after
the view was last requested, every ``POLL_INTERVAL_S``. What a peer last told is kept
with the time it was told, so a node that went away still shows, with its state
(unreachable, quarantined, not connected) and how long ago it was heard from. On the
admin node, every node it ever approved shows, heard from or not.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from p2pfs import __version__
from p2pfs.errors import P2pfsError
from p2pfs.net.connection import PeerUnavailable
from p2pfs.net.service import Network

from .status import NodeStatus
from .summary import HISTORY_INTERVAL_S, BadSummary, History, NodeSummary, summarize

log = logging.getLogger(__name__)

POLL_INTERVAL_S = 5.0
WATCHED_FOR_S = 60.0  # peers are asked this long after the view was last requested
SUMMARY_TIMEOUT_S = 5.0
OWN_SUMMARY_MAX_AGE_S = 2.0  # peers that ask together share one status


@dataclass
class Heard:
    summary: NodeSummary
    at: float  # time.time() when it arrived


class EstateWatch:
    def __init__(
        self,
        status: Callable[[], Awaitable[NodeStatus]],
        network: Network | None,
        *,
        name: str,
        site: str | None,
        approved: Callable[[], list[bytes]] = list,
    ) -> None:
        self.status = status
        self.network = network
        self.name = name
        self.site = site
        self.approved = approved
        self.history = History(self._totals)
        self.heard: dict[bytes, Heard] = {}
        self.bad_summaries = 0
        self._last_status: NodeStatus | None = None
        self._status_at = -1e9
        self._status_lock = trio.Lock()
        self._watched_until = 0.0
        self._wake = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if self.network is not None:
            self.network.summary = self.summary_for
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._sample)
            nursery.start_soon(self._poll)
            task_status.started()

    def _totals(self) -> tuple[int, int, int]:
        s = self._last_status
        if s is None:
            return 0, 0, 0
        f = s.network.fetch if s.network else None
        local = s.content.bytes_from_local if s.content else 0
        return local, f.bytes_from_peers if f else 0, f.bytes_from_origin if f else 0

    async def _own_status(self) -> NodeStatus:
        async with self._status_lock:
            if self._last_status is None or trio.current_time() - self._status_at > (
                OWN_SUMMARY_MAX_AGE_S
            ):
                self._last_status = await self.status()
                self._status_at = trio.current_time()
            return self._last_status

    async def _sample(self) -> None:
        while True:
            try:
                await self._own_status()
            except (P2pfsError, OSError) as e:  # the store's trouble is status's to show
                log.warning("estate view: no status for this minute's sample: %s", e)
            self.history.sample()
            await trio.sleep(HISTORY_INTERVAL_S)

    def _summary(self, status: NodeStatus, may_see: Callable[[str], bool]) -> NodeSummary:
        return summarize(
            status,
            name=self.name,
            site=self.site,
            version=__version__,
            history=self.history.with_now(),
            may_see=may_see,
        )

    async def summary_for(self, peer_id: bytes) -> bytes:
        """Our summary as ``peer_id`` may see it (the ``summary`` request)."""
        try:
            status = await self._own_status()
        except OSError as e:  # answered as an error, not a broken connection
            raise P2pfsError(f"no summary: {e}") from None
        net = self.network

        def may_see(volume_id: str) -> bool:
            return net is None or net.may_see(peer_id, bytes.fromhex(volume_id))

        return self._summary(status, may_see).to_wire()

    # -- asking the peers, while somebody looks ------------------------------------

    def watched(self) -> None:
        first = trio.current_time() >= self._watched_until
        self._watched_until = trio.current_time() + WATCHED_FOR_S
        if first:
            self._wake.set()

    async def _poll(self) -> None:
        while True:
            if trio.current_time() >= self._watched_until:
                self._wake = trio.Event()
                await self._wake.wait()
            await self.ask_peers()
            await trio.sleep(POLL_INTERVAL_S)

    async def ask_peers(self) -> None:
        if self.network is None:
            return
        async with trio.open_nursery() as nursery:
            for peer in self.network.table.connected():
                if peer.hello is not None and "summary" in peer.hello.features:
                    nursery.start_soon(self._ask, peer.node_id)

    async def _ask(self, node_id: bytes) -> None:
        assert self.network is not None
        peer = self.network.table.peers.get(node_id)
        conn = peer.conn if peer is not None else None
        if conn is None:
            return
        try:
            header, data = await conn.request({"t": "summary"}, within=SUMMARY_TIMEOUT_S)
            if header.get("err") is not None:
                log.info("peer %s keeps no summary: %s", node_id.hex(), header.get("err"))
                return
            self.heard[node_id] = Heard(NodeSummary.from_wire(data), time.time())
        except BadSummary as e:
            self.bad_summaries += 1
            log.warning("peer %s sent a bad summary: %s", node_id.hex(), e)
        except (PeerUnavailable, P2pfsError) as e:
            # Shown by its state; what it said last stays.
            log.info("peer %s did not tell its summary: %s", node_id.hex(), e)

    # -- the view ---------------------------------------------------------------

    async def view(self) -> dict[str, Any]:
        """The estate as JSON: this node first, then every peer heard of or approved."""
        self.watched()
        status = await self._own_status()
        me = status.disk.node_id
        now = time.time()
        nodes = [_node_json(me, "this node", self._summary(status, lambda v: True), now, now)]
        states: dict[bytes, str] = {}
        if self.network is not None:
            for peer in self.network.table.peers.values():
                states[peer.node_id] = peer.state
        revoked: set[bytes] = set()
        if self.network is not None:
            revoked = set(self.network.estate.revoked)
        approved = await trio.to_thread.run_sync(self.approved)
        ids = set(states) | set(self.heard) | {n for n in approved if n.hex() != me}
        by_name = sorted(ids, key=lambda n: (n not in self.heard, _name(self.heard.get(n)), n))
        for node_id in by_name:
            heard = self.heard.get(node_id)
            state = "revoked" if node_id in revoked else states.get(node_id, "not connected")
            nodes.append(
                _node_json(
                    node_id.hex(),
                    state,
                    heard.summary if heard else None,
                    heard.at if heard else None,
                    now,
                )
            )
        return {
            "estate": status.estate,
            "node_id": me,
            "generated_at": int(now),
            "nodes": nodes,
            "chart": chart_series(
                [n["history"] for n in nodes if n["history"]], HISTORY_INTERVAL_S
            ),
            "bad_summaries": self.bad_summaries,
        }


def _name(heard: Heard | None) -> str:
    return heard.summary.name if heard else ""


def _node_json(
    node_id: str, state: str, s: NodeSummary | None, heard_at: float | None, now: float
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "node_id": node_id,
        "state": state,
        "heard_s_ago": None if heard_at is None else max(0, int(now - heard_at)),
        "history": [],
    }
    if s is None:
        return out
    return out | {
        "name": s.name,
        "site": s.site,
        "version": s.version,
        "uptime_s": s.uptime_s,
        "volumes": [
            {"name": v.name, "seq": v.seq, "snapshot": v.snapshot, "access": v.access}
            for v in s.volumes
        ],
        "cache_bytes": s.cache_bytes,
        "cache_quota": s.cache_quota,
        "offline_ready": s.offline_ready,
        "pins": s.pins,
        "corrupt_chunks_rejected": s.corrupt_chunks_rejected,
        "quarantined_peers": s.quarantined_peers,
        "peers_connected": s.peers_connected,
        "bytes_from": dict(zip(("local", "peers", "origin"), s.bytes_from, strict=True)),
        "bytes_served": s.bytes_served,
        "problems": list(s.problems),
        "history": [list(h) for h in s.history],
    }


def chart_series(histories: list[list[list[int]]], interval: int) -> list[dict[str, int]]:
    """Bytes read estate-wide in each interval, by source: each node's running totals
    differenced, put in the interval (by wall clock) its later sample falls in. A total
    that went down is a restarted daemon: its new total is what it read since."""
    bins: dict[int, list[int]] = {}
    for samples in histories:
        for prev, cur in itertools.pairwise(samples):
            slot = cur[0] // interval * interval
            row = bins.setdefault(slot, [0, 0, 0])
            for i in range(3):
                delta = cur[i + 1] - prev[i + 1]
                row[i] += delta if delta >= 0 else cur[i + 1]
    return [{"t": t, "local": r[0], "peers": r[1], "origin": r[2]} for t, r in sorted(bins.items())]
