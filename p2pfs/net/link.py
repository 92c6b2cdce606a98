"""The desktop link (appliance mode): transports, frames, and the desktop's client end.

A desktop reaches its appliance over a host-only link. Two transports sit behind
one interface (``Address``: ``connect`` and ``listen``), both carrying the same
TLS 1.3 stream and frames:

- ``HOST:PORT`` (or ``tcp:HOST:PORT``): TCP on the host-only network;
- ``vsock:CID:PORT``: AF_VSOCK, the hypervisor's own socket between a VM and its
  host (needs vhost-vsock on the host; ``vsock_unavailable()`` says why not).

Frames are those of the peer protocol (``wire.py``: a small msgpack header, then
raw bytes). The desktop sends ``auth`` first (its name and token secret), then
``req`` frames with an id; the appliance answers each with an ``ans`` frame
repeating the id, ``ok`` or an ``error`` (with an ``errno``), and its result as
the payload: raw bytes for a read, msgpack for a listing, JSON for status-like
answers (they hold floats, which canonical msgpack refuses). Many requests may be
in flight on one connection; each waits at most its deadline.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import logging
import math
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

from p2pfs.errors import P2pfsError, UsageError
from p2pfs.objects import codec
from p2pfs.trust.desktop import DesktopToken, TokenRefused, check_pinned, client_context
from p2pfs.trust.tlsstream import TLSStream

from . import wire

log = logging.getLogger(__name__)

LINK_VERSION = 1
DEFAULT_PORT = 7421
AUTH_TIMEOUT = 10.0
FRAME_TIMEOUT = 30.0
MAX_READ = 4 * 1024 * 1024  # the largest read one request may ask for
RECEIVE_SIZE = 1024 * 1024
VMADDR_CID_ANY = 0xFFFFFFFF
T = TypeVar("T")


class ApplianceUnavailable(P2pfsError):
    """The appliance did not answer: down, unreachable, or too slow."""

    errno = errno_mod.EIO


class LinkError(P2pfsError):
    """The appliance answered with an error (its message, and the errno it maps to)."""

    def __init__(self, message: str, err: int = errno_mod.EIO) -> None:
        super().__init__(message)
        self.errno = err


# -- addresses and transports ---------------------------------------------------


@dataclass(frozen=True)
class Address:
    kind: str  # "tcp" or "vsock"
    host: str  # a host name or IP for tcp; the CID in decimal for vsock
    port: int

    def __str__(self) -> str:
        if self.kind == "vsock":
            return f"vsock:{self.host}:{self.port}"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    async def connect(self) -> trio.SocketStream:
        if self.kind == "tcp":
            return await trio.open_tcp_stream(self.host, self.port)
        sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            await sock.connect((int(self.host), self.port))
        except BaseException:
            sock.close()
            raise
        return trio.SocketStream(sock)

    async def listen(self) -> list[trio.SocketListener]:
        if self.kind == "tcp":
            return await trio.open_tcp_listeners(self.port, host=self.host, backlog=64)
        sock = trio.socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
        try:
            await sock.bind((int(self.host), self.port))
            sock.listen(64)
        except BaseException:
            sock.close()
            raise
        return [trio.SocketListener(sock)]


def parse_address(text: str, default_port: int = DEFAULT_PORT) -> Address:
    """``HOST:PORT``, ``tcp:HOST:PORT``, ``[V6]:PORT`` or ``vsock:CID:PORT`` (CID ``any`` to listen)."""
    t = text.strip()
    if t.startswith("vsock:"):
        parts = t.split(":")
        if len(parts) != 3 or not parts[2].isdigit():
            raise UsageError(f"{text!r} is not vsock:CID:PORT")
        cid = str(VMADDR_CID_ANY) if parts[1] == "any" else parts[1]
        if not cid.isdigit():
            raise UsageError(f"{text!r}: the vsock CID must be a number or 'any'")
        return Address("vsock", cid, _port(parts[2], text))
    t = t.removeprefix("tcp:")
    host, sep, port = t.rpartition(":")
    if not sep:
        host, port = t, str(default_port)
    host = host.strip("[]")
    if not host:
        raise UsageError(f"{text!r} is not HOST:PORT")
    return Address("tcp", host, _port(port, text))


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 0 <= int(text) < 65536:
        raise UsageError(f"{whole!r}: the port must be 0-65535")
    return int(text)


def vsock_unavailable() -> str | None:
    """Why AF_VSOCK cannot carry the link on this machine, or None if it can."""
    if not hasattr(socket, "AF_VSOCK"):
        return "this Python has no AF_VSOCK"
    try:
        s = socket.socket(socket.AF_VSOCK, socket.SOCK_STREAM)
    except OSError as e:
        return f"AF_VSOCK sockets cannot be made here: {e.strerror}"
    try:
        s.bind((VMADDR_CID_ANY, 0))
    except OSError as e:
        return f"cannot bind an AF_VSOCK socket: {e.strerror}"
    finally:
        s.close()
    return None


# -- frames ---------------------------------------------------------------------


class FrameReader:
    """Whole frames from a stream; a frame that has begun must finish within ``timeout``."""

    def __init__(self, stream: trio.abc.ReceiveStream, max_payload: int, timeout: float) -> None:
        self.stream = stream
        self.decoder = wire.Decoder(max_payload)
        self.timeout = timeout
        self._ready: list[tuple[dict[str, Any], bytes]] = []

    async def next(self) -> tuple[dict[str, Any], bytes] | None:
        """The next frame, or None at a clean end of stream. ProtocolError if malformed."""
        while not self._ready:
            deadline = trio.current_time() + self.timeout if self.decoder.buffered else math.inf
            with trio.move_on_at(deadline) as scope:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            if scope.cancelled_caught:
                raise wire.ProtocolError("a frame did not complete in time")
            if not data:
                if self.decoder.buffered:
                    raise wire.ProtocolError("the stream ended inside a frame")
                return None
            self._ready.extend(self.decoder.feed(data))
        return self._ready.pop(0)


def encode_result(result: Any, enc: str) -> bytes:
    if enc == "json":
        return json.dumps(result).encode()
    if enc == "msgpack":
        return codec.pack(result)
    raise ValueError(enc)


def decode_result(header: dict[str, Any], payload: bytes) -> Any:
    enc = header.get("enc", "raw")
    if enc == "raw":
        return payload
    try:
        if enc == "json":
            return json.loads(payload)
        if enc == "msgpack":
            return codec.unpack(payload, max_size=wire.MAX_PAYLOAD)
    except (ValueError, P2pfsError) as e:
        raise wire.ProtocolError(f"malformed {enc} answer: {e}") from None
    raise wire.ProtocolError(f"unknown answer encoding {enc!r}")


# -- the desktop's end ------------------------------------------------------------


@dataclass
class _Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    header: dict[str, Any] | None = None
    payload: bytes = b""


class LinkClient:
    """One authenticated connection to the appliance; run ``run()`` in a nursery."""

    def __init__(self, stream: TLSStream, reader: FrameReader, welcome: dict[str, Any]) -> None:
        self.stream = stream
        self.reader = reader
        self.welcome = welcome
        self.closed = trio.Event()
        self.close_reason = ""
        self._next_id = 1
        self._waiters: dict[int, _Waiter] = {}
        self._send_lock = trio.Lock()

    @classmethod
    async def connect(cls, address: Address, token: DesktopToken, *, within: float) -> LinkClient:
        """Connect, check the pinned certificate, present the token; all ``within`` seconds."""
        with trio.move_on_after(within):
            try:
                transport = await address.connect()
            except OSError as e:
                raise ApplianceUnavailable(
                    f"cannot reach the appliance at {address}: {e.strerror or e}"
                ) from None
            stream = TLSStream(transport, client_context(), server_side=False)
            try:
                await stream.do_handshake()
                check_pinned(stream.getpeercert(), token)
                hello = {
                    "t": "auth",
                    "v": LINK_VERSION,
                    "desktop": token.desktop,
                    "secret": token.secret,
                }
                await stream.send_all(wire.encode(hello))
                reader = FrameReader(stream, wire.MAX_PAYLOAD, FRAME_TIMEOUT)
                frame = await reader.next()
            except (trio.BrokenResourceError, trio.ClosedResourceError, wire.ProtocolError) as e:
                await _close(stream)
                raise ApplianceUnavailable(f"the appliance at {address} broke off: {e}") from None
            except BaseException:
                await _close(stream)
                raise
            if frame is None or frame[0].get("t") != "auth":
                await _close(stream)
                raise ApplianceUnavailable(f"the appliance at {address} closed the link")
            header = frame[0]
            if not header.get("ok"):
                await _close(stream)
                raise TokenRefused(str(header.get("error", "refused")))
            return cls(stream, reader, header)
        raise ApplianceUnavailable(f"the appliance at {address} did not answer within {within:g} s")

    async def run(self) -> None:
        """Route answers to their requests until the link ends; then fail what waits."""
        try:
            while True:
                try:
                    frame = await self.reader.next()
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    self.close_reason = f"the link broke: {e}"
                    return
                except wire.ProtocolError as e:
                    self.close_reason = f"the appliance broke the protocol: {e}"
                    return
                if frame is None:
                    self.close_reason = "the appliance closed the link"
                    return
                header, payload = frame
                rid = header.get("id")
                waiter = self._waiters.get(rid) if isinstance(rid, int) else None
                if header.get("t") == "ans" and waiter is not None and not waiter.done.is_set():
                    waiter.header, waiter.payload = header, payload
                    waiter.done.set()
        finally:
            self._close(self.close_reason or "closed")
            await _close(self.stream)

    def _close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = self.close_reason or reason
            self.closed.set()
            for w in self._waiters.values():
                w.done.set()

    async def request(self, op: str, *, within: float, **args: Any) -> Any:
        """The result of ``op``; LinkError if refused, ApplianceUnavailable past ``within`` s."""
        if self.closed.is_set():
            raise ApplianceUnavailable(f"the link to the appliance is down: {self.close_reason}")
        rid = self._next_id
        self._next_id += 1
        waiter = self._waiters[rid] = _Waiter()
        try:
            with trio.move_on_after(within):
                try:
                    async with self._send_lock:
                        await self.stream.send_all(
                            wire.encode({"t": "req", "id": rid, "op": op, **args})
                        )
                except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                    self._close(f"send failed: {e}")
                await waiter.done.wait()
        finally:
            del self._waiters[rid]
        header = waiter.header
        if header is None:
            if self.closed.is_set():
                raise ApplianceUnavailable(
                    f"the link to the appliance is down: {self.close_reason}"
                )
            raise ApplianceUnavailable(f"the appliance did not answer {op!r} within {within:g} s")
        if not header.get("ok"):
            err = header.get("errno")
            raise LinkError(
                str(header.get("error", "refused")),
                err if isinstance(err, int) and 0 < err < 4096 else errno_mod.EIO,
            )
        try:
            return decode_result(header, waiter.payload)
        except wire.ProtocolError as e:
            raise ApplianceUnavailable(str(e)) from None

    async def aclose(self) -> None:
        self._close("closed by us")
        await _close(self.stream)


async def _close(stream: trio.abc.AsyncResource) -> None:
    with (
        trio.CancelScope(shield=True),
        trio.move_on_after(1),
        contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError, OSError),
    ):
        await stream.aclose()


class ApplianceLink:
    """The desktop's link to its appliance: connects on demand, reconnects after a loss.

    Every call waits at most ``deadline`` seconds, reconnecting included: when the
    appliance is gone a caller gets ApplianceUnavailable (EIO), never a hang.
    """

    def __init__(
        self, address: Address, token: DesktopToken, deadline: float, nursery: trio.Nursery
    ) -> None:
        self.address = address
        self.token = token
        self.deadline = deadline
        self.nursery = nursery
        self.client: LinkClient | None = None
        self._lock = trio.Lock()
        self.reconnects = 0

    async def connect(self) -> LinkClient:
        client = self.client
        if client is not None and not client.closed.is_set():
            return client
        async with self._lock:
            client = self.client
            if client is not None and not client.closed.is_set():
                return client
            client = await LinkClient.connect(self.address, self.token, within=self.deadline)
            if self.client is not None:
                self.reconnects += 1
                log.info("reconnected to the appliance at %s", self.address)
            self.client = client
            self.nursery.start_soon(client.run)
            return client

    async def call(self, op: str, **args: Any) -> Any:
        with trio.move_on_after(self.deadline):
            client = await self.connect()
            return await client.request(op, within=self.deadline, **args)
        raise ApplianceUnavailable(
            f"the appliance at {self.address} did not answer {op!r} within {self.deadline:g} s"
        )

    async def aclose(self) -> None:
        if self.client is not None:
            await self.client.aclose()


async def with_link(
    address: Address,
    token: DesktopToken,
    deadline: float,
    fn: Callable[[ApplianceLink], Awaitable[T]],
) -> T:
    """``fn(link)`` on a fresh link, closed afterwards; a P2pfsError leaves as itself
    (not wrapped in the nursery's exception group)."""
    error: P2pfsError | None = None
    result: list[T] = []
    async with trio.open_nursery() as nursery:
        link = ApplianceLink(address, token, deadline, nursery)
        try:
            result.append(await fn(link))
        except P2pfsError as e:
            error = e
        finally:
            await link.aclose()
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    return result[0]
