"""One authenticated connection to a peer: many requests in flight, both ways.

Either side may send requests (they carry an id; the answer repeats it) and
one-way notices. A reader task decodes frames and routes answers to their
waiting requests and requests to the handler, each in its own task, bounded by
``max_inflight`` so a peer cannot make us run unbounded work. Every wait is
timed out: a frame that has started must finish within ``frame_timeout`` (a
trickling sender is cut off), and a request without an answer within its
timeout fails without harming the connection.

A request's deadline counts silence, not time: it fails once no byte of any answer
this side waits for has arrived on the connection for ``within`` seconds. A slow or
congested link that keeps moving bytes delivers them however long they take; a
silent one fails as fast as before.

Frames go out one at a time, urgent ones first: requests, notices and the answers
to requests marked urgent (the chunk an application is blocked on) pass answers
queued for readahead, so a reader waiting on one chunk does not wait behind a
window of chunks it asked for ahead. Small urgent frames queued together leave in one
write (COMBINE_BYTES).

Any protocol violation closes this connection only (and ``broke_protocol`` says
so, for the node to back the peer off).

What a frame may carry is decided from its header before its payload is read: a
request or a notice carries none (a digest its Bloom filter), an answer a chunk only
while its request still waits; the payload of a late answer is skipped unread. So a
peer can make this connection buffer at most what we asked it for.
"""

from __future__ import annotations

import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import trio

from p2pfs.errors import P2pfsError

from . import messages, wire
from .rpc import FrameReader, Pending

log = logging.getLogger(__name__)

FRAME_TIMEOUT = 30.0
# Urgent frames this small (requests, pings, notices, short answers) sent while the
# queue is busy, or in the same scheduling round, go out in one write: a readahead asks
# for several chunks at once, and on a busy link each write is a system call and a
# packet the peer wakes for. Bulk chunk answers are far larger and go alone.
COMBINE_BYTES = 16 * 1024


class PeerUnavailable(P2pfsError):
    """The peer did not answer (closed, timed out, or refused)."""


Answer = tuple[dict[str, Any], bytes]
RequestHandler = Callable[["Connection", dict[str, Any], bytes], Awaitable[Answer]]
NoticeHandler = Callable[["Connection", dict[str, Any], bytes], Awaitable[None]]


@dataclass(frozen=True)
class ConnectionStats:
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int


class SendQueue:
    """A lock handed over in priority order: urgent holders first, then FIFO."""

    def __init__(self) -> None:
        self._busy = False
        self._waiting: tuple[deque[trio.Event], deque[trio.Event]] = (deque(), deque())

    @contextlib.asynccontextmanager
    async def hold(self, urgent: bool) -> AsyncIterator[None]:
        if self._busy or self._waiting[0] or self._waiting[1]:
            turn = trio.Event()
            queue = self._waiting[0 if urgent else 1]
            queue.append(turn)
            try:
                await turn.wait()
            except BaseException:
                if turn.is_set():
                    self._release()  # handed over as we were cancelled: pass it on
                else:
                    queue.remove(turn)
                raise
        else:
            self._busy = True
            await trio.lowlevel.checkpoint()
        try:
            yield
        finally:
            self._release()

    def _release(self) -> None:
        for queue in self._waiting:
            if queue:
                queue.popleft().set()  # ownership passes straight on: _busy stays
                return
        self._busy = False


class _Batch:
    """Small urgent frames that leave in one write (see Connection._send_combined)."""

    __slots__ = ("changed", "done", "error", "frames", "led", "taken")

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.led = False  # a member waits for the send queue on the batch's behalf
        self.taken = False  # its leader holds the queue: no frame joins or leaves now
        self.done = False
        self.error: PeerUnavailable | None = None
        self.changed = trio.Event()

    def wake(self) -> None:
        changed, self.changed = self.changed, trio.Event()
        changed.set()

    def withdraw(self, frame: bytes, conn: Connection) -> None:
        if self.taken:
            return  # it leaves (or left) with the others
        for i, f in enumerate(self.frames):
            if f is frame:
                del self.frames[i]
                break
        if not self.frames and conn._batch is self:
            conn._batch = None


