"""The desktop's end of the desktop link: one authenticated connection to its appliance,
reconnected on demand, every call bounded by a deadline (``net/link.py`` describes the
link; its transports and frames live there, the request/answer core in ``net/rpc.py``).

The appliance may end a session itself, with a final ``{"t": "end", "error": ...}``
frame: today when the desktop's token was removed or replaced. Then every waiting and
later call fails (EIO) with "the appliance ended the session: ...", and the link does
not reconnect: the token it holds is no longer valid, and a new token file means a new
mount.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import trio

from p2pfs.errors import P2pfsError
from p2pfs.net import wire
from p2pfs.net.link import FRAME_TIMEOUT, LINK_VERSION, RECEIVE_SIZE, Address
from p2pfs.net.rpc import FrameReader, Pending
from p2pfs.objects import codec
from p2pfs.trust.desktop import DesktopToken, TokenRefused, check_pinned, client_context
from p2pfs.trust.tlsstream import TLSStream

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_END_REASON = 300  # characters of the appliance's reason kept


class ApplianceUnavailable(P2pfsError):
    """The appliance did not answer: down, unreachable, or too slow."""

    errno = errno_mod.EIO


class LinkError(P2pfsError):
    """The appliance answered with an error (its message, and the errno it maps to)."""

    def __init__(self, message: str, err: int = errno_mod.EIO) -> None:
        super().__init__(message)
        self.errno = err


def decode_result(header: dict[str, Any], payload: bytes) -> Any:
    enc = header.get("enc", "raw")
    if enc == "raw":
        return payload
    try:
        if enc == "json":
            return json.loads(payload)
        if enc == "msgpack":
            return codec.unpack(payload, max_size=wire.MAX_PAYLOAD)
    except (ValueError, P2pfsError, RecursionError) as e:  # Recursion: JSON nested too deeply
        raise wire.ProtocolError(f"malformed {enc} answer: {e}") from None
    raise wire.ProtocolError(f"unknown answer encoding {enc!r}")


class LinkClient:
    """One authenticated connection to the appliance; run ``run()`` in a nursery."""

    def __init__(self, stream: TLSStream, reader: FrameReader, welcome: dict[str, Any]) -> None:
        self.stream = stream
        self.reader = reader
        self.welcome = welcome
        self.closed = trio.Event()
        self.close_reason = ""
        self.ended: str | None = None  # the appliance ended the session: why
        self._pending = Pending()
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
                reader = FrameReader(stream, FRAME_TIMEOUT, receive_size=RECEIVE_SIZE)
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
                kind = frame[0].get("t")
                if kind == "ans":
                    self._pending.answered(frame[0].get("id"), frame)
                elif kind == "end":
                    why = str(frame[0].get("error") or "no reason given")[:MAX_END_REASON]
                    self.ended = self.close_reason = f"the appliance ended the session: {why}"
                    log.warning("%s", self.ended)
                    return
        finally:
            self._close(self.close_reason or "closed")
            await _close(self.stream)

    def _close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = self.close_reason or reason
            self.closed.set()
            self._pending.close()

    async def request(self, op: str, *, within: float, **args: Any) -> Any:
        """The result of ``op``; LinkError if refused, ApplianceUnavailable past ``within`` s."""
        if self.closed.is_set():
            raise ApplianceUnavailable(f"the link to the appliance is down: {self.close_reason}")
        with self._pending.request() as (rid, waiter), trio.move_on_after(within):
            try:
                async with self._send_lock:
                    await self.stream.send_all(
                        wire.encode({"t": "req", "id": rid, "op": op, **args})
                    )
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self._close(f"send failed: {e}")
            await waiter.done.wait()
        if waiter.answer is None:
            if self.closed.is_set():
                raise ApplianceUnavailable(
                    f"the link to the appliance is down: {self.close_reason}"
                )
            raise ApplianceUnavailable(f"the appliance did not answer {op!r} within {within:g} s")
        header, payload = waiter.answer
        if not header.get("ok"):
            err = header.get("errno")
            raise LinkError(
                str(header.get("error", "refused")),
                err if isinstance(err, int) and 0 < err < 4096 else errno_mod.EIO,
            )
        try:
            return decode_result(header, payload)
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
        self.ended: str | None = None  # the appliance ended our session: no reconnecting

    async def connect(self) -> LinkClient:
        client = self.client
        if client is not None and not client.closed.is_set():
            return client
        async with self._lock:
            client = self.client
            if client is not None and not client.closed.is_set():
                return client
            if client is not None and client.ended is not None:
                self.ended = client.ended
            if self.ended is not None:
                # The appliance ended it because our token went: connecting again with
                # that token would only be refused (and counted) at every call.
                raise ApplianceUnavailable(f"{self.ended} (a new token file is needed)")
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
