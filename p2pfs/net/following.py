"""Following volumes: which heads this node offers, and accepting newer ones from peers.

A follower accepts a snapshot only when all of these hold (DESIGN.md, Trust):
the volume key is endorsed by the estate CA for that name, the snapshot's
Ed25519 signature verifies under that key, its bytes hash to the head id that
was announced, and its sequence number is higher than the one held. Anything
else is refused, logged and counted; the tree and file objects under an
accepted snapshot are fetched lazily, on first use, and verified like chunks.

A private volume is followed only by the nodes its access list lets read or cache
it. Before its snapshot is taken, its id list is fetched (verified by id) and every
id in it tagged in the store as the volume's, so this node serves them only to
peers that may see the volume, and may fetch them for others as their home.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from p2pfs.errors import P2pfsError
from p2pfs.ids import matches
from p2pfs.objects.id_list import decode_id_list
from p2pfs.objects.model import (
    MAX_ID_LIST_BYTES,
    MAX_SNAPSHOT_BYTES,
    Snapshot,
    decode_snapshot,
    object_id,
)
from p2pfs.store.cas import Store
from p2pfs.trust.estate import Estate
from p2pfs.volume.registry import VolumeRecord, VolumeRegistry

from . import messages
from .connection import PeerUnavailable
from .peers import Peer

log = logging.getLogger(__name__)

SNAPSHOT_TIMEOUT = 10.0
MAX_ID_LIST_PARTS = 1 << 16


@dataclass(frozen=True)
class SyncStats:
    accepted: int  # snapshots taken
    refused: int  # snapshots refused (unendorsed, bad signature, replayed, ...)
    recent_refusals: tuple[str, ...]


MAX_OFFERS = 64  # heads remembered per volume while it is busy


class VolumeSync:
    def __init__(
        self,
        registry: VolumeRegistry,
        store: Store,
        estate: Estate,
        *,
        on_change: Callable[[list[str]], Awaitable[None]],
        announce: Callable[[messages.VolumeHead], None],
        only: frozenset[str] = frozenset(),
    ) -> None:
        self.registry = registry
        self.store = store
        self.estate = estate
        self.on_change = on_change
        self.announce = announce
        self.only = only  # follow only these volumes (empty: all)
        self.accepted = 0
        self.refused = 0
        self.refusals: deque[str] = deque(maxlen=20)
        self._busy: set[bytes] = set()
        # Heads offered while that volume was busy, by volume then by peer: tried in
        # turn if the one being accepted fails. Dropping them lost a volume at start-up
        # for good (every peer offers its head once, in its hello, and one offer failed).
        self._offers: dict[bytes, dict[bytes, tuple[Peer, messages.VolumeHead]]] = {}
        # Set by the daemon: a newer access list may open (or close) private volumes.
        self.access_changed: Callable[[], None] = lambda: None

    def _records(self) -> list[VolumeRecord]:
        out = []
        for name in self.registry.names():
            try:
                out.append(self.registry.get(name))
            except P2pfsError as e:
                log.error("volume %s unavailable: %s", name, e)
        return out

    def head_of(self, record: VolumeRecord) -> messages.VolumeHead | None:
        if record.head is None:
            return None
        origin = record.origin
        if origin is None and self.registry.is_publisher(record.name):
            origin = self.estate.node_id
        return messages.VolumeHead(
            record.name, record.id, record.seq, record.head, record.endorsement, origin
        )

    def origins(self) -> set[bytes]:
        return {r.origin for r in self._records() if r.origin is not None}

    # -- LocalNode -------------------------------------------------------------

    def volume_heads(self) -> list[messages.VolumeHead]:
        heads = (self.head_of(r) for r in self._records() if r.endorsement is not None)
        return [h for h in heads if h is not None]

    def snapshot_for(self, volume_id: bytes) -> tuple[messages.VolumeHead, bytes] | None:
        for record in self._records():
            head = self.head_of(record)
            if record.id == volume_id and head is not None and record.endorsement is not None:
                try:
                    return head, self.store.get_object(head.head)
                except P2pfsError as e:
                    log.error("cannot serve the snapshot of %s: %s", record.name, e)
        return None

    def on_revocations_changed(self) -> None:
        pass

    def on_access_changed(self) -> None:
        self.access_changed()

    async def on_volume_head(self, peer: Peer, head: messages.VolumeHead) -> None:
        if self.only and head.name not in self.only:
            return
        try:
            current = self.registry.get(head.name)
        except P2pfsError:
            current = None
        if current is not None and (
            head.seq <= current.seq or self.registry.is_publisher(head.name)
        ):
            if current.id != head.volume_id:
                self._refuse(peer, head, "another key than the volume known under this name")
            return
        vid = head.volume_id
        offers = self._offers.setdefault(vid, {})
        if len(offers) < MAX_OFFERS or peer.node_id in offers:
            offers[peer.node_id] = (peer, head)
        if vid in self._busy:
            return  # the task accepting this volume tries the offer next if it must
        self._busy.add(vid)
        try:
            while offers:
                # The newest offered first; of equals, any (each is verified alike).
                node_id = max(offers, key=lambda n: offers[n][1].seq)
                peer, head = offers.pop(node_id)
                try:
                    if head.seq <= self.registry.get(head.name).seq:
                        continue  # accepted meanwhile, from another offer
                except P2pfsError:
                    pass  # not known yet
                try:
                    await self._accept(peer, head)
                except (P2pfsError, PeerUnavailable) as e:
                    self._refuse(peer, head, str(e))
        finally:
            self._busy.discard(vid)
            if not offers:
                self._offers.pop(vid, None)

    def _refuse(self, peer: Peer, head: messages.VolumeHead, why: str) -> None:
        self.refused += 1
        text = f"snapshot {head.seq} of {head.name!r} from {peer.node_id.hex()[:8]}: {why}"
        self.refusals.append(text)
        log.warning("refused %s", text)

    async def _accept(self, peer: Peer, head: messages.VolumeHead) -> None:
        if head.endorsement is None:
            raise P2pfsError("the volume is not endorsed by the estate")
        self.estate.verify_endorsement(head.volume_id, head.name, head.endorsement)
        access = self.estate.access
        if not access.may_see(self.estate.node_id, head.volume_id):
            raise P2pfsError(
                f"the volume is private and this node is not granted it (access list {access.number})"
            )
        conn = peer.conn
        if conn is None:
            raise PeerUnavailable("peer went away")
        answer, data = await conn.request(
            messages.snapshot(head.volume_id), within=SNAPSHOT_TIMEOUT
        )
        err = messages.answer_error(answer)
        if err is not None:
            raise P2pfsError(f"peer answered: {err}")
        if object_id(data) != head.head:
            # The peer may have moved on since its hello: fine if still newer than ours.
            log.debug("snapshot of %s moved from %s", head.name, head.head.hex())

        async def get(part_id: bytes) -> bytes:
            conn = peer.conn
            if conn is None:
                raise PeerUnavailable("peer went away")
            answer, data = await conn.request(messages.get(part_id), within=SNAPSHOT_TIMEOUT)
            err = messages.answer_error(answer)
            if err is not None:
                raise P2pfsError(f"peer answered for the id list: {err}")
            return data

        await self._take(head, data, get, peer.node_id.hex())

    async def accept_from_origin(
        self, record: VolumeRecord, data: bytes, get: Callable[[bytes], Awaitable[bytes]], url: str
    ) -> bool:
        """Take a newer snapshot of a volume we follow from an origin's ``latest``
        (a site with no publisher in reach still follows); False when not newer.

        Checked as one from a peer: the endorsement we hold for the volume, its
        signature, a rising seq. ``get`` fetches an id list part (verified here).
        """
        if record.endorsement is None or self.registry.is_publisher(record.name):
            return False
        if not self.estate.access.may_see(self.estate.node_id, record.id):
            return False  # no longer granted: peers' offers are refused alike
        if len(data) > MAX_SNAPSHOT_BYTES:
            raise P2pfsError(f"origin {url}: its latest is too large for a snapshot")
        snapshot = decode_snapshot(data)
        if snapshot.seq <= record.seq:
            return False
        head = messages.VolumeHead(
            record.name, record.id, snapshot.seq, object_id(data), record.endorsement, record.origin
        )
        if record.id in self._busy:
            return False  # a peer's offer is being taken; the next poll sees the result
        self._busy.add(record.id)
        try:
            await self._take(head, data, get, url)
        finally:
            self._busy.discard(record.id)
        return True

    async def _take(
        self,
        head: messages.VolumeHead,
        data: bytes,
        get: Callable[[bytes], Awaitable[bytes]],
        source: str,
    ) -> None:
        assert head.endorsement is not None
        access = self.estate.access
        if len(data) > MAX_SNAPSHOT_BYTES:
            raise P2pfsError("snapshot too large")
        sid = object_id(data)
        snapshot = decode_snapshot(data)  # verifies the signature under the volume key
        if snapshot.volume_id != head.volume_id or snapshot.name != head.name:
            raise P2pfsError("the snapshot names another volume than announced")
        if snapshot.private != access.is_private(head.volume_id):
            raise P2pfsError(
                "the snapshot is sealed but the volume is public"
                if snapshot.private
                else "the volume is private but its snapshot is not sealed"
            )
        if snapshot.private:
            await self._take_id_list(get, snapshot, sid)
        await trio.to_thread.run_sync(self.store.put_object, data)
        record = self.registry.follow(snapshot, sid, head.endorsement, head.origin)
        self.accepted += 1
        log.info("volume %s: accepted snapshot %d from %s", head.name, snapshot.seq, source)
        await self.on_change([head.name])
        new_head = self.head_of(record)
        if new_head is not None:
            self.announce(new_head)  # gossip: peers that missed the publisher hear it from us

    async def _take_id_list(
        self, get: Callable[[bytes], Awaitable[bytes]], snapshot: Snapshot, sid: bytes
    ) -> None:
        """Fetch a private snapshot's id list (``get``: from its source) and tag what it names."""
        parts: list[tuple[bytes, bytes]] = []
        ids: list[bytes] = []
        part_id: bytes | None = snapshot.ids
        while part_id is not None:
            if len(parts) >= MAX_ID_LIST_PARTS or any(part_id == p for p, _ in parts):
                raise P2pfsError("the snapshot's id list loops")
            data = await get(part_id)
            if len(data) > MAX_ID_LIST_BYTES or not matches(part_id, data):
                raise P2pfsError("the peer sent a corrupt part of the id list")
            part = decode_id_list(data)
            parts.append((part_id, data))
            ids.extend(part.ids)
            part_id = part.next
        extra = [sid] if snapshot.parent is None else [sid, snapshot.parent]

        def store_and_tag() -> None:
            self.store.tag(snapshot.volume_id, [*ids, *(p for p, _ in parts), *extra])
            for _, data in parts:
                self.store.put_object(data)

        await trio.to_thread.run_sync(store_and_tag)

    def statistics(self) -> SyncStats:
        return SyncStats(self.accepted, self.refused, tuple(self.refusals))
