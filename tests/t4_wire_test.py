"""Frames, messages, connections and digests, over trio's in-memory stream pairs."""

from __future__ import annotations

import functools
import os
import random
import struct
from typing import Any

import pytest
import trio
import trio.testing

from p2pfs.net import messages, wire
from p2pfs.net.connection import Connection, PeerUnavailable
from p2pfs.net.digest import Bloom, size_for
from p2pfs.objects.codec import pack

pytestmark = pytest.mark.unit


def test_frames_roundtrip_in_any_fragmentation() -> None:
    frames = [
        ({"t": "get", "id": i, "cid": os.urandom(32)}, os.urandom(i * 1000)) for i in range(20)
    ]
    data = b"".join(wire.encode(h, p) for h, p in frames)
    rng = random.Random(1)
    for _ in range(20):
        dec = wire.Decoder()
        out = []
        pos = 0
        while pos < len(data):
            n = rng.randint(1, 9000)
            out += dec.feed(data[pos : pos + n])
            pos += n
        assert out == frames
        assert dec.buffered == 0


@pytest.mark.parametrize(
    "data, text",
    [
        (struct.pack(">I", wire.MAX_FRAME + 1), "out of bounds"),
        (struct.pack(">I", 1) + b"x", "out of bounds"),
        (struct.pack(">IH", 10, 9000) + b"x" * 8, "header length"),
        (struct.pack(">IH", 5, 3) + b"\xc1\xc1\xc1", "malformed"),
        (struct.pack(">IH", 4, 2) + pack([1]), "map"),
        (struct.pack(">IH", 6, 4) + pack({"x": 1}), "'t'"),
    ],
)
def test_bad_frames_are_protocol_errors(data: bytes, text: str) -> None:
    with pytest.raises(wire.ProtocolError, match=text):
        wire.Decoder().feed(data)


def test_oversized_length_refused_before_buffering() -> None:
    dec = wire.Decoder(max_payload=1024)
    with pytest.raises(wire.ProtocolError):
        dec.feed(struct.pack(">I", 2 + wire.MAX_HEADER + 1025))


def test_hello_validation() -> None:
    head = messages.VolumeHead("tools", os.urandom(32), 3, os.urandom(32), os.urandom(64), None)
    hello = messages.Hello(os.urandom(16), os.urandom(16), 1, (head,), 0)
    assert messages.Hello.from_wire(hello.to_wire()) == hello
    bad = hello.to_wire()
    bad["vols"] = [["../x", os.urandom(32), 1, os.urandom(32), None, None]]
    with pytest.raises(wire.ProtocolError, match="volume name"):
        messages.Hello.from_wire(bad)
    bad = hello.to_wire()
    bad["node"] = b"short"
    with pytest.raises(wire.ProtocolError, match="node"):
        messages.Hello.from_wire(bad)
    bad = hello.to_wire()
    bad["vols"] = [head.to_wire()] * (messages.MAX_VOLUMES + 1)
    with pytest.raises(wire.ProtocolError, match="too many"):
        messages.Hello.from_wire(bad)


def test_bloom_has_no_false_negatives_and_few_false_positives() -> None:
    ids = [os.urandom(32) for _ in range(20_000)]
    bloom = Bloom.of(ids, len(ids))
    assert all(i in bloom for i in ids)
    others = [os.urandom(32) for _ in range(20_000)]
    fp = sum(i in bloom for i in others) / len(others)
    assert fp < 0.03
    again = Bloom(bloom.to_bytes(), bloom.hashes)
    assert all(i in again for i in ids[:100])
    assert size_for(0) == 64 and size_for(10**9) == 16 * 1024 * 1024
    with pytest.raises(ValueError):
        Bloom(b"x" * 100)


async def _echo_request(conn: Connection, header: dict[str, Any], payload: bytes) -> Any:
    if header["t"] == "get":
        await trio.sleep(random.random() / 100)
        return messages.answer(header["id"]), header["cid"] * 1000
    if header["t"] == "have":
        await trio.sleep_forever()
    raise wire.ProtocolError("no")


