"""A Bloom filter of the chunk ids a node holds, in the spirit of Summary Cache.

Peers swap these so a fetch asks first the peers that probably hold a chunk.
Chunk ids are BLAKE3 hashes, already uniform, so the k bit positions are simply
k 32-bit slices of the id: no further hashing. A false positive costs one
"missing" answer; a hostile filter only changes whom we ask first, since every
chunk is verified whoever serves it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

HASHES = 7  # optimal for ~1 % false positives at 9.6 bits per id
BITS_PER_ID = 9.6
MIN_BYTES = 64
MAX_BYTES = 16 * 1024 * 1024


def size_for(count: int) -> int:
    """Filter bytes for ``count`` ids: a power of two (so positions are a mask), bounded."""
    need = max(MIN_BYTES, math.ceil(count * BITS_PER_ID / 8))
    return min(MAX_BYTES, 1 << (need - 1).bit_length())


class Bloom:
    __slots__ = ("bits", "hashes", "mask")

    def __init__(self, bits: bytes | bytearray, hashes: int = HASHES) -> None:
        size = len(bits)
        if size < 1 or size & (size - 1) or size > MAX_BYTES:
            raise ValueError("a Bloom filter must be a power of two of bytes, at most 16 MiB")
        if not 1 <= hashes <= 8:
            raise ValueError("a Bloom filter uses 1 to 8 hashes")
        self.bits = bytearray(bits)
        self.hashes = hashes
        self.mask = size * 8 - 1

    @classmethod
    def of(cls, ids: Iterable[bytes], count: int) -> Bloom:
        bloom = cls(bytes(size_for(count)))
        for cid in ids:
            bloom.add(cid)
        return bloom

    def _positions(self, cid: bytes) -> list[int]:
        return [
            int.from_bytes(cid[4 * i : 4 * i + 4], "little") & self.mask for i in range(self.hashes)
        ]

    def add(self, cid: bytes) -> None:
        for pos in self._positions(cid):
            self.bits[pos >> 3] |= 1 << (pos & 7)

    def __contains__(self, cid: object) -> bool:
        if not isinstance(cid, bytes) or len(cid) < 4 * self.hashes:
            return False
        return all(self.bits[pos >> 3] & (1 << (pos & 7)) for pos in self._positions(cid))

    def to_bytes(self) -> bytes:
        return bytes(self.bits)