class Connection:
    def __init__(
        self,
        stream: trio.abc.Stream,
        peer_id: bytes,
        *,
        on_request: RequestHandler,
        on_notice: NoticeHandler,
        max_inflight: int = 64,
        frame_timeout: float = FRAME_TIMEOUT,
        decoder: wire.Decoder | None = None,
    ) -> None:
        self.stream = stream
        self.peer_id = peer_id
        self.on_request = on_request
        self.on_notice = on_notice
        self.frame_timeout = frame_timeout
        self.reader = FrameReader(
            stream,
            frame_timeout,
            decoder=decoder or wire.Decoder(payload_limit=self._payload_limit),
            counts=self._counts,
        )
        self.closed = trio.Event()
        self.ready = trio.Event()  # set once the peer's hello was accepted
        self.close_reason = ""
        self.broke_protocol = False
        self._send_queue = SendQueue()
        self._batch: _Batch | None = None  # small urgent frames waiting to go out together
        self.sending = 0  # sends under way (blocked on a full socket buffer, perhaps)
        self._pending = Pending()
        self._frames_out = self._bytes_out = 0
        self._slots = trio.Semaphore(max_inflight)
        self._nursery: trio.Nursery | None = None

    def _payload_limit(self, header: dict[str, Any]) -> int:
        kind = header["t"]
        if kind == messages.ANSWER:
            return wire.MAX_PAYLOAD if self._pending.waiting(header.get("id")) else wire.DISCARD
        if kind == "digest":
            return messages.MAX_DIGEST_BYTES
        return 0

    def _counts(self, header: dict[str, Any], has_payload: bool) -> bool:
        # Progress is data answering us while a request waits (or a home's word that
        # it is coming): not a refusal, not a pong, which a peer stuck on our request
        # could send forever. The answer to a request given up on counts too: our
        # next answer is queued behind it on the same link.
        return (
            header["t"] == messages.ANSWER
            and (has_payload or messages.is_progress(header))
            and self._pending.issued(header.get("id"))
            and self._pending.any_waiting()
        )

    @property
    def last_received(self) -> float:
        return self.reader.last_received

    @property
    def progress_at(self) -> float:
        """When bytes of an answer we wait for last arrived (see ``request``)."""
        return self.reader.progress_at

    def statistics(self) -> ConnectionStats:
        r = self.reader
        return ConnectionStats(r.frames_in, self._frames_out, r.bytes_in, self._bytes_out)

    # -- sending --------------------------------------------------------------

    async def send(
        self, header: dict[str, Any], payload: bytes | memoryview = b"", *, urgent: bool = True
    ) -> None:
        """One frame; ``urgent=False`` (bulk answers) lets urgent frames go first."""
        frame = wire.encode(header, payload)
        if self.closed.is_set():
            raise PeerUnavailable(f"connection to {self.peer_id.hex()} is closed")
        if urgent and len(frame) <= COMBINE_BYTES:
            await self._send_combined(frame)
            return
        async with self._send_queue.hold(urgent):
            await self._transmit(frame, 1)

    async def _send_combined(self, frame: bytes) -> None:
        """Send a small urgent frame with the others queued meanwhile, in one write.

        The first of a batch waits for the send queue; frames sent until it gets its
        turn join the batch. A sender cancelled before the batch left takes its frame
        back out (and, if it led, hands the lead to another member).
        """
        batch = self._batch
        if batch is None:
            batch = self._batch = _Batch()
        batch.frames.append(frame)
        while not batch.done:
            if not batch.led:
                await self._lead(batch, frame)
                return
            changed = batch.changed
            try:
                await changed.wait()
            except BaseException:
                batch.withdraw(frame, self)
                raise
        if batch.error is not None:
            raise PeerUnavailable(str(batch.error))

    async def _lead(self, batch: _Batch, frame: bytes) -> None:
        batch.led = True
        try:
            async with self._send_queue.hold(True):
                # Ours now: later frames start the next batch.
                if self._batch is batch:
                    self._batch = None
                batch.taken = True
                await self._transmit(b"".join(batch.frames), len(batch.frames))
        except PeerUnavailable as e:
            batch.error = e
            raise
        except BaseException:
            if not batch.taken:
                batch.led = False
                batch.withdraw(frame, self)
            raise
        finally:
            if batch.taken:
                batch.done = True
            batch.wake()

    async def _transmit(self, data: bytes, frames: int) -> None:
        """Write ``data`` (whole frames) while holding the send queue."""
        self.sending += 1
        try:
            # A frame once begun is finished even if its sender is cancelled (a hedged
            # request that lost its race): half a frame would break the stream for
            # everyone. A frame that cannot leave in time closes it.
            with trio.CancelScope(shield=True), trio.move_on_after(self.frame_timeout) as sent:
                await self.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
            self._close(f"send failed: {e}")
            raise PeerUnavailable(f"connection to {self.peer_id.hex()} broke") from None
        finally:
            self.sending -= 1
        if sent.cancelled_caught:
            self._abort(f"a frame could not be sent within {self.frame_timeout:g} s")
            raise PeerUnavailable(f"connection to {self.peer_id.hex()} is stuck")
        self._frames_out += frames
        self._bytes_out += len(data)

    async def request(
        self, header: dict[str, Any], *, within: float, payload: bytes = b""
    ) -> Answer:
        """Send a request and wait for its answer.

        PeerUnavailable once no byte of any answer we wait for on this connection has
        arrived for ``within`` seconds (counted from the request at the earliest).
        """
        with self._pending.request() as (rid, waiter):
            start = trio.current_time()
            with trio.move_on_after(within) as queued:
                await self.send({**header, "id": rid}, payload)
            if queued.cancelled_caught:  # never sent: no answer can come
                raise PeerUnavailable(
                    f"{header['t']} to {self.peer_id.hex()} could not be sent within {within:.1f} s"
                )
            while not waiter.done.is_set():
                quiet_until = max(start, self.progress_at) + within
                if trio.current_time() >= quiet_until:
                    break
                with trio.move_on_at(quiet_until):
                    await waiter.done.wait()  # set by the answer, or by the connection closing
        if waiter.answer is None:
            if self.closed.is_set():
                raise PeerUnavailable(
                    f"connection to {self.peer_id.hex()} closed: {self.close_reason}"
                )
            raise PeerUnavailable(
                f"{header['t']} to {self.peer_id.hex()} got no answer: nothing came for {within:.1f} s"
            )
        return waiter.answer

    # -- receiving ------------------------------------------------------------

    async def run(self) -> None:
        """Read frames until the peer leaves or breaks the protocol; then close."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                try:
                    await self._read_loop(nursery)
                finally:
                    nursery.cancel_scope.cancel()
        finally:
            self._close(self.close_reason or "closed")
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.stream.aclose()

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        while True:
            try:
                frame = await self.reader.next()
            except (trio.BrokenResourceError, trio.ClosedResourceError) as e:
                self.close_reason = f"receive failed: {e}"
                return
            except wire.ProtocolError as e:
                self.close_reason = str(e)
                self.broke_protocol = True
                log.warning("peer %s: %s; closing", self.peer_id.hex(), e)
                return
            if frame is None:
                self.close_reason = "peer closed the connection"
                return
            try:
                await self._dispatch(nursery, *frame)
            except wire.ProtocolError as e:
                self.close_reason = str(e)
                self.broke_protocol = True
                log.warning("peer %s: %s; closing", self.peer_id.hex(), e)
                return

    async def _dispatch(
        self, nursery: trio.Nursery, header: dict[str, Any], payload: bytes
    ) -> None:
        kind = header["t"]
        if kind == messages.ANSWER:
            if messages.is_progress(header):
                if payload:
                    raise wire.ProtocolError("an interim answer carries a payload")
                return  # it counted as progress (FrameReader); the answer is still to come
            # (An answer to a request we gave up on is dropped.)
            self._pending.answered(messages.request_id(header), (header, payload))
            return
        if kind in messages.REQUESTS:
            rid = messages.request_id(header)
            await self._slots.acquire()  # backpressure: stop reading while at the limit
            nursery.start_soon(self._serve_request, rid, header, payload)
            return
        if kind in messages.NOTICES:
            await self._slots.acquire()
            nursery.start_soon(self._serve_notice, header, payload)
            return
        raise wire.ProtocolError(f"unknown message type {kind!r}")

    async def _serve_request(self, rid: int, header: dict[str, Any], payload: bytes) -> None:
        try:
            try:
                answer, body = await self.on_request(self, header, payload)
            except wire.ProtocolError as e:
                self.close_reason = str(e)
                self.broke_protocol = True
                log.warning("peer %s: %s; closing", self.peer_id.hex(), e)
                await self.aclose()
                return
            except P2pfsError as e:
                answer, body = messages.answer(rid, error=str(e)), b""
            answer = {**answer, "t": messages.ANSWER, "id": rid}
            # Bulk waits behind urgent frames, unless its asker is blocked on it.
            urgent = not body or header.get("u") is True
            with contextlib.suppress(PeerUnavailable):
                await self.send(answer, body, urgent=urgent)
        finally:
            self._slots.release()

    async def _serve_notice(self, header: dict[str, Any], payload: bytes) -> None:
        try:
            await self.on_notice(self, header, payload)
        except wire.ProtocolError as e:
            self.close_reason = str(e)
            self.broke_protocol = True
            log.warning("peer %s: %s; closing", self.peer_id.hex(), e)
            await self.aclose()
        except P2pfsError as e:
            log.info("peer %s: notice %s refused: %s", self.peer_id.hex(), header["t"], e)
        finally:
            self._slots.release()

    # -- closing --------------------------------------------------------------

    def _close(self, reason: str) -> None:
        if not self.closed.is_set():
            self.close_reason = self.close_reason or reason
            self.closed.set()
            self._pending.close()

    def _abort(self, reason: str) -> None:
        self._close(reason)
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()

    async def aclose(self) -> None:
        self._close("closed by us")
        if self._nursery is not None:
            self._nursery.cancel_scope.cancel()
        else:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await self.stream.aclose()
