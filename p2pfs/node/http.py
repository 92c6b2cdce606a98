"""A small HTTP/1.1 server on trio, for the metrics endpoint and the estate view.

Both answer a handful of GET requests from one trusted tool (a scraper, a browser on
the admin's desk), so this is deliberately small: one request per connection, a
bounded request head, a deadline on the whole exchange, no request bodies. Served as
trio tasks, a handler runs on the event loop and may read the node's state without
locks.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from urllib.parse import parse_qs, unquote, urlsplit

import trio

from p2pfs.errors import Busy

log = logging.getLogger(__name__)

REQUEST_LIMIT = 8192  # bytes of a request line and headers; a browser sends under 2 KiB
REQUEST_TIMEOUT_S = 10.0
MAX_HEADERS = 64


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]  # names lower-cased; the last of repeated ones


@dataclass(frozen=True)
class Response:
    status: str  # "200 OK"
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def encode(self, *, head_only: bool = False) -> bytes:
        lines = [
            f"HTTP/1.1 {self.status}",
            f"Content-Type: {self.content_type}",
            f"Content-Length: {len(self.body)}",
            "Connection: close",
            *(f"{k}: {v}" for k, v in self.headers),
        ]
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        return head if head_only else head + self.body


def text(status: str, message: str) -> Response:
    return Response(status, f"{message}\n".encode())


Handler = Callable[[Request], Awaitable[Response]]


def parse_head(data: bytes) -> Request | Response:
    """The request a head (up to its blank line) makes, or the error answer to it."""
    lines = data.replace(b"\r\n", b"\n").split(b"\n")
    parts = lines[0].decode("latin-1").split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        return text("400 Bad Request", "not an HTTP/1 request")
    method, target = parts[0], parts[1]
    if method not in ("GET", "HEAD"):
        return text("405 Method Not Allowed", "only GET")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            break
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            return text("400 Bad Request", "malformed header line")
        headers[name.lower()] = value.strip()
        if len(headers) > MAX_HEADERS:
            return text("431 Request Header Fields Too Large", "too many headers")
    try:
        url = urlsplit(target)
        query = {k: v[-1] for k, v in parse_qs(url.query, max_num_fields=32).items()}
    except ValueError as e:  # too many fields, a bad port, a stray bracket
        return text("400 Bad Request", f"bad request target: {e}")
    return Request(method, unquote(url.path) or "/", query, headers)


class HttpServer:
    """One handler behind one or more listeners of a TCP address."""

    def __init__(
        self, address: tuple[str, int], handler: Handler, *, what: str, setting: str
    ) -> None:
        self.address = address
        self.handler = handler
        self.what = what  # the server and where its address was set, for errors
        self.setting = setting
        self.listeners: list[trio.SocketListener] = []

    @property
    def port(self) -> int:
        """The port bound (the one asked for, or the kernel's choice for port 0)."""
        return int(self.listeners[0].socket.getsockname()[1])

    async def listen(self) -> None:
        """Bind now, so that a bad or busy address is a clear start-up error."""
        host, port = self.address
        try:
            self.listeners = await trio.open_tcp_listeners(port, host=host)
        except OSError as e:
            raise Busy(
                f"cannot serve {self.what} on {host}:{port} ({self.setting}): {e.strerror or e}"
            ) from None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        assert self.listeners, "listen() first"
        async with trio.open_nursery() as nursery:
            for listener in self.listeners:
                nursery.start_soon(trio.serve_listeners, self._handle, [listener])
            task_status.started()

    async def _handle(self, stream: trio.SocketStream) -> None:
        async with stream:
            try:
                with trio.move_on_after(REQUEST_TIMEOUT_S):
                    answer = await self._answer(stream)
                    await stream.send_all(answer)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass  # the client went away

    async def _answer(self, stream: trio.SocketStream) -> bytes:
        data = b""
        while b"\r\n\r\n" not in data and b"\n\n" not in data:
            if len(data) > REQUEST_LIMIT:
                return text("431 Request Header Fields Too Large", "request too long").encode()
            chunk = await stream.receive_some(4096)
            if not chunk:
                return b""
            data += chunk
        request = parse_head(data)
        if isinstance(request, Response):
            return request.encode()
        try:
            response = await self.handler(request)
        except Exception:  # a bug here must not end the daemon that serves metrics
            log.exception("%s: %s %s failed", self.what, request.method, request.path)
            response = text("500 Internal Server Error", "internal error (see the log)")
        return response.encode(head_only=request.method == "HEAD")
