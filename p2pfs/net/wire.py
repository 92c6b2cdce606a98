"""Frames on a peer connection, sans I/O: bytes in, (header, payload) out.

A frame is::

    u32 length of the rest | u16 header length | header (msgpack map) | payload (raw bytes)

Chunk bytes travel as the raw payload after a small header: wrapping them in
msgpack would copy them once more and halve throughput (DESIGN.md, performance
facts). Every size is bounded before anything is buffered, so a hostile peer
can make us hold at most one maximal frame per connection.

The header is decoded as soon as it is in, before the payload: a ``payload_limit``
policy then says how much payload that kind of frame may carry (a request carries
none, so a peer cannot park 64 MiB in our memory behind a ``get``), or that the
payload is to be skipped unread (``DISCARD``: an answer nobody waits for any more).
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any

from p2pfs.errors import DecodeError, P2pfsError
from p2pfs.objects import codec
from p2pfs.objects.model import MAX_CHUNK_LENGTH, MAX_TREE_BYTES

MAX_HEADER = 64 * 1024
# The largest thing a frame carries: a chunk (64 MiB max size) or a tree object.
MAX_PAYLOAD = max(MAX_CHUNK_LENGTH, MAX_TREE_BYTES)
MAX_FRAME = 2 + MAX_HEADER + MAX_PAYLOAD

_LEN = struct.Struct(">IH")

# A payload_limit answer: drop this frame's payload as it arrives, buffering none of it.
DISCARD = -1
PayloadLimit = Callable[[dict[str, Any]], int]


class ProtocolError(P2pfsError):
    """The peer broke the protocol: the connection is closed, nothing else is affected."""


def encode(header: dict[str, Any], payload: bytes | memoryview = b"") -> bytes:
    head = codec.pack(header)
    if len(head) > MAX_HEADER:
        raise ValueError(f"frame header of {len(head)} bytes exceeds {MAX_HEADER}")
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    return b"".join((_LEN.pack(2 + len(head) + len(payload), len(head)), head, payload))


class Decoder:
    """Accumulates received bytes and yields complete frames."""

    def __init__(
        self, max_payload: int = MAX_PAYLOAD, payload_limit: PayloadLimit | None = None
    ) -> None:
        self.max_payload = max_payload
        self.payload_limit = payload_limit
        self._buf = bytearray()
        self._need: int | None = None  # length of the frame being received, once known
        self._header: dict[str, Any] | None = None  # its header, once decoded
        self._skip = 0  # payload bytes still to drop unread (DISCARD)

    @property
    def current_header(self) -> dict[str, Any] | None:
        """The header of the frame being received, once decoded (None between frames)."""
        return self._header

    @property
    def buffered(self) -> int:
        """Bytes of a frame begun but not finished (dropped ones included)."""
        return len(self._buf) + self._skip

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[dict[str, Any], bytes]]:
        frames: list[tuple[dict[str, Any], bytes]] = []
        view = memoryview(data)
        if self._skip:
            n = min(self._skip, len(view))
            self._skip -= n
            view = view[n:]
            if not self._skip:
                assert self._header is not None
                frames.append((self._header, b""))
                self._header = None
        self._buf += view
        while True:
            frame = self._next()
            if frame is None:
                break
            frames.append(frame)
        if not self._buf and self._need is None:
            self._buf = bytearray()  # give back what a large frame made it grow to
        return frames

    def _next(self) -> tuple[dict[str, Any], bytes] | None:
        if self._skip:
            return None
        if self._need is None:
            if len(self._buf) < 4:
                return None
            (length,) = struct.unpack_from(">I", self._buf)
            if length < 2 or length > 2 + MAX_HEADER + self.max_payload:
                raise ProtocolError(f"frame length {length} is out of bounds")
            self._need = length
        length = self._need
        if self._header is None:
            if len(self._buf) < 6:
                return None
            (head_len,) = struct.unpack_from(">H", self._buf, 4)
            if head_len > MAX_HEADER or head_len > length - 2:
                raise ProtocolError(f"frame header length {head_len} is out of bounds")
            if len(self._buf) < 6 + head_len:
                return None
            self._header = self._decode_header(head_len)
            limit = self.payload_limit(self._header) if self.payload_limit else self.max_payload
            size = length - 2 - head_len
            if limit == DISCARD and size:
                # Keep only the header; what of the payload is here is dropped now.
                here = min(size, len(self._buf) - 6 - head_len)
                del self._buf[: 6 + head_len + here]
                self._skip = size - here
                if self._skip:
                    self._need = None
                    return None
                return self._done(b"", 0)
            if size > max(limit, 0):
                raise ProtocolError(
                    f"a {str(self._header['t'])[:32]!r} frame carries {size} payload bytes; "
                    f"it may carry {max(limit, 0)}"
                )
        if len(self._buf) < 4 + length:
            return None
        (head_len,) = struct.unpack_from(">H", self._buf, 4)
        with memoryview(self._buf) as view:
            payload = bytes(view[6 + head_len : 4 + length])
        return self._done(payload, 4 + length)

    def _done(self, payload: bytes, consumed: int) -> tuple[dict[str, Any], bytes]:
        header = self._header
        assert header is not None
        del self._buf[:consumed]
        self._need = None
        self._header = None
        return header, payload

    def _decode_header(self, head_len: int) -> dict[str, Any]:
        view = memoryview(self._buf)
        try:
            header = codec.unpack(view[6 : 6 + head_len], max_size=MAX_HEADER, max_depth=4)
        except DecodeError as e:
            raise ProtocolError(f"malformed frame header: {e}") from None
        finally:
            view.release()
        if not isinstance(header, dict) or not isinstance(header.get("t"), str):
            raise ProtocolError("a frame header must be a map with a string 't'")
        return header
