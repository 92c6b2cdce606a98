"""The peer protocol's messages: building headers and validating received ones.

Every field of a received header is checked for type and bounds here, so the
rest of the network code only ever sees well-formed values. docs/protocol.md
describes each message.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any

from p2pfs.config import LABEL_RULE, is_label
from p2pfs.ids import ID_SIZE
from p2pfs.objects.model import MAX_SNAPSHOT_BYTES, validate_volume_name

from .wire import ProtocolError

PROTOCOL_VERSION = 1
NODE_ID_SIZE = 16
SIGNATURE_SIZE = 64
MAX_VOLUMES = 1024
MAX_HAVE_IDS = 1024
MAX_REQUEST_ID = 2**53
MAX_ERROR_TEXT = 512
MAX_SEQ = 2**63 - 1
MAX_DIGEST_BYTES = 16 * 1024 * 1024
MAX_PEER_HINTS = 64
MAX_FEATURES = 16
# Requests beyond the first release's, as a hello names them: a node asks a peer only
# what its hello says it answers (an unknown request breaks the protocol there).
FEATURES = ("summary",)
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")

# Requests (carry an "id" the answer repeats) and one-way notices.
REQUESTS = {"get", "have", "snapshot", "revocations", "access-list", "ping", "summary"}
NOTICES = {"hello", "announce", "digest", "revoked", "access"}
ANSWER = "r"


def _get(h: dict[str, Any], key: str, kind: type, what: str) -> Any:
    value = h.get(key)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError(f"{what}: field {key!r} must be {kind.__name__}")
    return value


def _bytes(h: dict[str, Any], key: str, size: int, what: str) -> bytes:
    value = _get(h, key, bytes, what)
    if len(value) != size:
        raise ProtocolError(f"{what}: field {key!r} must be {size} bytes")
    return bytes(value)


def _int(h: dict[str, Any], key: str, lo: int, hi: int, what: str) -> int:
    value = _get(h, key, int, what)
    if not lo <= value <= hi:
        raise ProtocolError(f"{what}: field {key!r} out of range")
    return int(value)


def request_id(h: dict[str, Any]) -> int:
    return _int(h, "id", 1, MAX_REQUEST_ID, h.get("t", "request"))


@dataclass(frozen=True)
class VolumeHead:
    """What a node says it holds of a volume: enough to decide whether to ask for it."""

    name: str
    volume_id: bytes
    seq: int
    head: bytes
    endorsement: bytes | None  # the estate CA's signature over (volume id, name)
    # The publishing node, where every chunk exists. Not signed: a lie only changes
    # whom we ask last, since every byte is verified.
    origin: bytes | None

    def to_wire(self) -> list[Any]:
        return [self.name, self.volume_id, self.seq, self.head, self.endorsement, self.origin]

    @classmethod
    def from_wire(cls, item: object, what: str) -> VolumeHead:
        if not isinstance(item, list) or len(item) != 6:
            raise ProtocolError(f"{what}: a volume must be a 6-item list")
        name, vid, seq, head, endorsement, origin = item
        if not isinstance(name, str):
            raise ProtocolError(f"{what}: volume name must be a string")
        try:
            validate_volume_name(name)
        except Exception as e:
            raise ProtocolError(f"{what}: {e}") from None
        if not isinstance(vid, bytes) or len(vid) != 32:
            raise ProtocolError(f"{what}: volume id must be 32 bytes")
        if not isinstance(seq, int) or isinstance(seq, bool) or not 1 <= seq <= MAX_SEQ:
            raise ProtocolError(f"{what}: volume seq out of range")
        if not isinstance(head, bytes) or len(head) != ID_SIZE:
            raise ProtocolError(f"{what}: volume head must be {ID_SIZE} bytes")
        if endorsement is not None and (
            not isinstance(endorsement, bytes) or len(endorsement) > 1024
        ):
            raise ProtocolError(f"{what}: bad endorsement")
        if origin is not None and (not isinstance(origin, bytes) or len(origin) != NODE_ID_SIZE):
            raise ProtocolError(f"{what}: origin must be a node id")
        return cls(name, bytes(vid), seq, bytes(head), endorsement, origin)


# A peer as another names it in its hello: node id, IPv4 address, listening port.
PeerHint = tuple[bytes, str, int]


def _peer_hint(item: object) -> PeerHint:
    if not isinstance(item, list) or len(item) != 3:
        raise ProtocolError("hello: a peer must be [node, address, port]")
    node, address, port = item
    if not isinstance(node, bytes) or len(node) != NODE_ID_SIZE:
        raise ProtocolError("hello: a peer's node id must be 16 bytes")
    if not isinstance(address, str) or len(address) > 15:
        raise ProtocolError("hello: a peer's address must be IPv4 text")
    try:
        ip = ipaddress.IPv4Address(address)
    except ValueError:
        raise ProtocolError("hello: a peer's address must be IPv4 text") from None
    if ip.is_multicast or ip.is_unspecified or ip.is_reserved or ip == _BROADCAST:
        raise ProtocolError("hello: a peer's address is not one to dial")
    if not isinstance(port, int) or isinstance(port, bool) or not 0 < port < 65536:
        raise ProtocolError("hello: a peer's port is out of range")
    return bytes(node), str(ip), port


@dataclass(frozen=True)
class Hello:
    node_id: bytes
    estate_id: bytes
    version: int
    volumes: tuple[VolumeHead, ...]
    revocation_number: int
    access_number: int = 0  # the newest access list the node holds (0: none)
    # Where the sender listens, and the peers it is connected to (absent from the
    # first releases' hello): whoever reaches one member learns of the others, however
    # the first mDNS packets fell.
    port: int | None = None
    peers: tuple[PeerHint, ...] = ()
    features: tuple[str, ...] = ()
    # The sender's site ([network] site; absent: none, or a release before sites). Chunk
    # homes are chosen among the peers of one's own site (peers.PeerTable.home_of).
    site: str | None = None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "t": "hello",
            "node": self.node_id,
            "estate": self.estate_id,
            "v": self.version,
            "vols": [v.to_wire() for v in self.volumes],
            "crl": self.revocation_number,
            "acl": self.access_number,
        }
        if self.port is not None:
            out["port"] = self.port
        if self.peers:
            out["peers"] = [list(p) for p in self.peers]
        if self.features:
            out["feat"] = list(self.features)
        if self.site is not None:
            out["site"] = self.site
        return out

    @classmethod
    def from_wire(cls, h: dict[str, Any]) -> Hello:
        vols = _get(h, "vols", list, "hello")
        if len(vols) > MAX_VOLUMES:
            raise ProtocolError("hello: too many volumes")
        return cls(
            node_id=_bytes(h, "node", NODE_ID_SIZE, "hello"),
            estate_id=_bytes(h, "estate", NODE_ID_SIZE, "hello"),
            version=_int(h, "v", 0, 2**16, "hello"),
            volumes=tuple(VolumeHead.from_wire(v, "hello") for v in vols),
            revocation_number=_int(h, "crl", 0, MAX_SEQ, "hello"),
            # Absent from the first release's hello: it held no access list.
            access_number=_int(h, "acl", 0, MAX_SEQ, "hello") if "acl" in h else 0,
            port=_int(h, "port", 1, 65535, "hello") if "port" in h else None,
            peers=_peer_hints(h),
            features=_features(h),
            site=_site(h),
        )


def _site(h: dict[str, Any]) -> str | None:
    if "site" not in h:
        return None
    site = _get(h, "site", str, "hello")
    if not is_label(site):
        raise ProtocolError(f"hello: site must be a label ({LABEL_RULE})")
    return str(site)


def _features(h: dict[str, Any]) -> tuple[str, ...]:
    if "feat" not in h:
        return ()
    items = _get(h, "feat", list, "hello")
    if len(items) > MAX_FEATURES or not all(isinstance(i, str) and len(i) <= 32 for i in items):
        raise ProtocolError("hello: features must be a few short names")
    return tuple(items)


def _peer_hints(h: dict[str, Any]) -> tuple[PeerHint, ...]:
    if "peers" not in h:
        return ()
    items = _get(h, "peers", list, "hello")
    if len(items) > MAX_PEER_HINTS:
        raise ProtocolError("hello: too many peers")
    return tuple(_peer_hint(i) for i in items)


def announce(vol: VolumeHead) -> dict[str, Any]:
    return {"t": "announce", "vol": vol.to_wire()}


def parse_announce(h: dict[str, Any]) -> VolumeHead:
    return VolumeHead.from_wire(h.get("vol"), "announce")


def get(cid: bytes, *, fetch: bool = False, urgent: bool = False) -> dict[str, Any]:
    """Ask for a chunk; with ``fetch``, the peer is its home and fetches it if it lacks it;
    ``urgent``: an application waits for it (its answer goes before readahead's)."""
    h: dict[str, Any] = {"t": "get", "cid": cid}
    if fetch:
        # The asker takes "still fetching" interim answers (``progress``): a home
        # that fetches from a slow source shows it is getting somewhere.
        h["fetch"] = h["p"] = True
    if urgent:
        h["u"] = True
    return h


def progress(rid: int) -> dict[str, Any]:
    """An interim answer: "no answer yet, but bytes are coming my way for you"."""
    return {"t": ANSWER, "id": rid, "p": True}


def is_progress(h: dict[str, Any]) -> bool:
    return h.get("p") is True


def get_takes_progress(h: dict[str, Any]) -> bool:
    return h.get("p") is True


def get_is_urgent(h: dict[str, Any]) -> bool:
    return h.get("u") is True


def parse_get(h: dict[str, Any]) -> bytes:
    return _bytes(h, "cid", ID_SIZE, "get")


def get_wants_fetch(h: dict[str, Any]) -> bool:
    return h.get("fetch") is True


def have(ids: list[bytes]) -> dict[str, Any]:
    return {"t": "have", "ids": ids}


def parse_have(h: dict[str, Any]) -> list[bytes]:
    ids = _get(h, "ids", list, "have")
    if len(ids) > MAX_HAVE_IDS:
        raise ProtocolError("have: too many ids")
    for i in ids:
        if not isinstance(i, bytes) or len(i) != ID_SIZE:
            raise ProtocolError(f"have: ids must be {ID_SIZE} bytes")
    return [bytes(i) for i in ids]


def snapshot(volume_id: bytes) -> dict[str, Any]:
    return {"t": "snapshot", "vid": volume_id}


def parse_snapshot(h: dict[str, Any]) -> bytes:
    return _bytes(h, "vid", 32, "snapshot")


def digest_notice(generation: int, hashes: int, count: int) -> dict[str, Any]:
    return {"t": "digest", "gen": generation, "k": hashes, "n": count}


def parse_digest(h: dict[str, Any], payload: bytes) -> tuple[int, int, int]:
    gen = _int(h, "gen", 0, MAX_SEQ, "digest")
    k = _int(h, "k", 1, 16, "digest")
    n = _int(h, "n", 0, MAX_SEQ, "digest")
    if not 0 < len(payload) <= MAX_DIGEST_BYTES or len(payload) & (len(payload) - 1):
        raise ProtocolError("digest: the filter must be a power of two of bytes, bounded")
    return gen, k, n


def revoked_notice(number: int) -> dict[str, Any]:
    return {"t": "revoked", "n": number}


def parse_revoked(h: dict[str, Any]) -> int:
    return _int(h, "n", 0, MAX_SEQ, "revoked")


def access_notice(number: int) -> dict[str, Any]:
    """A newer access list exists here (ask for it with an ``access`` request)."""
    return {"t": "access", "n": number}


def parse_access_notice(h: dict[str, Any]) -> int:
    return _int(h, "n", 0, MAX_SEQ, "access")


def answer(rid: int, *, error: str | None = None, **fields: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"t": ANSWER, "id": rid, **fields}
    if error is not None:
        out["err"] = error[:MAX_ERROR_TEXT]
    return out


def answer_error(h: dict[str, Any]) -> str | None:
    err = h.get("err")
    if err is None:
        return None
    if not isinstance(err, str):
        return "peer sent a malformed error"
    return err[:MAX_ERROR_TEXT]


MAX_SNAPSHOT_PAYLOAD = MAX_SNAPSHOT_BYTES
