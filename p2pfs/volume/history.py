"""A volume's history: its snapshots from the head back, each parent verified to continue it.

Every snapshot names its parent; a parent is loaded (from the store, else peers),
its signature checked by decoding, and it must be the same volume one sequence
number lower. Used by ``p2pfs log`` and the mount's ``.snapshots/``.
"""

from __future__ import annotations

from dataclasses import dataclass

from p2pfs.errors import IntegrityError, P2pfsError
from p2pfs.objects.model import Snapshot, decode_snapshot

from .content import Content


@dataclass(frozen=True)
class Version:
    id: bytes
    seq: int
    snapshot: Snapshot | None  # None: not available here nor from any peer
    error: str | None = None  # why not


@dataclass(frozen=True)
class History:
    versions: list[Version]  # newest first; the last may be unavailable
    broken: IntegrityError | None  # a parent that does not continue the volume stopped it


async def history(content: Content, head_id: bytes, head: Snapshot, limit: int) -> History:
    """At most ``limit`` snapshots from ``head`` back (one more, unavailable, if the walk
    stopped at a parent it could not load)."""
    out = [Version(head_id, head.seq, head)]
    snap = head
    while snap.parent is not None and len(out) < limit:
        parent_id = snap.parent
        try:
            parent = decode_snapshot(await content.object_bytes(parent_id))
        except P2pfsError as e:
            out.append(Version(parent_id, snap.seq - 1, None, str(e)))
            break
        if parent.volume_id != snap.volume_id or parent.seq != snap.seq - 1:
            broken = IntegrityError(
                f"snapshot {parent_id.hex()} does not continue volume {head.name!r}"
            )
            return History(out, broken)
        out.append(Version(parent_id, parent.seq, parent))
        snap = parent
    return History(out, None)