async def _ignore(conn: Connection, header: dict[str, Any], payload: bytes) -> None:
    return None


def _pair() -> tuple[Connection, Connection, Any, Any]:
    a_stream, b_stream = trio.testing.memory_stream_pair()
    a = Connection(a_stream, b"B" * 16, on_request=_echo_request, on_notice=_ignore)
    b = Connection(b_stream, b"A" * 16, on_request=_echo_request, on_notice=_ignore)
    return a, b, a_stream, b_stream


async def test_many_requests_in_flight_both_ways() -> None:
    a, b, _, _ = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        results: dict[tuple[str, int], bytes] = {}

        async def ask(side: Connection, name: str, i: int) -> None:
            cid = i.to_bytes(32, "big")
            header, payload = await side.request(messages.get(cid), within=10)
            assert messages.answer_error(header) is None
            results[(name, i)] = payload

        async with trio.open_nursery() as inner:
            for i in range(100):
                inner.start_soon(ask, a, "a", i)
                inner.start_soon(ask, b, "b", i)
        assert len(results) == 200
        assert all(v == i.to_bytes(32, "big") * 1000 for (_, i), v in results.items())
        with pytest.raises(PeerUnavailable, match="no answer"):
            await a.request(messages.have([b"x" * 32]), within=0.2)
        # The connection survives a timed-out request.
        header, _ = await a.request(messages.get(b"y" * 32), within=10)
        assert messages.answer_error(header) is None
        await a.aclose()
        with pytest.raises(PeerUnavailable):
            await a.request(messages.get(b"y" * 32), within=10)
        nursery.cancel_scope.cancel()


class _GatedStream(trio.abc.Stream):
    """Records each write; the first waits for ``gate`` (a link busy with a bulk frame)."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.gate = trio.Event()

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        if not self.writes:
            self.writes.append(bytes(data))
            await self.gate.wait()
        else:
            self.writes.append(bytes(data))
        await trio.lowlevel.checkpoint()

    async def wait_send_all_might_not_block(self) -> None:
        await trio.lowlevel.checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        await trio.sleep_forever()
        raise AssertionError

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


async def test_small_urgent_frames_queued_together_leave_in_one_write() -> None:
    stream = _GatedStream()
    conn = Connection(stream, b"B" * 16, on_request=_echo_request, on_notice=_ignore)
    sent: list[int] = []

    async def small(i: int, scope: trio.CancelScope) -> None:
        with scope:
            await conn.send({"t": "ping", "id": i})
            sent.append(i)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            functools.partial(conn.send, {"t": "answer", "id": 99}, b"x" * 100_000, urgent=False)
        )
        await trio.testing.wait_all_tasks_blocked()
        scopes = [trio.CancelScope() for _ in range(6)]
        for i, scope in enumerate(scopes):
            nursery.start_soon(small, i, scope)
            await trio.testing.wait_all_tasks_blocked()
        # The one that leads the batch and one that follows give up before it leaves:
        # their frames stay home, and the lead passes to another.
        scopes[0].cancel()
        scopes[3].cancel()
        await trio.testing.wait_all_tasks_blocked()
        stream.gate.set()
    assert sorted(sent) == [1, 2, 4, 5]
    assert len(stream.writes) == 2  # the bulk frame, then every small one in one write
    frames = wire.Decoder().feed(stream.writes[1])
    assert [h["id"] for h, _ in frames] == [1, 2, 4, 5]
    assert conn.statistics().frames_out == 5


async def test_garbage_closes_only_that_connection() -> None:
    _a, b, a_stream, _ = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.run)
        await a_stream.send_all(b"\xff\xff\xff\xff garbage")
        with trio.fail_after(5):
            await b.closed.wait()
        assert "out of bounds" in b.close_reason
        nursery.cancel_scope.cancel()


async def test_unknown_request_closes_connection() -> None:
    a, b, _, _ = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(a.run)
        nursery.start_soon(b.run)
        with pytest.raises(PeerUnavailable):
            await a.request({"t": "revocations"}, within=5)
        assert b.closed.is_set()
        nursery.cancel_scope.cancel()


async def test_trickling_frame_is_cut_off() -> None:
    a_stream, b_stream = trio.testing.memory_stream_pair()
    b = Connection(
        b_stream, b"A" * 16, on_request=_echo_request, on_notice=_ignore, frame_timeout=0.5
    )
    frame = wire.encode(messages.get(b"z" * 32))
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.run)
        for byte in frame[:-1]:
            if b.closed.is_set():
                break
            try:
                await a_stream.send_all(bytes([byte]))
            except trio.BrokenResourceError:
                break
            await trio.sleep(0.1)
        with trio.fail_after(5):
            await b.closed.wait()
        assert "did not complete" in b.close_reason
        nursery.cancel_scope.cancel()


# -- what a frame may carry, decided from its header -------------------------------


def _frame_prefix(header: dict[str, Any], payload_size: int) -> bytes:
    """A frame's length, header length and header, claiming ``payload_size`` bytes after."""
    head = pack(header)
    return struct.pack(">IH", 2 + len(head) + payload_size, len(head)) + head


