"""``p2pfs web``: the estate view over HTTP, read-only, from a running daemon.

The server is its own process; each request asks the daemon (its control socket, the
admin face) for the estate as ``EstateWatch.view`` builds it, and renders it. It binds
to loopback unless told otherwise; on any other address it requires an admin token
(a file only the admin reads), given as ``Authorization: Bearer TOKEN`` or once as
``?token=TOKEN``, which sets a cookie. Without a token it answers only requests whose
``Host`` is loopback, so a web page elsewhere cannot read it through DNS rebinding.
"""

from __future__ import annotations

import functools
import hmac
import json
import logging
from html import escape
from pathlib import Path
from typing import Any

import trio

from p2pfs.config import is_loopback
from p2pfs.errors import NotRunning, P2pfsError, UsageError
from p2pfs.fsutil import read_bounded

from . import control
from .http import HttpServer, Request, Response, text
from .web_page import render

log = logging.getLogger(__name__)

DEFAULT_LISTEN = "127.0.0.1:9743"
COOKIE = "p2pfs_token"
VIEW_TIMEOUT_S = 10.0
MIN_TOKEN = 16
_HEADERS = (
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'; img-src data:"),
)


def read_token(path: Path) -> str:
    token = read_bounded(path, 4096, "the web token file").decode(errors="replace").strip()
    if len(token) < MIN_TOKEN or not token.isprintable() or " " in token:
        raise UsageError(
            f"{path}: the web token must be one word of at least {MIN_TOKEN} characters "
            "(make one with: openssl rand -hex 32)"
        )
    return token


def _cookie(header: str) -> str | None:
    for part in header.split(";"):
        name, _, value = part.strip().partition("=")
        if name == COOKIE:
            return value
    return None


class WebView:
    """The estate view of the daemon whose control socket is ``socket_path``."""

    def __init__(
        self, socket_path: Path, address: tuple[str, int], *, token: str | None = None
    ) -> None:
        host = address[0]
        if token is None and not is_loopback(host):
            raise UsageError(
                f"p2pfs web --listen {host}: an address other than loopback needs "
                "--token-file (the view shows every node and volume of the estate)"
            )
        self.socket_path = socket_path
        self.token = token
        self.http = HttpServer(address, self.answer, what="the estate view", setting="--listen")
        self.requests = 0

    def _allowed(self, request: Request) -> bool:
        if self.token is None:
            host = request.headers.get("host", "")
            name = host.rsplit(":", 1)[0] if not host.startswith("[") else host[1:].split("]")[0]
            return is_loopback(name)
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        given = given or _cookie(request.headers.get("cookie", "")) or ""
        return hmac.compare_digest(given.encode(), self.token.encode())

    async def _view(self) -> dict[str, Any]:
        call = functools.partial(control.call, self.socket_path, "estate", timeout=VIEW_TIMEOUT_S)
        result: dict[str, Any] = await trio.to_thread.run_sync(call)
        return result

    async def answer(self, request: Request) -> Response:
        self.requests += 1
        token = request.query.get("token")
        if self.token is not None and token is not None:
            if not hmac.compare_digest(token.encode(), self.token.encode()):
                return text("403 Forbidden", "wrong token")
            cookie = f"{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/"
            return Response(
                "303 See Other",
                b"",
                headers=(("Location", _local(request.path)), ("Set-Cookie", cookie)),
            )
        if not self._allowed(request):
            return text("403 Forbidden", "this view needs the admin's token")
        if request.path not in ("/", "/estate.json"):
            return text("404 Not Found", "the estate view is at / (and /estate.json)")
        try:
            view = await self._view()
        except P2pfsError as e:
            if not isinstance(e, NotRunning):  # a daemon not (yet) running is no news
                log.warning("estate view: %s", e)
            return Response("503 Service Unavailable", _page_error(str(e)), "text/html", _HEADERS)
        if request.path == "/estate.json":
            body = json.dumps(view, indent=1, sort_keys=True).encode()
            return Response("200 OK", body, "application/json", _HEADERS)
        return Response("200 OK", render(view).encode(), "text/html; charset=utf-8", _HEADERS)


def _local(path: str) -> str:
    """Only our own pages: "//elsewhere" would send the browser to another host."""
    return path if path in ("/", "/estate.json") else "/"


def _page_error(message: str) -> bytes:
    return (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        '<meta http-equiv="refresh" content="5"><link rel="icon" href="data:,">'
        f"<title>p2pfs estate: no daemon</title></head><body><h1>No estate view</h1>"
        f"<p id='error'>{escape(message)}</p><p>This page retries every 5 s.</p></body></html>"
    ).encode()
