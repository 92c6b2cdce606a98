"""The in-memory cache of verified chunks: bounded, and scan resistant (a sequential
read does not fill it, issue 14), with random reads kept as before."""

from __future__ import annotations

import pytest

from p2pfs.ids import content_id
from p2pfs.volume.content import ChunkCache

pytestmark = pytest.mark.unit
KIB = 1024


def _chunks(n: int, size: int = 64 * KIB) -> dict[bytes, bytes]:
    out = {}
    for i in range(n):
        data = i.to_bytes(4, "big") * (size // 4)
        out[content_id(data)] = data
    return out


def _cache(
    chunks: dict[bytes, bytes], *, max_bytes: int, scan_bytes: int
) -> tuple[ChunkCache, list[bytes]]:
    loads: list[bytes] = []

    async def load(cid: bytes) -> bytes:
        loads.append(cid)
        return chunks[cid]

    async def batch(cids: list[bytes]) -> list[bytes | BaseException]:
        loads.extend(cids)
        return [chunks[c] for c in cids]

    return ChunkCache(load, max_bytes=max_bytes, batch_loader=batch, scan_bytes=scan_bytes), loads


async def test_a_sequential_pass_stays_within_the_scan_bound() -> None:
    chunks = _chunks(64)  # 4 MiB
    cache, loads = _cache(chunks, max_bytes=8 << 20, scan_bytes=256 * KIB)
    ids = list(chunks)
    for k in range(0, len(ids), 4):
        await cache.prefetch_run(ids[k : k + 4])  # readahead
        for cid in ids[k : k + 4]:
            assert await cache.get(cid, scan=True) == chunks[cid]
    assert len(loads) == len(ids)  # each loaded once: readahead's loads were used
    assert cache.bytes <= 256 * KIB  # not the 4 MiB read, though the main LRU had room


async def test_random_reads_fill_the_main_lru_and_a_scanned_chunk_moves_there() -> None:
    chunks = _chunks(32)  # 2 MiB
    cache, loads = _cache(chunks, max_bytes=1 << 20, scan_bytes=128 * KIB)
    ids = list(chunks)
    for cid in ids[:16]:  # 1 MiB read at random
        await cache.get(cid)
    assert cache.bytes == 1 << 20
    # A scan of other chunks evicts none of them.
    for cid in ids[16:]:
        await cache.get(cid, scan=True)
    assert all(cache.holds(c) for c in ids[:16])
    assert cache.bytes <= (1 << 20) + 128 * KIB
    # The last scanned chunk, read at random, is kept in the main LRU from now on.
    last = ids[-1]
    before = len(loads)
    assert cache.get_cached(last) == chunks[last]
    for cid in ids[16:-1]:
        await cache.get(cid, scan=True)  # another scan
    assert cache.holds(last) and len(loads) > before
    # The main LRU stays bounded: the oldest random chunk made room for it.
    assert cache.bytes <= (1 << 20) + 128 * KIB
    assert not cache.holds(ids[0])