def test_a_request_that_claims_a_payload_is_refused_before_it_is_buffered() -> None:
    d = wire.Decoder(payload_limit=lambda h: 0)
    with pytest.raises(wire.ProtocolError, match="carries 50331648 payload bytes; it may carry 0"):
        d.feed(_frame_prefix({"t": "get", "id": 1, "cid": b"x" * 32}, 48 * 1024 * 1024))
    assert d.buffered < 1024


def test_a_discarded_payload_is_skipped_unread_and_the_frame_still_comes_out() -> None:
    d = wire.Decoder(payload_limit=lambda h: wire.DISCARD)
    size = 8 * 1024 * 1024
    frames = d.feed(_frame_prefix({"t": "r", "id": 7}, size) + b"a" * 1000)
    assert frames == [] and d.buffered == size - 1000
    pieces = (size - 1000) // 65536
    for _ in range(pieces):
        assert d.feed(b"b" * 65536) == []
        assert len(d._buf) == 0  # nothing of it is held
    rest = size - 1000 - pieces * 65536
    frames = d.feed(b"c" * rest + wire.encode({"t": "ping", "id": 2}))
    assert frames == [({"t": "r", "id": 7}, b""), ({"t": "ping", "id": 2}, b"")]
    assert d.buffered == 0 and len(d._buf) == 0


def test_the_buffer_is_given_back_after_a_large_frame() -> None:
    import sys

    d = wire.Decoder()
    frame = wire.encode({"t": "r", "id": 1}, os.urandom(16 * 1024 * 1024))
    for i in range(0, len(frame), 1 << 20):
        d.feed(frame[i : i + (1 << 20)])
    assert sys.getsizeof(d._buf) < 64 * 1024


async def test_a_peer_cannot_park_payloads_behind_requests_or_unasked_answers() -> None:
    _a, b, a_stream, _ = _pair()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(b.run)
        # An answer nobody asked for: its payload is dropped as it comes.
        await a_stream.send_all(_frame_prefix({"t": "r", "id": 99}, 4 * 1024 * 1024))
        for _ in range(64):
            await a_stream.send_all(b"\0" * 65536)
        await trio.testing.wait_all_tasks_blocked()
        assert b.reader.bytes_in >= 4 * 1024 * 1024
        assert not b.closed.is_set() and b.reader.decoder.buffered == 0
        # A request with a payload breaks the protocol at its header.
        await a_stream.send_all(_frame_prefix({"t": "get", "id": 1, "cid": b"x" * 32}, 1 << 20))
        with trio.fail_after(5):
            await b.closed.wait()
        assert b.broke_protocol and "may carry 0" in b.close_reason
        nursery.cancel_scope.cancel()
