"""The appliance's desktop face: the user API served over the host-only link.

In appliance mode (DESIGN.md, Trust) the daemon, store and keys live in a VM; a
desktop reads the volumes through a thin FUSE client (``appliance/thin_fs.py``) that speaks
only this API. Every connection is TLS 1.3 with the appliance's link certificate
(pinned by the client) and is authenticated by a per-desktop token before any
request is read (``trust/desktop.py``). Then it serves exactly:

- files: ``stat``, ``list``, ``open`` and ``read`` of paths under the volumes
  (``VOLUME/dir/file``, never ``..``; no object or chunk is addressable by id),
  and ``statfs``;
- the daemon's user operations ``status``, ``peers``, ``pins`` and ``log``;
  ``pin``, ``pin-status``, ``pin-cancel`` and ``unpin`` only when
  ``[appliance] desktop_pin = true``.

Every admin operation (the control socket's admin face, and what the admin does
with the command line: import, approve, revoke, token add, ...) is answered with
"refused: admin operation over the desktop link"; anything else is unknown.

``open`` answers the file's blob id and a *read handle*: a keyed BLAKE3 MAC of
(desktop, blob id) under ``HOME/appliance/handles.key``. ``read`` takes both, so
a desktop reads exactly the blobs it reached through a path, survives a restart
of the appliance without state, and cannot read anything by guessing ids.

Frames are bounded (a desktop's requests carry no payload, headers at most 64
KiB), a started frame must finish within ``frame_timeout_s``, the token must come
within AUTH_TIMEOUT, and at most MAX_INFLIGHT requests per connection run at once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hmac
import logging
import os
from bisect import bisect_left
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import trio

from p2pfs.errors import P2pfsError
from p2pfs.fs.vfs import Head
from p2pfs.home import Home
from p2pfs.ids import keyed
from p2pfs.net import wire
from p2pfs.net.link import (
    AUTH_TIMEOUT,
    LINK_VERSION,
    MAX_READ,
    RECEIVE_SIZE,
    Address,
    encode_result,
)
from p2pfs.net.rpc import FrameReader
from p2pfs.objects.model import Entry, Kind
from p2pfs.trust.desktop import ApplianceKeys, TokenRefused
from p2pfs.trust.tlsstream import TLSStream
from p2pfs.volume.content import SEQUENTIAL_SLACK, Content, read_ahead, read_span

from .control import ControlServer

log = logging.getLogger(__name__)

MAX_INFLIGHT = 32
MAX_PATH = 4096
READAHEAD_CHUNKS = 16  # chunks read ahead of a desktop reading sequentially

ADMIN_REFUSED = "refused: admin operation over the desktop link"
# What the admin does on the appliance's management channel: the control socket's
# admin face plus what the command line does locally. Named so that a desktop asking
# for one learns it is an admin operation, not merely unknown.
ADMIN_OPERATIONS = frozenset(
    {
        "reload",
        "commit",
        "stop",
        "fsck",
        "inject-fault",
        "import",
        "volume-create",
        "publish",
        "evict",
        "config",
        "init",
        "estate-init",
        "request-join",
        "approve",
        "join",
        "enrol",
        "revoke",
        "endorse",
        "token-add",
        "token-remove",
        "token-list",
        "scrub",
    }
)
INFO_OPERATIONS = ("status", "peers", "pins", "log")
PIN_OPERATIONS = ("pin", "pin-status", "pin-cancel", "unpin")
FILE_OPERATIONS = ("stat", "list", "open", "read", "statfs")
_KIND = {Kind.FILE: "file", Kind.DIR: "dir", Kind.SYMLINK: "symlink"}
_HANDLE_DOMAIN = b"p2pfs-read-handle-v1\0"


class Refused(P2pfsError):
    errno = errno.EACCES


class BadPath(P2pfsError):
    errno = errno.ENOENT


class NotADirectory(P2pfsError):
    errno = errno.ENOTDIR


@dataclass
class _LinkCounts:
    connections: int = 0
    active: int = 0
    refused_tokens: int = 0
    refused_admin: int = 0
    requests: int = 0
    bytes_read: int = 0


@dataclass(frozen=True)
class LinkStats:
    """The desktop link as status shows it (``desktop_link``)."""

    listening: tuple[str, ...]
    desktops: tuple[str, ...]
    desktop_pin: bool
    connections: int
    active: int
    refused_tokens: int
    refused_admin: int
    requests: int
    bytes_read: int


@dataclass
class _Session:
    desktop: str
    next_offset: dict[bytes, int]


def split_path(path: object) -> list[bytes]:
    """``b"VOLUME/a/b"`` as its names; BadPath for anything that could leave the tree."""
    if isinstance(path, str):
        path = path.encode(errors="surrogateescape")
    if not isinstance(path, bytes) or len(path) > MAX_PATH:
        raise BadPath("a path is VOLUME/dir/name, as bytes of at most 4096")
    if not path:
        return []
    parts = path.split(b"/")
    for p in parts:
        if not p or p in (b".", b"..") or b"\0" in p:
            raise BadPath(f"path {path[:200]!r} is not VOLUME/dir/name")
    return parts


def attrs_of(entry: Entry, snapshot_id: bytes) -> dict[str, Any]:
    return {
        "name": entry.name,
        "kind": _KIND[entry.kind],
        "mode": entry.mode,
        "size": entry.size,
        "mtime_ns": entry.mtime_ns,
        "id": entry.id,
        "target": entry.target,
        "snapshot": snapshot_id,
    }


def _reader(stream: trio.abc.ReceiveStream, timeout: float) -> FrameReader:
    # A desktop sends headers only: a payload of any size breaks the protocol.
    return FrameReader(stream, timeout, decoder=wire.Decoder(0), receive_size=RECEIVE_SIZE)


class DesktopServer:
    def __init__(
        self,
        home: Home,
        content: Content,
        heads: Callable[[], Mapping[str, Head]],
        control: ControlServer,
        addresses: list[Address],
        *,
        allow_pin: bool = False,
        frame_timeout: float = 30.0,
    ) -> None:
        self.home = home
        self.content = content
        self.heads = heads
        self.control = control
        self.addresses = addresses
        self.allow_pin = allow_pin
        self.frame_timeout = frame_timeout
        self.keys = ApplianceKeys(home)
        self.stats = _LinkCounts()
        self.listening: list[str] = []
        self._handle_key = b""
        self._listeners: list[trio.SocketListener] = []
        self._nursery: trio.Nursery | None = None

    # -- serving ----------------------------------------------------------------

    async def listen(self) -> None:
        """Make the link's keys if missing and bind every address (before ``run``), so a
        bad address or a busy port is a clear start-up error of the daemon."""
        await trio.to_thread.run_sync(self.keys.ensure)
        self._handle_key = self.keys.handle_key()
        self._context = self.keys.server_context()
        for address in self.addresses:
            try:
                self._listeners += await address.listen()
            except OSError as e:
                for listener in self._listeners:
                    await listener.aclose()
                raise P2pfsError(
                    f"cannot listen for desktops on {address}: {e.strerror or e}"
                ) from None
        for listener in self._listeners:
            name = listener.socket.getsockname()
            self.listening.append(f"{name[0]}:{name[1]}" if isinstance(name, tuple) else str(name))

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        if not self._listeners:
            await self.listen()
        log.info("serving desktops on %s", ", ".join(self.listening))
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.serve_listeners(self._serve, self._listeners, handler_nursery=nursery)

    async def _serve(self, transport: trio.SocketStream) -> None:
        self.stats.connections += 1
        self.stats.active += 1
        stream = TLSStream(transport, self._context, server_side=True)
        try:
            session = await self._authenticate(stream)
            if session is not None:
                await self._requests(stream, session)
        except (trio.BrokenResourceError, trio.ClosedResourceError, wire.ProtocolError) as e:
            log.info("desktop link closed: %s", e)
        except Exception:
            # Nothing a desktop does may end the daemon: this connection only.
            log.exception("desktop connection failed")
        finally:
            self.stats.active -= 1
            with (
                trio.CancelScope(shield=True),
                trio.move_on_after(1),
                contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
            ):
                await stream.aclose()

    async def _authenticate(self, stream: TLSStream) -> _Session | None:
        with trio.move_on_after(AUTH_TIMEOUT):
            await stream.do_handshake()
            frame = await _reader(stream, AUTH_TIMEOUT).next()
            if frame is None:
                return None
            header, _ = frame
            try:
                if header.get("t") != "auth" or header.get("v") != LINK_VERSION:
                    raise TokenRefused("refused: the desktop link starts with auth, version 1")
                desktop = await trio.to_thread.run_sync(
                    self.keys.check, header.get("desktop"), header.get("secret")
                )
            except TokenRefused as e:
                self.stats.refused_tokens += 1
                log.warning("desktop link: %s", e)
                await stream.send_all(wire.encode({"t": "auth", "ok": False, "error": str(e)}))
                return None
            welcome = {
                "t": "auth",
                "ok": True,
                "v": LINK_VERSION,
                "node": self.home.node_id().hex(),
                "pin": self.allow_pin,
            }
            await stream.send_all(wire.encode(welcome))
            log.info("desktop %s connected", desktop)
            return _Session(desktop, {})
        log.info("desktop link: no token within %g s", AUTH_TIMEOUT)
        return None

    async def _requests(self, stream: TLSStream, session: _Session) -> None:
        reader = _reader(stream, self.frame_timeout)
        send_lock = trio.Lock()
        slots = trio.Semaphore(MAX_INFLIGHT)

        async def answer(header: dict[str, Any]) -> None:
            try:
                rid = header.get("id")
                reply, payload = await self._answer(session, header)
                reply = {**reply, "t": "ans", "id": rid}
                async with send_lock:
                    await stream.send_all(wire.encode(reply, payload))
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            finally:
                slots.release()

        async with trio.open_nursery() as nursery:
            try:
                while True:
                    frame = await reader.next()
                    if frame is None:
                        return
                    header, _ = frame
                    if header.get("t") != "req" or not isinstance(header.get("id"), int):
                        raise wire.ProtocolError("a desktop sends only req frames with an id")
                    await slots.acquire()
                    nursery.start_soon(answer, header)
            except (trio.BrokenResourceError, trio.ClosedResourceError, wire.ProtocolError) as e:
                log.info("desktop %s: link closed: %s", session.desktop, e)
            finally:
                nursery.cancel_scope.cancel()

    async def _answer(
        self, session: _Session, header: dict[str, Any]
    ) -> tuple[dict[str, Any], bytes | memoryview]:
        self.stats.requests += 1
        op = header.get("op")
        try:
            return await self._dispatch(session, op, header)
        except P2pfsError as e:
            return {"ok": False, "error": str(e), "errno": e.errno}, b""
        except Exception:
            log.exception("desktop %s: %r failed", session.desktop, op)
            return {"ok": False, "error": "internal error (see the appliance's log)"}, b""

    async def _dispatch(
        self, session: _Session, op: object, header: dict[str, Any]
    ) -> tuple[dict[str, Any], bytes | memoryview]:
        if not isinstance(op, str):
            raise Refused("a request names an operation")
        if op in FILE_OPERATIONS:
            return await self._file_op(session, op, header)
        if op in INFO_OPERATIONS or op in PIN_OPERATIONS:
            return await self._user_op(op, header)
        if op in ADMIN_OPERATIONS or self._face(op) == "admin":
            self.stats.refused_admin += 1
            log.warning("desktop %s asked for admin operation %r: refused", session.desktop, op)
            raise Refused(f"{ADMIN_REFUSED} ({op!r})")
        raise Refused(f"unknown operation {op[:64]!r} on the desktop link")

    def _face(self, op: str) -> str | None:
        known = self.control.ops.get(op)
        return known.face if known is not None else None

    async def _user_op(self, op: str, header: dict[str, Any]) -> tuple[dict[str, Any], bytes]:
        if op in PIN_OPERATIONS and not self.allow_pin:
            raise Refused(
                f"refused: {op} is not allowed from desktops by this appliance's policy "
                "([appliance] desktop_pin)"
            )
        known = self.control.ops.get(op)
        if known is None or known.face != "user":
            raise Refused(f"operation {op!r} is not available on this appliance")
        args = {k: v for k, v in header.items() if k in ("volume", "path", "follow", "limit")}
        result = await known.handler({"op": op, **args})
        return {"ok": True, "enc": "json"}, encode_result(result, "json")

    # -- files ------------------------------------------------------------------

    async def _file_op(
        self, session: _Session, op: str, header: dict[str, Any]
    ) -> tuple[dict[str, Any], bytes | memoryview]:
        if op == "read":
            data = await self._read(session, header)
            self.stats.bytes_read += len(data)
            return {"ok": True, "enc": "raw"}, data
        if op == "statfs":
            return {"ok": True, "enc": "msgpack"}, encode_result(self._statfs(), "msgpack")
        parts = split_path(header.get("path"))
        if op == "list":
            entries = await self._list(parts)
            return {"ok": True, "enc": "msgpack"}, encode_result({"entries": entries}, "msgpack")
        entry, sid = await self._resolve(parts)
        if op == "stat":
            return {"ok": True, "enc": "msgpack"}, encode_result(attrs_of(entry, sid), "msgpack")
        # open
        if entry.kind is Kind.DIR:
            err = P2pfsError("is a directory")
            err.errno = errno.EISDIR
            raise err
        if entry.kind is not Kind.FILE or entry.id is None:
            raise Refused("only regular files can be opened")
        layout = await self.content.layout(entry.id)
        result = {"blob": entry.id, "size": layout.size, "handle": self._handle(session, entry.id)}
        return {"ok": True, "enc": "msgpack"}, encode_result(result, "msgpack")

    def _handle(self, session: _Session, blob: bytes) -> bytes:
        data = session.desktop.encode() + b"\0" + blob
        return keyed(self._handle_key, _HANDLE_DOMAIN + data)

    def _volume_entry(self, name: str, head: Head) -> Entry:
        snap = head.snapshot
        return Entry(name.encode(), Kind.DIR, 0o755, snap.time_ns, 0, snap.root, None)

    async def _resolve(self, parts: list[bytes]) -> tuple[Entry, bytes]:
        if not parts:
            return Entry(b"", Kind.DIR, 0o755, 0, 0, None, None), b""
        head = self.heads().get(parts[0].decode(errors="surrogateescape"))
        if head is None:
            raise BadPath(f"no volume {parts[0][:255]!r}")
        entry = self._volume_entry(parts[0].decode(), head)
        for name in parts[1:]:
            if entry.kind is not Kind.DIR or entry.id is None:
                raise NotADirectory("not a directory")
            tree, names = await self.content.tree(entry.id)
            i = bisect_left(names, name)
            if i >= len(names) or names[i] != name:
                raise BadPath(f"no such file: {name[:255]!r}")
            entry = tree.entries[i]
        return entry, head.snapshot_id

    async def _list(self, parts: list[bytes]) -> list[dict[str, Any]]:
        if not parts:
            return [
                attrs_of(self._volume_entry(name, head), head.snapshot_id)
                for name, head in sorted(self.heads().items())
            ]
        entry, sid = await self._resolve(parts)
        if entry.kind is not Kind.DIR or entry.id is None:
            raise NotADirectory("not a directory")
        tree, _ = await self.content.tree(entry.id)
        return [attrs_of(e, sid) for e in tree.entries]

    async def _read(self, session: _Session, header: dict[str, Any]) -> bytes | memoryview:
        blob, handle = header.get("blob"), header.get("handle")
        offset, size = header.get("offset"), header.get("size")
        if not isinstance(blob, bytes) or not isinstance(handle, bytes):
            raise Refused("read takes the blob and handle that open answered")
        if not hmac.compare_digest(self._handle(session, blob), handle):
            raise Refused("refused: that read handle was not issued to this desktop")
        if not isinstance(offset, int) or not isinstance(size, int):
            raise Refused("read takes an offset and a size")
        if offset < 0 or not 0 <= size <= MAX_READ:
            err = P2pfsError(f"read offset must be >= 0 and size 0..{MAX_READ}")
            err.errno = errno.EINVAL
            raise err
        layout = await self.content.layout(blob)
        end = min(offset + size, layout.size)
        if offset >= end:
            return b""
        chunks = self.content.chunks
        last_end = session.next_offset.get(blob, 0)
        sequential = abs(offset - last_end) <= SEQUENTIAL_SLACK
        if len(session.next_offset) > 256:
            session.next_offset.clear()
        session.next_offset[blob] = max(end, last_end) if sequential else end
        data = await read_span(chunks, layout, offset, end)
        if sequential and self._nursery is not None:
            read_ahead(chunks, layout, end, self._nursery, READAHEAD_CHUNKS)
        return data

    def _statfs(self) -> dict[str, int]:
        st = os.statvfs(self.content.store.root)
        return {"blocks": st.f_blocks * st.f_frsize, "files": 0}

    def statistics(self) -> LinkStats:
        """Blocking (reads the token files): run it in a worker thread."""
        return LinkStats(
            listening=tuple(self.listening),
            desktops=tuple(str(d["desktop"]) for d in self.keys.desktops()),
            desktop_pin=self.allow_pin,
            **dataclasses.asdict(self.stats),
        )
