"""A Bloom filter of the chunk ids a node holds, in the spirit of Summary Cache.

Peers swap these so a fetch asks first the peers that probably hold a chunk.
Chunk ids are BLAKE3 hashes, already uniform, so the k bit positions are simply
k 32-bit slices of the id: no further hashing. A false positive costs one
"missing" answer; a hostile filter only changes whom we ask first, since every
chunk is verified whoever serves it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable
from typing import Any

import trio

from p2pfs.store.cas import Store

from . import messages

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


class Digests:
    """The digests a node sends: one per set of private volumes a peer may see (a
    "class"), public ids in every one; built in worker threads and kept until the store
    changes (``renew``)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.generation = 0
        self._by_class: dict[frozenset[bytes], tuple[Bloom, int]] = {}

    def renew(self) -> None:
        self._by_class = {}
        self.generation = time.time_ns()

    def forget(self) -> None:
        """Who may see what changed: build each class again when next asked."""
        self._by_class.clear()

    async def notice(self, visible: frozenset[bytes]) -> tuple[dict[str, Any], bytes]:
        """The ``digest`` notice (header, payload) for a peer that may see ``visible``."""
        digest = self._by_class.get(visible)
        if digest is None:
            digest = self._by_class[visible] = await self._build(visible)
        bloom, count = digest
        return messages.digest_notice(self.generation, bloom.hashes, count), bloom.to_bytes()

    async def _build(self, visible: frozenset[bytes]) -> tuple[Bloom, int]:
        def ids() -> list[bytes]:
            every = self.store.chunk_ids()
            tagged = self.store.tagged()
            if not tagged:
                return every
            return [i for i in every if not (v := tagged.get(i)) or not v.isdisjoint(visible)]

        found = await trio.to_thread.run_sync(ids)
        return await trio.to_thread.run_sync(Bloom.of, found, len(found)), len(found)
