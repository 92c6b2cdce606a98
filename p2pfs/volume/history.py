"""A volume's history: its snapshots from the head back, each parent verified to continue it.

Every snapshot names its parent; a parent is loaded (from the store, else peers),
its signature checked by decoding, and it must be the same volume one sequence
number lower. Used by ``p2pfs log``, and (``snapshot_dirs``) by the mount's and the desktop
link's ``.snapshots/``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from p2pfs.errors import IntegrityError, P2pfsError
from p2pfs.objects.model import Entry, Kind, Snapshot, decode_snapshot

from .content import Content

log = logging.getLogger(__name__)


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


async def snapshot_dirs(
    content: Content,
    head_id: bytes,
    head: Snapshot,
    limit: int,
    *,
    volume: str,
    root_of: Callable[[Snapshot], bytes] | None = None,
) -> list[tuple[Entry, bytes]]:
    """``.snapshots/<seq>`` of a volume: (directory entry, snapshot id) for each of at most
    ``limit`` snapshots from the head back that is still reachable, sorted by name. One
    listing for the mount (``fs/vfs.py``) and the desktop link (``node/desktop_api.py``),
    so both show the same history. ``root_of``: a snapshot's root ref (a private one's
    opens with its epoch's secret); a snapshot it cannot open is left out."""
    found = await history(content, head_id, head, limit)
    if found.broken is not None:
        log.error("history of %s: %s", volume, found.broken)
    out: list[tuple[Entry, bytes]] = []
    for v in found.versions:
        if v.snapshot is None:
            log.info("history of %s stops at %d: %s", volume, v.seq + 1, v.error)
            break
        name = str(v.seq).encode()
        try:
            root = v.snapshot.root if root_of is None else root_of(v.snapshot)
        except P2pfsError as e:
            log.info("history of %s: snapshot %d is not readable here: %s", volume, v.seq, e)
            continue
        out.append((Entry(name, Kind.DIR, 0o555, v.snapshot.time_ns, 0, root, None), v.id))
    out.sort(key=lambda pair: pair[0].name)
    return out
