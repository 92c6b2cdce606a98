"""Frames on a peer connection, sans I/O: bytes in, (header, payload) out.

A frame is::

    u32 length of the rest | u16 header length | header (msgpack map) | payload (raw bytes)

Chunk bytes travel as the raw payload after a small header: wrapping them in
msgpack would copy them once more and halve throughput (DESIGN.md, performance
facts). Every size is bounded before anything is buffered, so a hostile peer
can make us hold at most one maximal frame per connection.
"""

from __future__ import annotations

import struct
from typing import Any

from p2pfs.errors import DecodeError, P2pfsError
from p2pfs.objects import codec
from p2pfs.objects.model import MAX_CHUNK_LENGTH, MAX_TREE_BYTES

MAX_HEADER = 64 * 1024
# The largest thing a frame carries: a chunk (64 MiB max size) or a tree object.
MAX_PAYLOAD = max(MAX_CHUNK_LENGTH, MAX_TREE_BYTES)
MAX_FRAME = 2 + MAX_HEADER + MAX_PAYLOAD

_LEN = struct.Struct(">IH")


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

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._need: int | None = None  # length of the frame being received, once known

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[dict[str, Any], bytes]]:
        self._buf += data
        frames: list[tuple[dict[str, Any], bytes]] = []
        while True:
            frame = self._next()
            if frame is None:
                return frames
            frames.append(frame)

    def _next(self) -> tuple[dict[str, Any], bytes] | None:
        if self._need is None:
            if len(self._buf) < 4:
                return None
            (length,) = struct.unpack_from(">I", self._buf)
            if length < 2 or length > 2 + MAX_HEADER + self.max_payload:
                raise ProtocolError(f"frame length {length} is out of bounds")
            self._need = length
        if len(self._buf) < 4 + self._need:
            return None
        length, head_len = _LEN.unpack_from(self._buf)
        if head_len > MAX_HEADER or head_len > length - 2:
            raise ProtocolError(f"frame header length {head_len} is out of bounds")
        view = memoryview(self._buf)
        try:
            try:
                header = codec.unpack(view[6 : 6 + head_len], max_size=MAX_HEADER, max_depth=4)
            except DecodeError as e:
                raise ProtocolError(f"malformed frame header: {e}") from None
            payload = bytes(view[6 + head_len : 4 + length])
        finally:
            view.release()
        del self._buf[: 4 + length]
        self._need = None
        if not isinstance(header, dict) or not isinstance(header.get("t"), str):
            raise ProtocolError("a frame header must be a map with a string 't'")
        return header, payload
