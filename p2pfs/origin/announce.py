"""Announcing a volume's origins: a new snapshot of the same tree that lists them.

The list is signed with the volume key like everything a follower trusts, and
travels as snapshots do (hello, announce, ``latest`` at the origins), so followers
need no configuration of their own. Every later import and commit carries it on.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from p2pfs.errors import P2pfsError
from p2pfs.objects.model import Snapshot, object_id
from p2pfs.objects.origins import MAX_ORIGINS, OriginRef
from p2pfs.seal import open_root, seal_root
from p2pfs.store.cas import Store
from p2pfs.volume.registry import VolumeRecord, VolumeRegistry


def announce(
    registry: VolumeRegistry,
    store: Store,
    volume: str,
    origins: tuple[OriginRef, ...],
    *,
    secret_of: Callable[[int], bytes] | None = None,
) -> tuple[VolumeRecord, Snapshot, bytes]:
    """Sign the head again at the next seq with ``origins``; the new head's record,
    snapshot and id. A private volume's root key is bound to the seq, so it is sealed
    again, under the head's epoch secret (``secret_of(epoch)``)."""
    if len(origins) > MAX_ORIGINS:
        raise P2pfsError(f"a volume has at most {MAX_ORIGINS} origins")
    record = registry.get(volume)
    key = registry.publisher_key(volume)
    head = registry.load_head(store, record)
    if head is None:
        raise P2pfsError(
            f"volume {volume!r} has no snapshot yet: import or commit one first, then add its origins"
        )
    root_key = head.root_key
    if head.private:
        if secret_of is None or head.root_key is None:
            raise P2pfsError(f"volume {volume!r} is private: this node cannot open its root")
        secret = secret_of(head.epoch)
        ref = open_root(secret, record.id, head.seq, head.root, head.root_key)
        root_key = seal_root(secret, record.id, head.seq + 1, ref)
    snapshot = Snapshot.create(
        key,
        name=head.name,
        seq=head.seq + 1,
        parent=record.head,
        root=head.root,
        time_ns=time.time_ns(),
        params=dict(head.params),
        epoch=head.epoch,
        root_key=root_key,
        ids=head.ids,
        origins=origins,
    )
    data = snapshot.encode()
    if snapshot.private:
        store.tag(record.id, [object_id(data)])
    sid = store.put_object(data)
    return registry.advance(record, snapshot, sid), snapshot, sid
