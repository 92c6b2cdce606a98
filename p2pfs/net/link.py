"""The desktop link (appliance mode): its transports, frames and answers (the desktop's
end: ``appliance/link_client.py``; the appliance's: ``node/desktop_api.py``).

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

import json
import logging
import socket
from dataclasses import dataclass
from typing import Any

import trio

from p2pfs.errors import UsageError
from p2pfs.objects import codec

log = logging.getLogger(__name__)

LINK_VERSION = 1
DEFAULT_PORT = 7421
AUTH_TIMEOUT = 10.0
FRAME_TIMEOUT = 30.0
MAX_READ = 4 * 1024 * 1024  # the largest read one request may ask for
RECEIVE_SIZE = 1024 * 1024
VMADDR_CID_ANY = 0xFFFFFFFF


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
        # isdecimal, not isdigit: "²" is a digit that int() refuses (ValueError).
        if len(parts) != 3 or not parts[2].isdecimal():
            raise UsageError(f"{text!r} is not vsock:CID:PORT")
        cid = str(VMADDR_CID_ANY) if parts[1] == "any" else parts[1]
        if not (cid.isascii() and cid.isdecimal()):  # the CID goes to int() on connect
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
    if not text.isdecimal() or not 0 <= int(text) < 65536:
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


def encode_result(result: Any, enc: str) -> bytes:
    if enc == "json":
        return json.dumps(result).encode()
    if enc == "msgpack":
        return codec.pack(result)
    raise ValueError(enc)
