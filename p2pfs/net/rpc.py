"""The request/answer core both of our protocols share: the peer connections and the
desktop link.

- ``FrameReader``: whole frames (``wire.py``) from a stream. A frame that has begun
  must finish within its timeout (a trickling sender is cut off); between frames the
  reader waits freely. It also keeps ``progress_at``: when bytes of a frame that
  counts (``counts(header, has_payload)``: data somebody waits for) last arrived, so a request's deadline can be
  "no progress for so long" rather than "so long in all" (a slow link that moves
  bytes is not a dead one).
- ``Pending``: the requests of one connection waiting for their answers: an id for
  each, the answer routed to its waiter, every waiter woken when the connection
  ends, and an answer nobody waits for any more dropped.

Both are the trio side of the sans-IO ``wire.Decoder``; the protocols on top say what
a request and an answer look like.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import trio

from . import wire

RECEIVE_SIZE = 256 * 1024

Frame = tuple[dict[str, Any], bytes]


class FrameReader:
    """Whole frames from a stream; a frame that has begun must finish within ``timeout``."""

    def __init__(
        self,
        stream: trio.abc.ReceiveStream,
        timeout: float,
        *,
        decoder: wire.Decoder | None = None,
        receive_size: int = RECEIVE_SIZE,
        counts: Callable[[dict[str, Any], bool], bool] | None = None,
    ) -> None:
        self.stream = stream
        self.counts = counts
        self.decoder = decoder or wire.Decoder()
        self.timeout = timeout
        self.receive_size = receive_size
        self.bytes_in = 0
        self.frames_in = 0
        self.last_received = self.progress_at = trio.current_time()
        self._ready: list[Frame] = []

    async def next(self) -> Frame | None:
        """The next frame, or None at a clean end of stream.

        ProtocolError if malformed or cut off in time; the stream's own errors
        (BrokenResourceError, ClosedResourceError) pass through.
        """
        while not self._ready:
            deadline = trio.current_time() + self.timeout if self.decoder.buffered else math.inf
            with trio.move_on_at(deadline) as scope:
                data = await self.stream.receive_some(self.receive_size)
            if scope.cancelled_caught:
                raise wire.ProtocolError("a frame did not complete in time")
            if not data:
                if self.decoder.buffered:
                    raise wire.ProtocolError("the stream ended inside a frame")
                return None
            self.bytes_in += len(data)
            self.last_received = now = trio.current_time()
            frames = self.decoder.feed(data)
            if self.counts is not None:
                # (Judged before the frames are routed: their requests still wait.)
                current = self.decoder.current_header  # (unfinished: payload to come)
                if any(self.counts(h, bool(p)) for h, p in frames) or (
                    current is not None and self.counts(current, True)
                ):
                    self.progress_at = now
            self._ready.extend(frames)
        self.frames_in += 1
        return self._ready.pop(0)


@dataclass
class Waiter:
    done: trio.Event = field(default_factory=trio.Event)
    answer: Frame | None = None  # None: no answer (timed out, or the connection ended)


class Pending:
    """The requests of one connection that wait for their answers."""

    def __init__(self) -> None:
        self._next_id = 1
        self._waiters: dict[int, Waiter] = {}
        self.closed = False

    @contextlib.contextmanager
    def request(self) -> Iterator[tuple[int, Waiter]]:
        """A fresh request id and its waiter, forgotten on exit (a late answer is dropped)."""
        rid = self._next_id
        self._next_id += 1
        waiter = self._waiters[rid] = Waiter()
        if self.closed:
            waiter.done.set()
        try:
            yield rid, waiter
        finally:
            del self._waiters[rid]

    def waiting(self, rid: object) -> bool:
        """Whether a request with id ``rid`` still waits for its answer."""
        return isinstance(rid, int) and rid in self._waiters

    def issued(self, rid: object) -> bool:
        """Whether ``rid`` is an id this side gave a request (waiting or not)."""
        return isinstance(rid, int) and 0 < rid < self._next_id

    def any_waiting(self) -> bool:
        return bool(self._waiters)

    def answered(self, rid: object, frame: Frame) -> bool:
        """Route an answer to its waiter; False if nobody waits for ``rid`` (dropped)."""
        waiter = self._waiters.get(rid) if isinstance(rid, int) else None
        if waiter is None or waiter.done.is_set():
            return False
        waiter.answer = frame
        waiter.done.set()
        return True

    def close(self) -> None:
        """The connection ended: every waiter wakes without an answer."""
        self.closed = True
        for waiter in self._waiters.values():
            waiter.done.set()
