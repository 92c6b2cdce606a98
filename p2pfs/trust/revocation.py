"""Revocation lists and volume endorsements: what the estate CA signs besides certificates.

Revocation is a CA-signed, numbered list of node ids (canonical msgpack, not an
X.509 CRL): it names identities rather than certificate serials, so a revoked node
stays out whatever certificate it presents, and peers hand it around as opaque
bytes. An endorsement is the CA's signature binding a volume key to a volume name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from p2pfs.errors import DecodeError, IntegrityError, P2pfsError, SignatureError
from p2pfs.keys import PUBLIC_KEY_SIZE, SigningKey, verify
from p2pfs.objects import codec

NODE_ID_SIZE = 16


VOLUME_ID_SIZE = PUBLIC_KEY_SIZE


# The largest signed list a node stores or a peer may send.
MAX_REVOCATION_LIST = 1024 * 1024


MAX_REVOKED = (MAX_REVOCATION_LIST - 1024) // (NODE_ID_SIZE + 2)  # ~58,000 node ids


MAX_NUMBER = 2**63 - 1


MAX_VOLUME_NAME = 255  # bytes of UTF-8 in an endorsed volume name


_REVOCATION_DOMAIN = b"p2pfs-revocation-list-v1\0"


_ENDORSEMENT_DOMAIN = b"p2pfs-volume-endorsement-v1\0"


_REVOCATION_VERSION = 1


@dataclass(frozen=True)
class RevocationList:
    """A verified revocation list and the exact bytes it came in."""

    number: int
    issued: int  # unix time the CA signed it
    revoked: frozenset[bytes]
    encoded: bytes


def sign_revocations(
    ca_key: SigningKey, estate_id: bytes, number: int, revoked: frozenset[bytes]
) -> bytes:
    if len(revoked) > MAX_REVOKED:
        raise P2pfsError(f"a revocation list holds at most {MAX_REVOKED} node ids")
    body = codec.pack(
        {
            "v": _REVOCATION_VERSION,
            "estate": estate_id,
            "n": number,
            "issued": int(time.time()),
            "revoked": sorted(revoked),
        }
    )
    return codec.pack({"list": body, "sig": ca_key.sign(_REVOCATION_DOMAIN + body)})


def open_signed(data: bytes, limit: int, domain: bytes, ca_public: bytes, what: str) -> bytes:
    """The body of a CA-signed list ``{"list": body, "sig": signature}`` (what the
    revocation and access lists share); DecodeError or SignatureError naming ``what``."""
    if not isinstance(data, bytes) or len(data) > limit:
        raise DecodeError(f"{what} must be bytes, at most {limit}")
    outer = codec.unpack(data, max_size=limit, canonical=True)
    if not isinstance(outer, dict) or set(outer) != {"list", "sig"}:
        raise DecodeError(f"{what} must be a map of 'list' and 'sig'")
    body, sig = outer["list"], outer["sig"]
    if not isinstance(body, bytes) or not isinstance(sig, bytes):
        raise DecodeError(f"{what}'s 'list' and 'sig' must be bytes")
    try:
        verify(ca_public, sig, domain + body)
    except SignatureError:
        raise SignatureError(f"the {what} is not signed by this estate's CA") from None
    return body


def decode_revocations(data: bytes, ca_public: bytes, estate_id: bytes) -> RevocationList:
    """Verify a revocation list; DecodeError if malformed, SignatureError if not this CA's."""
    body = open_signed(data, MAX_REVOCATION_LIST, _REVOCATION_DOMAIN, ca_public, "revocation list")
    doc = codec.unpack(body, max_size=MAX_REVOCATION_LIST, canonical=True)
    if not isinstance(doc, dict) or set(doc) != {"v", "estate", "n", "issued", "revoked"}:
        raise DecodeError("a revocation list must hold v, estate, n, issued and revoked")
    if doc["v"] != _REVOCATION_VERSION:
        raise DecodeError(f"revocation list version {doc['v']!r} is not supported")
    if doc["estate"] != estate_id:
        raise IntegrityError("the revocation list names another estate")
    number, issued, revoked = doc["n"], doc["issued"], doc["revoked"]
    if type(number) is not int or not 1 <= number <= MAX_NUMBER:
        raise DecodeError("a revocation list number must be an integer from 1 to 2^63-1")
    if type(issued) is not int or not 0 <= issued <= MAX_NUMBER:
        raise DecodeError("a revocation list's issue time must be a non-negative integer")
    if not isinstance(revoked, list) or len(revoked) > MAX_REVOKED:
        raise DecodeError(f"a revocation list must list at most {MAX_REVOKED} node ids")
    for i, node_id in enumerate(revoked):
        if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_SIZE:
            raise DecodeError(f"a revoked node id must be {NODE_ID_SIZE} bytes")
        if i and node_id <= revoked[i - 1]:
            raise DecodeError("revoked node ids must be sorted and unique")
    return RevocationList(number, issued, frozenset(revoked), data)


def endorsement_message(estate_id: bytes, volume_id: bytes, name: str) -> bytes:
    if not isinstance(volume_id, bytes) or len(volume_id) != VOLUME_ID_SIZE:
        raise SignatureError(f"a volume id must be {VOLUME_ID_SIZE} bytes")
    if not isinstance(name, str):
        raise SignatureError("a volume name must be a string")
    try:
        encoded = name.encode("utf-8")
    except UnicodeError:
        raise SignatureError(f"volume name {name!r} is not valid UTF-8") from None
    if not 0 < len(encoded) <= MAX_VOLUME_NAME:
        raise SignatureError(f"a volume name must be 1 to {MAX_VOLUME_NAME} bytes")
    # Fixed-size fields first, the name last: the encoding is unambiguous.
    return _ENDORSEMENT_DOMAIN + estate_id + volume_id + encoded
