"""The one object layout of every origin, under the origin's prefix::

    objects/ab/cd/abcd...   every stored object of the volume (chunks, blobs, trees, id
                            lists), named by its hex id, sharded by its first two bytes
    snapshots/00000000000000000042   each signed snapshot, by sequence number
    latest                  a copy of the newest snapshot: written last, so a reader that
                            finds it finds every object it reaches

A snapshot is written only after every object it reaches, and ``latest`` only after
its snapshot, so the order of uploads alone keeps a reader from a snapshot whose
objects are missing (CernVM-FS's manifest, written after the catalogs). Nothing here
is trusted: ``latest`` is a signed snapshot, checked as one from any peer.
"""

from __future__ import annotations

from p2pfs.errors import DecodeError
from p2pfs.ids import ID_SIZE

OBJECTS = "objects/"
SNAPSHOTS = "snapshots/"
LATEST = "latest"
SEQ_DIGITS = 20  # 2**63 has 19 digits: names sort by number


def object_key(oid: bytes) -> str:
    h = oid.hex()
    return f"{OBJECTS}{h[:2]}/{h[2:4]}/{h}"


def snapshot_key(seq: int) -> str:
    return f"{SNAPSHOTS}{seq:0{SEQ_DIGITS}d}"


def object_id_of(key: str) -> bytes:
    """The id an object key names (DecodeError for anything else in objects/)."""
    parts = key.removeprefix(OBJECTS).split("/")
    try:
        if len(parts) != 3:
            raise ValueError
        oid = bytes.fromhex(parts[2])
    except ValueError:
        raise DecodeError(f"{key!r} is not an object key of the origin layout") from None
    if len(oid) != ID_SIZE or parts[0] != parts[2][:2] or parts[1] != parts[2][2:4]:
        raise DecodeError(f"{key!r} is not an object key of the origin layout")
    return oid
