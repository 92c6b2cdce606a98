"""Slow links, in virtual time: deadlines count silence, urgent answers go first.

Over trio's in-memory streams with a sender that trickles (``Trickle``) and trio's
MockClock, so "30 s of a slow link" takes milliseconds and nothing depends on how
fast this machine is. The same behaviour over real shaped links is in
``t16_slow_links_lab_test.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from p2pfs.errors import MissingChunk
from p2pfs.ids import content_id
from p2pfs.net import messages
from p2pfs.net.connection import Connection, PeerUnavailable, SendQueue
from p2pfs.net.fetcher import Fetcher
from p2pfs.net.peers import Peer, PeerTable
from p2pfs.store.cas import Store

pytestmark = pytest.mark.unit


class Trickle(trio.abc.Stream):
    """A stream whose sending side moves ``rate`` bytes per second, in small pieces."""

    def __init__(self, inner: trio.abc.Stream, rate: float, piece: int = 4096) -> None:
        self.inner = inner
        self.rate = rate
        self.piece = piece

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data)
        for i in range(0, len(view), self.piece):
            part = view[i : i + self.piece]
            await self.inner.send_all(part)
            await trio.sleep(len(part) / self.rate)

    async def wait_send_all_might_not_block(self) -> None:
        await self.inner.wait_send_all_might_not_block()

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        return await self.inner.receive_some(max_bytes)

    async def aclose(self) -> None:
        await self.inner.aclose()


CHUNKS = {content_id(bytes([i]) * 256 * 1024): bytes([i]) * 256 * 1024 for i in range(8)}
STUCK = content_id(b"never answered")


async def _serve(conn: Connection, header: dict[str, Any], payload: bytes) -> Any:
    if header["t"] == "get":
        if messages.parse_get(header) == STUCK:  # a peer that takes the request and stalls
            await trio.sleep_forever()
        data = CHUNKS.get(messages.parse_get(header))
        if data is None:
            return messages.answer(header["id"], error="missing"), b""
        return messages.answer(header["id"]), data
    if header["t"] == "have":  # never answered: a silent peer
        await trio.sleep_forever()
    return messages.answer(header["id"]), b""


async def _quiet(conn: Connection, header: dict[str, Any], payload: bytes) -> None:
    return None


def _slow_pair(rate: float) -> tuple[Connection, Connection]:
    """(client, server): the server's answers cross a link of ``rate`` bytes/s."""
    a, b = trio.testing.memory_stream_pair()
    client = Connection(a, b"S" * 16, on_request=_serve, on_notice=_quiet, frame_timeout=600)
    server = Connection(
        Trickle(b, rate), b"C" * 16, on_request=_serve, on_notice=_quiet, frame_timeout=600
    )
    return client, server


async def test_a_slow_answer_arrives_though_it_takes_far_longer_than_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = _slow_pair(rate=16 * 1024)  # 256 KiB in 16 s
    cid = next(iter(CHUNKS))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        nursery.start_soon(server.run)
        start = trio.current_time()
        header, payload = await client.request(messages.get(cid), within=1.0)
        assert messages.answer_error(header) is None
        assert payload == CHUNKS[cid]
        assert trio.current_time() - start > 10  # it took the link's time, not the deadline's
        # A silent request still fails after its deadline of silence.
        start = trio.current_time()
        with pytest.raises(PeerUnavailable, match="no answer"):
            await client.request(messages.have([cid]), within=1.0)
        assert trio.current_time() - start < 1.5
        nursery.cancel_scope.cancel()


