"""Identifiers: content ids are BLAKE3-256 digests of stored bytes."""

from __future__ import annotations

from typing import NewType

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
