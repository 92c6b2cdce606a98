"""Access lists: who may read or cache each private volume, and its wrapped secrets.

An access list is signed by the estate CA, numbered, and handed around like the
revocation list (newest wins, in force at once on a running node). It names only
private volumes: a volume it does not name is public (every member reads it, the
first release's behaviour). For each private volume it holds:

- ``readers``: node ids that may read it (they get its secrets) and ``cachers``:
  node ids that may hold and serve its ciphertext but never read it;
- ``epoch``: the key epoch new snapshots are sealed in; a revocation starts a new one;
- ``boxes``: every epoch's secret sealed to every current reader's node key
  (``keys.seal_box``), so a reader opens the history it may read and a node dropped
  from the readers gets no box of any epoch sealed after it left.

The list is public within the estate: boxes open only with the reader's own key.
Every list from a peer is hostile: size-bounded, canonical, signature-checked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from p2pfs.errors import DecodeError, IntegrityError, P2pfsError
from p2pfs.keys import PUBLIC_KEY_SIZE, SigningKey
from p2pfs.names import name_problem
from p2pfs.objects import codec
from p2pfs.objects.model import Snapshot
from p2pfs.seal import open_root

from .revocation import MAX_NUMBER, NODE_ID_SIZE, open_signed

MAX_ACCESS_LIST = 8 * 1024 * 1024
MAX_PRIVATE_VOLUMES = 4096
MAX_GRANTS = 65536  # node ids in one volume's readers and cachers together
MAX_EPOCHS = 1024
MAX_BOX = 256

_DOMAIN = b"p2pfs-access-list-v1\0"
_VERSION = 1


@dataclass(frozen=True)
class VolumeAccess:
    """One private volume's grants and sealed secrets."""

    volume_id: bytes
    name: str
    readers: frozenset[bytes]
    cachers: frozenset[bytes]
    epoch: int
    # epoch -> node id -> that epoch's secret sealed to the node's key
    boxes: dict[int, dict[bytes, bytes]] = field(hash=False)

    def may_read(self, node_id: bytes) -> bool:
        return node_id in self.readers

    def may_see(self, node_id: bytes) -> bool:
        return node_id in self.readers or node_id in self.cachers

    def role_of(self, node_id: bytes) -> str:
        if node_id in self.readers:
            return "reader"
        return "cache-only" if node_id in self.cachers else "none"


@dataclass(frozen=True)
class AccessList:
    """A verified access list and the exact bytes it came in (number 0: the empty one)."""

    number: int
    issued: int
    volumes: dict[bytes, VolumeAccess]
    encoded: bytes

    def of(self, volume_id: bytes) -> VolumeAccess | None:
        return self.volumes.get(volume_id)

    def is_private(self, volume_id: bytes) -> bool:
        return volume_id in self.volumes

    def may_read(self, node_id: bytes, volume_id: bytes) -> bool:
        va = self.volumes.get(volume_id)
        return va is None or va.may_read(node_id)

    def may_see(self, node_id: bytes, volume_id: bytes) -> bool:
        """Whether ``node_id`` may learn the volume exists: a reader or a cacher."""
        va = self.volumes.get(volume_id)
        return va is None or va.may_see(node_id)

    def visible_private(self, node_id: bytes) -> frozenset[bytes]:
        """The private volumes ``node_id`` may read or cache."""
        return frozenset(v for v, va in self.volumes.items() if va.may_see(node_id))

    def secret(self, volume_id: bytes, epoch: int, key: SigningKey, node_id: bytes) -> bytes:
        """This node's copy of a volume's epoch secret; P2pfsError saying why not."""
        va = self.volumes.get(volume_id)
        if va is None:
            raise P2pfsError(f"volume {volume_id.hex()[:16]} is not private")
        box = va.boxes.get(epoch, {}).get(node_id)
        if box is None:
            if va.may_see(node_id) and not va.may_read(node_id):
                raise P2pfsError(f"this node may only cache volume {va.name!r}, not read it")
            raise P2pfsError(
                f"this node holds no key of volume {va.name!r} epoch {epoch} "
                f"(access list {self.number}): it is not granted to read it"
            )
        return key.open_box(box)

    def root_of(self, snap: Snapshot, key: SigningKey, node_id: bytes) -> bytes:
        """The root ref of snapshot ``snap``: for a private one, its root key opened with
        this node's copy of the epoch secret (P2pfsError if it holds none)."""
        if not snap.private:
            return snap.root
        assert snap.root_key is not None
        secret = self.secret(snap.volume_id, snap.epoch, key, node_id)
        return open_root(secret, snap.volume_id, snap.seq, snap.root, snap.root_key)


EMPTY = AccessList(0, 0, {}, b"")


