"""A volume's newest snapshot taken back from an origin, on a machine that holds its
publisher key (restored from an estate backup): its next import or commit then
continues the sequence, and followers accept it (docs/recovery.md).
"""

from __future__ import annotations

from p2pfs.errors import IntegrityError, P2pfsError
from p2pfs.ids import matches
from p2pfs.objects.id_list import decode_id_list
from p2pfs.objects.model import MAX_ID_LIST_BYTES, Snapshot, object_id
from p2pfs.store.cas import Store
from p2pfs.volume.registry import VolumeRegistry

from .backend import Backend, OriginError
from .layout import object_key
from .sync import read_latest

MAX_ID_LIST_PARTS = 1 << 16


def _take_id_list(backend: Backend, store: Store, snapshot: Snapshot, sid: bytes) -> None:
    """A private snapshot's id list, from the origin: stored, and every id it names
    tagged as the volume's (served only to nodes granted it)."""
    tagged: list[bytes] = [sid] if snapshot.parent is None else [sid, snapshot.parent]
    part_id = snapshot.ids
    parts = 0
    while part_id is not None:
        parts += 1
        if parts > MAX_ID_LIST_PARTS:
            raise IntegrityError(f"the id list of {snapshot.name} loops")
        fetched = backend.get(object_key(part_id), MAX_ID_LIST_BYTES)
        assert fetched is not None
        if not matches(part_id, fetched.data):
            raise OriginError(f"origin {backend.ref.url} holds a corrupt part of the id list")
        part = decode_id_list(fetched.data)
        tagged += [part_id, *part.ids]
        store.tag(snapshot.volume_id, tagged)
        store.put_object(fetched.data)
        tagged = []
        part_id = part.next
    store.tag(snapshot.volume_id, tagged)


def restore(
    registry: VolumeRegistry, store: Store, backend: Backend, volume: str
) -> tuple[Snapshot, bool]:
    """Make the origin's ``latest`` the head of ``volume`` here; (it, whether the head moved)."""
    record = registry.get(volume)
    if not registry.is_publisher(volume):
        raise P2pfsError(
            f"this node does not hold the publisher key of {volume!r}: restore the estate "
            "backup first (p2pfs estate restore)"
        )
    latest = read_latest(backend)
    if latest is None:
        raise P2pfsError(f"origin {backend.ref.url} holds no snapshot (no latest)")
    if latest.volume_id != record.id or latest.name != volume:
        raise P2pfsError(
            f"origin {backend.ref.url} holds volume {latest.name!r} of another key, not {volume!r}"
        )
    if latest.seq < record.seq:
        raise P2pfsError(
            f"origin {backend.ref.url} holds seq {latest.seq}, older than this node's {record.seq}: "
            "sync it instead (p2pfs origin sync)"
        )
    if latest.seq == record.seq:
        return latest, False
    data = latest.encode()
    sid = object_id(data)
    if latest.private:
        _take_id_list(backend, store, latest, sid)
    store.put_object(data)
    registry.advance(record, latest, sid)
    return latest, True