async def test_the_urgent_answer_passes_answers_queued_for_readahead(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = _slow_pair(rate=256 * 1024)  # one chunk a second
    ids = list(CHUNKS)
    done: list[str] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        nursery.start_soon(server.run)

        async def ask(cid: bytes, name: str, urgent: bool) -> None:
            await client.request(messages.get(cid, urgent=urgent), within=5)
            done.append(name)

        async with trio.open_nursery() as asks:
            for i in range(6):
                asks.start_soon(ask, ids[i], f"ahead{i}", False)
                await trio.sleep(0.01)
            asks.start_soon(ask, ids[7], "blocked", True)
        nursery.cancel_scope.cancel()
    # The first readahead answer was on the wire already; the blocked reader's comes next.
    assert done.index("blocked") <= 2, done


async def test_send_queue_hands_over_urgent_first_and_survives_cancellation() -> None:
    queue = SendQueue()
    order: list[str] = []
    async with trio.open_nursery() as nursery:

        async def hold(name: str, urgent: bool) -> None:
            async with queue.hold(urgent):
                order.append(name)
                await trio.sleep(0.01)

        async with queue.hold(False):
            for name in ("bulk1", "bulk2"):  # (one at a time: trio starts tasks in any order)
                nursery.start_soon(hold, name, False)
                await trio.testing.wait_all_tasks_blocked()
            cancelled = trio.CancelScope()

            async def gives_up() -> None:
                with cancelled:
                    await hold("never", True)

            nursery.start_soon(gives_up)
            nursery.start_soon(hold, "urgent", True)
            await trio.testing.wait_all_tasks_blocked()
            cancelled.cancel()
            await trio.testing.wait_all_tasks_blocked()
    assert order == ["urgent", "bulk1", "bulk2"]
    async with queue.hold(False):  # free again
        pass


def _fetcher(table: PeerTable, deadline_s: float, store: Store | None = None) -> Fetcher:
    class NoQuarantine:
        def quarantine(self, peer: Peer, reason: str) -> None:
            raise AssertionError(reason)

    return Fetcher(b"M" * 16, table, NoQuarantine(), deadline_s=deadline_s, store=store)


async def test_a_fetch_over_a_slow_peer_finishes_and_one_with_nobody_fails_in_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = _slow_pair(rate=8 * 1024)  # 32 s a chunk
    table = PeerTable()
    peer = table.get(b"S" * 16)
    peer.conns.append(client)
    fetcher = _fetcher(table, deadline_s=2.0)
    cid = next(iter(CHUNKS))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        nursery.start_soon(server.run)
        start = trio.current_time()
        data, who = await fetcher.fetch(cid, urgent=True)
        assert data == CHUNKS[cid] and who is peer
        assert trio.current_time() - start > 20
        rate = fetcher.rate()
        assert rate is not None and rate > 0
        # A chunk nobody holds: "missing" from the one peer, again and again, then EIO.
        start = trio.current_time()
        with pytest.raises(MissingChunk, match="nothing arrived for 2 s"):
            await fetcher.fetch(content_id(b"nobody has this"))
        assert trio.current_time() - start < 2.5
        nursery.cancel_scope.cancel()
    # With no peer at all, the same.
    start = trio.current_time()
    with pytest.raises(MissingChunk, match="0 of 0 known peers connected"):
        await _fetcher(PeerTable(), deadline_s=2.0).fetch(cid)
    assert 2.0 <= trio.current_time() - start < 2.5


async def test_a_fetch_given_up_names_the_peer_that_stayed_silent(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client, server = _slow_pair(rate=1024 * 1024)
    table = PeerTable()
    table.get(b"S" * 16).conns.append(client)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        nursery.start_soon(server.run)
        with pytest.raises(MissingChunk) as failed:
            await _fetcher(table, deadline_s=2.0).fetch(STUCK)
        nursery.cancel_scope.cancel()
    said = str(failed.value)
    # Its request's own timeout or the fetch's watchdog, whichever ends first, says so.
    assert (b"S" * 16).hex()[:8] + ": " in said and "no answer" in said, said
    assert "reachable" not in said, said


async def _stall(conn: Connection, header: dict[str, Any], payload: bytes) -> Any:
    await trio.sleep_forever()  # takes every request, answers none


async def test_a_peer_slow_on_a_busy_link_is_hedged_before_the_deadline(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A peer whose chunks took 10 s each (a slow link shared by a window of readahead)
    and whose next answer is stuck: the fetch asks another within its deadline, rather
    than waiting four of those latencies and failing with nobody else asked."""
    a, b = trio.testing.memory_stream_pair()
    stuck_client = Connection(a, b"H" * 16, on_request=_serve, on_notice=_quiet)
    stuck_server = Connection(b, b"C" * 16, on_request=_stall, on_notice=_quiet)
    client, server = _slow_pair(rate=1024 * 1024)
    table = PeerTable()
    stuck = table.get(b"H" * 16)
    stuck.conns.append(stuck_client)
    stuck.latency_s = 10.0
    good = table.get(b"S" * 16)
    good.conns.append(client)
    fetcher = _fetcher(table, deadline_s=2.0)
    fetcher.origins = {stuck.node_id}  # asked first: a publisher holds every chunk
    cid = next(iter(CHUNKS))
    async with trio.open_nursery() as nursery:
        for conn in (stuck_client, stuck_server, client, server):
            nursery.start_soon(conn.run)
        data, who = await fetcher.fetch(cid)
        nursery.cancel_scope.cancel()
    assert data == CHUNKS[cid] and who is good
    assert fetcher.statistics().hedged_requests == 1


async def test_a_readers_fetch_returns_before_the_store_write_and_a_second_waits_for_it(
    tmp_path: Path,
) -> None:
    """A reader's fetch (``wait_stored=False``) hands back its verified chunk while the
    store is still busy; a second fetch of the chunk asks no peer again: it waits for
    the write and reads the chunk from the store. A pin's fetch waits for its write."""
    asked: list[bytes] = []

    async def counting(conn: Connection, header: dict[str, Any], payload: bytes) -> Any:
        if header["t"] == "get":
            asked.append(messages.parse_get(header))
        return await _serve(conn, header, payload)

    a, b = trio.testing.memory_stream_pair()
    client = Connection(a, b"S" * 16, on_request=_serve, on_notice=_quiet)
    server = Connection(b, b"C" * 16, on_request=counting, on_notice=_quiet)
    table = PeerTable()
    table.get(b"S" * 16).conns.append(client)
    first, second = list(CHUNKS)[:2]
    with Store(tmp_path / "store") as store:
        fetcher = _fetcher(table, deadline_s=10.0, store=store)
        got: dict[str, bytes] = {}

        async def fetch(name: str, cid: bytes, wait_stored: bool) -> None:
            got[name] = await fetcher.fetch_into_store(cid, wait_stored=wait_stored)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            nursery.start_soon(server.run)
            await nursery.start(fetcher.run)
            store._lock.acquire()  # the store is busy: no chunk file can be renamed in
            locked = True

            def unlock() -> None:
                nonlocal locked
                if locked:
                    locked = False
                    store._lock.release()  # on the trio thread, which holds it

            async def at_the_latest() -> None:  # a fetch that waits fails, not hangs
                await trio.sleep(5)
                unlock()

            nursery.start_soon(at_the_latest)
            try:
                data = await fetcher.fetch_into_store(first, wait_stored=False)
                assert locked, "the reader's fetch waited for the store"
                assert data == CHUNKS[first] and not store.has(first)
                async with trio.open_nursery() as both:
                    both.start_soon(fetch, "again", first, False)
                    both.start_soon(fetch, "pin", second, True)
                    await trio.sleep(0.3)
                    assert got == {}  # both wait for the store
                    unlock()
            finally:
                unlock()
            nursery.cancel_scope.cancel()
        assert got == {"again": CHUNKS[first], "pin": CHUNKS[second]}
        assert store.has(first) and store.has(second)
        assert asked == [first, second]  # the second read of ``first`` asked nobody
