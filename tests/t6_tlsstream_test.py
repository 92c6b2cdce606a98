"""The lean TLS stream the peer protocol runs on, over real loopback sockets."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
import trio

from p2pfs.home import Home
from p2pfs.trust import enrolment
from p2pfs.trust.estate import Estate
from p2pfs.trust.tlsstream import TLSStream

pytestmark = pytest.mark.unit


def _member(tmp_path: Path, name: str, admin: Home) -> Estate:
    home = Home(tmp_path / name)
    home.init()
    return enrolment.join(home, enrolment.approve(admin, enrolment.request_join(home)))


@contextlib.asynccontextmanager
async def serving(
    serve: Callable[[trio.SocketStream], Awaitable[None]],
) -> AsyncIterator[tuple[trio.Nursery, trio.SocketStream]]:
    """A loopback listener running ``serve`` per connection, and one client socket to it."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio.serve_listeners, serve, listeners)
        yield nursery, await trio.open_tcp_stream("127.0.0.1", port)


@pytest.fixture
def members(tmp_path: Path) -> tuple[Estate, Estate]:
    admin = Home(tmp_path / "admin")
    admin.init()
    enrolment.init_estate(admin)
    return _member(tmp_path, "b", admin), _member(tmp_path, "c", admin)


async def test_bulk_both_ways_is_byte_exact_and_peers_see_each_other(
    members: tuple[Estate, Estate],
) -> None:
    b, c = members
    payload = os.urandom(9 * 1024 * 1024 + 12345)
    got_by_server = bytearray()
    server_peer: list[bytes] = []
    server_done = trio.Event()

    async def serve(tcp: trio.SocketStream) -> None:
        stream = TLSStream(tcp, b.server_context(), server_side=True)
        await stream.do_handshake()
        der = stream.getpeercert()
        assert der is not None
        server_peer.append(b.peer_node_id(der))
        async with trio.open_nursery() as n:

            async def echo_out() -> None:
                for i in range(0, len(payload), 700_000):
                    await stream.send_all(payload[i : i + 700_000])

            n.start_soon(echo_out)
            while len(got_by_server) < len(payload):
                data = await stream.receive_some()
                assert data
                got_by_server.extend(data)
        server_done.set()
        await stream.aclose()

    async with serving(serve) as (nursery, tcp):
        stream = TLSStream(tcp, c.client_context(), server_side=False)
        with trio.fail_after(30):
            await stream.do_handshake()
            der = stream.getpeercert()
            assert der is not None and c.peer_node_id(der) == b.node_id
            assert stream.version == "TLSv1.3"
            received = bytearray()
            async with trio.open_nursery() as n:

                async def send() -> None:
                    await stream.send_all(payload)

                n.start_soon(send)
                while len(received) < len(payload):
                    data = await stream.receive_some()
                    assert data
                    received.extend(data)
            assert bytes(received) == payload
            await server_done.wait()
        assert bytes(got_by_server) == payload
        assert server_peer == [c.node_id]
        await stream.aclose()
        nursery.cancel_scope.cancel()


async def test_outsider_handshake_fails_cleanly(
    tmp_path: Path, members: tuple[Estate, Estate]
) -> None:
    b, _ = members
    other_admin = Home(tmp_path / "other")
    other_admin.init()
    outsider = enrolment.init_estate(other_admin)
    results: list[str] = []
    served = trio.Event()

    async def serve(tcp: trio.SocketStream) -> None:
        stream = TLSStream(tcp, b.server_context(), server_side=True)
        try:
            await stream.do_handshake()
            results.append("server: handshake done")
        except trio.BrokenResourceError as e:
            results.append(f"server: {e}")
        finally:
            await stream.aclose()
            served.set()

    async with serving(serve) as (nursery, tcp):
        stream = TLSStream(tcp, outsider.client_context(), server_side=False)
        with trio.fail_after(10), pytest.raises(trio.BrokenResourceError):
            await stream.do_handshake()  # our CA does not know the server's certificate
        await stream.aclose()
        with trio.fail_after(10):
            await served.wait()
        assert results[0].startswith("server: TLS handshake failed")
        nursery.cancel_scope.cancel()


async def test_eof_reads_empty_or_broken_never_hangs(members: tuple[Estate, Estate]) -> None:
    b, c = members

    async def serve(tcp: trio.SocketStream) -> None:
        stream = TLSStream(tcp, b.server_context(), server_side=True)
        await stream.do_handshake()
        await stream.send_all(b"bye")
        await stream.aclose()

    async with serving(serve) as (nursery, tcp):
        stream = TLSStream(tcp, c.client_context(), server_side=False)
        with trio.fail_after(10):
            await stream.do_handshake()
            data = b""
            while len(data) < 3:
                data += await stream.receive_some()
            assert data == b"bye"
            with contextlib.suppress(trio.BrokenResourceError):
                assert await stream.receive_some() == b""
        await stream.aclose()
        nursery.cancel_scope.cancel()