def sign_access(
    ca_key: SigningKey, estate_id: bytes, number: int, volumes: list[VolumeAccess]
) -> bytes:
    if len(volumes) > MAX_PRIVATE_VOLUMES:
        raise P2pfsError(f"an estate holds at most {MAX_PRIVATE_VOLUMES} private volumes")
    rows = []
    for va in sorted(volumes, key=lambda v: v.volume_id):
        if len(va.readers) + len(va.cachers) > MAX_GRANTS:
            raise P2pfsError(f"volume {va.name!r}: at most {MAX_GRANTS} grants")
        boxes = [
            [epoch, [[n, va.boxes[epoch][n]] for n in sorted(va.boxes[epoch])]]
            for epoch in sorted(va.boxes)
        ]
        rows.append(
            [va.volume_id, va.name, sorted(va.readers), sorted(va.cachers), va.epoch, boxes]
        )
    body = codec.pack(
        {"v": _VERSION, "estate": estate_id, "n": number, "issued": int(time.time()), "vols": rows}
    )
    data = codec.pack({"list": body, "sig": ca_key.sign(_DOMAIN + body)})
    if len(data) > MAX_ACCESS_LIST:
        raise P2pfsError(f"the access list would exceed {MAX_ACCESS_LIST} bytes")
    return data


def _node_ids(value: object, what: str) -> frozenset[bytes]:
    if not isinstance(value, list) or len(value) > MAX_GRANTS:
        raise DecodeError(f"{what} must be a list of at most {MAX_GRANTS} node ids")
    for i, n in enumerate(value):
        if not isinstance(n, bytes) or len(n) != NODE_ID_SIZE:
            raise DecodeError(f"{what}: a node id must be {NODE_ID_SIZE} bytes")
        if i and n <= value[i - 1]:
            raise DecodeError(f"{what} must be sorted and unique")
    return frozenset(value)


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise DecodeError(f"{what} must be an integer from {lo} to {hi}")
    return value


def _volume(row: object) -> VolumeAccess:
    if not isinstance(row, list) or len(row) != 6:
        raise DecodeError(
            "an access list row must be [volume, name, readers, cachers, epoch, boxes]"
        )
    vid, name, readers, cachers, epoch, boxes = row
    if not isinstance(vid, bytes) or len(vid) != PUBLIC_KEY_SIZE:
        raise DecodeError(f"an access list's volume id must be {PUBLIC_KEY_SIZE} bytes")
    if (problem := name_problem(name)) is not None:
        raise DecodeError(f"an access list's volume name: {problem}")
    assert isinstance(name, str)
    r = _node_ids(readers, f"readers of {name!r}")
    c = _node_ids(cachers, f"cachers of {name!r}")
    if r & c:
        raise DecodeError(f"volume {name!r}: a node is both reader and cacher")
    epoch = _int(epoch, f"epoch of {name!r}", 1, MAX_NUMBER)
    if not isinstance(boxes, list) or len(boxes) > MAX_EPOCHS:
        raise DecodeError(f"volume {name!r}: at most {MAX_EPOCHS} epochs of boxes")
    by_epoch: dict[int, dict[bytes, bytes]] = {}
    for item in boxes:
        if not isinstance(item, list) or len(item) != 2 or not isinstance(item[1], list):
            raise DecodeError(f"volume {name!r}: boxes must be [epoch, [[node, box]...]]")
        e = _int(item[0], f"a box epoch of {name!r}", 1, epoch)
        if by_epoch and e <= max(by_epoch):
            raise DecodeError(f"volume {name!r}: box epochs must be sorted and unique")
        per: dict[bytes, bytes] = {}
        for pair in item[1]:
            if not isinstance(pair, list) or len(pair) != 2:
                raise DecodeError(f"volume {name!r}: a box must be [node, box]")
            node, box = pair
            if node not in r:
                raise DecodeError(f"volume {name!r}: a box for a node that is not a reader")
            if not isinstance(box, bytes) or not 0 < len(box) <= MAX_BOX:
                raise DecodeError(f"volume {name!r}: a box must be 1..{MAX_BOX} bytes")
            per[node] = box
        by_epoch[e] = per
    return VolumeAccess(vid, name, r, c, epoch, by_epoch)


def decode_access(data: bytes, ca_public: bytes, estate_id: bytes) -> AccessList:
    """Verify an access list; DecodeError if malformed, SignatureError if not this CA's."""
    body = open_signed(data, MAX_ACCESS_LIST, _DOMAIN, ca_public, "access list")
    doc = codec.unpack(body, max_size=MAX_ACCESS_LIST, canonical=True, max_depth=8)
    if not isinstance(doc, dict) or set(doc) != {"v", "estate", "n", "issued", "vols"}:
        raise DecodeError("an access list must hold v, estate, n, issued and vols")
    if doc["v"] != _VERSION:
        raise DecodeError(f"access list version {doc['v']!r} is not supported")
    if doc["estate"] != estate_id:
        raise IntegrityError("the access list names another estate")
    number = _int(doc["n"], "an access list number", 1, MAX_NUMBER)
    issued = _int(doc["issued"], "an access list's issue time", 0, MAX_NUMBER)
    rows = doc["vols"]
    if not isinstance(rows, list) or len(rows) > MAX_PRIVATE_VOLUMES:
        raise DecodeError(f"an access list names at most {MAX_PRIVATE_VOLUMES} volumes")
    volumes: dict[bytes, VolumeAccess] = {}
    for row in rows:
        va = _volume(row)
        if volumes and va.volume_id <= max(volumes):
            raise DecodeError("an access list's volumes must be sorted and unique")
        volumes[va.volume_id] = va
    return AccessList(number, issued, volumes, data)
