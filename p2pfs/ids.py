"""Identifiers: content ids are BLAKE3-256 digests of stored bytes; the only home of
``blake3`` outside the chunker's hot loop."""

from __future__ import annotations

from typing import NewType

import blake3

from p2pfs.errors import UsageError

ID_SIZE = 32

# BLAKE3-256 of a chunk's stored bytes; also the id of every encoded object.
ChunkId = NewType("ChunkId", bytes)
ObjectId = ChunkId
# A volume's id is its Ed25519 publisher public key: self-certifying, so any
# snapshot claiming to be of a volume can be checked against the id alone.
VolumeId = NewType("VolumeId", bytes)
NodeId = NewType("NodeId", bytes)


def to_hex(raw: bytes) -> str:
    return raw.hex()


def parse_hex_id(text: str, what: str = "id") -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"{what} {text!r} is not hexadecimal") from None
    if len(raw) != ID_SIZE:
        raise UsageError(f"{what} {text!r} must be {ID_SIZE * 2} hex digits")
    return raw


# -- BLAKE3: every content id is computed and checked here ---------------------------


def content_id(data: bytes | bytearray | memoryview) -> ChunkId:
    """The id of a chunk or object: BLAKE3-256 of its bytes."""
    return ChunkId(blake3.blake3(data).digest())


def matches(cid: bytes, data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` is the content of ``cid``: the one integrity check of received,
    read or stored bytes."""
    return blake3.blake3(data).digest() == cid


def derive(domain: bytes, data: bytes, size: int = 32) -> bytes:
    """A digest of ``data`` for one purpose (``domain``, NUL-terminated by convention),
    so digests for different purposes never collide."""
    return blake3.blake3(domain + data).digest(length=size)


def keyed(key: bytes, data: bytes) -> bytes:
    """BLAKE3 keyed hash (a MAC) of ``data`` under a 32-byte ``key``."""
    return blake3.blake3(data, key=key).digest()
