"""The group commit of fetched chunks (net/cache_writer.py), on a real store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from p2pfs.ids import content_id
from p2pfs.net.cache_writer import CacheWriter
from p2pfs.store.cas import Store
from p2pfs.store.quota import QuotaExceeded

pytestmark = pytest.mark.unit


def chunks(n: int, size: int = 4096) -> list[tuple[bytes, bytes]]:
    out = []
    for _ in range(n):
        data = os.urandom(size)
        out.append((content_id(data), data))
    return out


async def put_all(writer: CacheWriter, items: list[tuple[bytes, bytes]]) -> list[object]:
    results: list[object] = [None] * len(items)

    async def one(i: int) -> None:
        try:
            await writer.put(*items[i])
            results[i] = "stored"
        except Exception as e:
            results[i] = e

    async with trio.open_nursery() as nursery:
        for i in range(len(items)):
            nursery.start_soon(one, i)
    return results


async def test_concurrent_puts_share_batches_and_all_are_stored(tmp_path: Path) -> None:
    with Store(tmp_path / "store") as store:
        batches: list[int] = []
        put_many = store.put_many

        def counting(items, **kw):  # type: ignore[no-untyped-def]
            items = list(items)
            batches.append(len(items))
            return put_many(items, **kw)

        store.put_many = counting  # type: ignore[method-assign]
        writer = CacheWriter(store, trio.CapacityLimiter(4))
        items = chunks(100)
        assert await put_all(writer, items) == ["stored"] * 100
        for cid, data in items:
            assert store.get(cid) == data
        # One trip for the first, then the rest in batches of at most 64.
        assert sum(batches) == 100 and len(batches) < 10 and max(batches) <= 64


async def test_a_full_quota_fails_every_chunk_of_the_batch(tmp_path: Path) -> None:
    with Store(tmp_path / "store", max_bytes=10_000, evict_to_fit=False) as store:
        writer = CacheWriter(store, trio.CapacityLimiter(4))
        results = await put_all(writer, chunks(8, size=8192))
        assert all(isinstance(r, QuotaExceeded) or r == "stored" for r in results)
        assert any(isinstance(r, QuotaExceeded) for r in results)
        assert store.statistics().bytes <= 10_000


async def test_a_failed_batch_fails_only_its_own_chunks(tmp_path: Path) -> None:
    with Store(tmp_path / "store") as store:
        put_many = store.put_many
        calls = 0

        def second_fails(items, **kw):  # type: ignore[no-untyped-def]
            nonlocal calls
            calls += 1
            if calls == 2:
                raise OSError(28, "No space left on device")
            return put_many(items, **kw)

        store.put_many = second_fails  # type: ignore[method-assign]
        writer = CacheWriter(store, trio.CapacityLimiter(4))
        items = chunks(10)
        results = await put_all(writer, items)
        # The first put to run is a batch alone; the other nine form the second, which
        # fails: only they see the error, and the first chunk is stored.
        stored = [i for i, r in enumerate(results) if r == "stored"]
        assert len(stored) == 1 and store.get(items[stored[0]][0]) == items[stored[0]][1]
        assert sum(isinstance(r, OSError) for r in results) == 9
