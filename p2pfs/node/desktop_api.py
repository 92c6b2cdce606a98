"""The appliance's desktop face: the user API served over the host-only link.

In appliance mode (DESIGN.md, Trust) the daemon, store and keys live in a VM; a
desktop reads the volumes through a thin FUSE client (``appliance/thin_fs.py``) that speaks
only this API. Every connection is TLS 1.3 with the appliance's link certificate
(pinned by the client) and is authenticated by a per-desktop token before any
request is read (``trust/desktop.py``). Then it serves exactly:

- files: ``stat``, ``list``, ``open`` and ``read`` of paths under the volumes
  (``VOLUME/dir/file``, never ``..``; no object or chunk is addressable by id),
  with each volume's hidden ``VOLUME/.snapshots/<seq>/`` as the mount shows it when
  ``[appliance] desktop_snapshots`` is on (the default), and ``statfs``;
- ``status`` and ``peers`` as a desktop user needs them (``desktop_view.py``: no
  path, no address), the daemon's user operations ``pins`` and ``log``;
  ``pin``, ``pin-status``, ``pin-cancel`` and ``unpin`` only when
  ``[appliance] desktop_pin = true``.

Every admin operation (the control socket's admin face, and what the admin does
with the command line: import, approve, revoke, token add, ...) is answered with
"refused: admin operation over the desktop link"; anything else is unknown.

``open`` answers the file's stored blob id and a *read handle*: the file's ref sealed
(AES-GCM, ``seal.seal_small``) under ``HOME/appliance/handles.key`` and bound to
(desktop, its token's digest). ``read`` takes both, so a desktop reads exactly the
blobs it reached through a path, survives a restart of the appliance without state,
and cannot read anything by guessing ids; another desktop, or the same desktop with a
replaced token, cannot use the handle. Sealed, not only MACed: a private volume's
ref carries its key, and keys never leave the appliance (attributes show stored ids).

Every live session is tracked (desktop, token digest, cancel scope). A watcher rereads
each connected desktop's token every TOKEN_CHECK_INTERVAL; a session whose token was
removed or replaced gets a final ``{"t": "end", "error": ...}`` frame and is cancelled,
so ``p2pfs appliance token remove`` ends a desktop's open mount within a second, not at
its next connection.

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
from dataclasses import dataclass, field
from typing import Any

import trio

from p2pfs.errors import IntegrityError, P2pfsError
from p2pfs.fs.vfs import MAX_HISTORY, SNAPSHOTS_DIR, SNAPSHOTS_ID, Head
from p2pfs.home import Home
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
from p2pfs.objects.model import Entry, Kind, Snapshot
from p2pfs.seal import open_small, seal_small, stored_id
from p2pfs.trust.desktop import ApplianceKeys, TokenRefused, secret_digest
from p2pfs.trust.tlsstream import TLSStream
from p2pfs.volume.content import SEQUENTIAL_SLACK, Content, read_ahead, read_span
from p2pfs.volume.history import snapshot_dirs

from .control import ControlServer
from .desktop_view import desktop_peers, desktop_status

log = logging.getLogger(__name__)

MAX_INFLIGHT = 32
MAX_PATH = 4096
READAHEAD_CHUNKS = 16  # chunks read ahead of a desktop reading sequentially
TOKEN_CHECK_INTERVAL = 0.25  # how often live sessions' tokens are reread
END_SEND_TIMEOUT = 0.5  # the final "end" frame waits this long for a busy or slow link
TOKEN_ENDED = "the desktop's token was removed or replaced"

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
        "estate",  # `p2pfs web`'s view of every node
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
VIEW_OPERATIONS = ("status", "peers")  # answered from desktop_view, not as the admin sees them
PIN_OPERATIONS = ("pin", "pin-status", "pin-cancel", "unpin")
FILE_OPERATIONS = ("stat", "list", "open", "read", "statfs")
_KIND = {
    Kind.FILE: "file",
    Kind.DIR: "dir",
    Kind.SYMLINK: "symlink",
    Kind.FIFO: "fifo",
    Kind.SOCKET: "socket",
    Kind.CHR: "chr",
    Kind.BLK: "blk",
}
_HANDLE_DOMAIN = b"p2pfs-read-handle-v3\0"


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
    sessions_ended: int = 0


@dataclass(frozen=True)
class LinkStats:
    """The desktop link as status shows it (``desktop_link``)."""

    listening: tuple[str, ...]
    desktops: tuple[str, ...]
    desktop_pin: bool
    desktop_snapshots: bool
    connections: int
    active: int
    refused_tokens: int
    refused_admin: int
    requests: int
    bytes_read: int
    sessions_ended: int  # sessions ended because their token was removed or replaced


@dataclass(eq=False)  # by identity: a member of DesktopServer._sessions
class _Session:
    desktop: str
    digest: bytes  # of the token it authenticated with
    stream: TLSStream
    # Entered around the session's requests; cancelled to end the session.
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    # One frame at a time on the stream: answers, and the final "end".
    send_lock: trio.Lock = field(default_factory=trio.Lock)
    next_offset: dict[bytes, int] = field(default_factory=dict)
    ended: str | None = None  # why the appliance ended it


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
        # The stored id only: a private volume's refs carry keys, which stay here.
        "id": None if entry.id is None else stored_id(entry.id),
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
        snapshots: bool = True,
        root_of: Callable[[Snapshot], bytes] | None = None,
        frame_timeout: float = 30.0,
    ) -> None:
        self.home = home
        self.content = content
        self.heads = heads
        self.control = control
        self.addresses = addresses
        self.allow_pin = allow_pin
        self.snapshots = snapshots
        self.root_of = root_of  # an older snapshot's root ref (private ones open with keys)
        self.frame_timeout = frame_timeout
        self.keys = ApplianceKeys(home)
        self.stats = _LinkCounts()
        self.listening: list[str] = []
        self._handle_key = b""
        self._listeners: list[trio.SocketListener] = []
        self._nursery: trio.Nursery | None = None
        self._sessions: set[_Session] = set()

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
            nursery.start_soon(self._watch_tokens)
            task_status.started()
            await trio.serve_listeners(self._serve, self._listeners, handler_nursery=nursery)

    async def _serve(self, transport: trio.SocketStream) -> None:
        self.stats.connections += 1
        self.stats.active += 1
        stream = TLSStream(transport, self._context, server_side=True)
        session = None
        try:
            session = await self._authenticate(stream)
            if session is not None:
                self._sessions.add(session)
                with session.scope:
                    await self._requests(stream, session)
        except (trio.BrokenResourceError, trio.ClosedResourceError, wire.ProtocolError) as e:
            log.info("desktop link closed: %s", e)
        except Exception:
            # Nothing a desktop does may end the daemon: this connection only.
            log.exception("desktop connection failed")
        finally:
            self.stats.active -= 1
            if session is not None:
                self._sessions.discard(session)
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
            # The digest of the secret presented (equal to the stored one, just checked):
            # not reread, so a token replaced during this handshake still ends the session.
            return _Session(desktop, secret_digest(header["secret"]), stream)
        log.info("desktop link: no token within %g s", AUTH_TIMEOUT)
        return None

    async def _requests(self, stream: TLSStream, session: _Session) -> None:
        reader = _reader(stream, self.frame_timeout)
        send_lock = session.send_lock
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
        if op in VIEW_OPERATIONS:
            full = await self._call_user_op("status", {})
            if op == "peers":
                return {"ok": True, "enc": "json"}, encode_result(desktop_peers(full), "json")
            pins = (await self._call_user_op("pins", {}))["pins"]
            view = desktop_status(
                full, pins, self.heads(), allow_pin=self.allow_pin, snapshots=self.snapshots
            )
            return {"ok": True, "enc": "json"}, encode_result(view, "json")
        args = {k: v for k, v in header.items() if k in ("volume", "path", "follow", "limit")}
        result = await self._call_user_op(op, args)
        return {"ok": True, "enc": "json"}, encode_result(result, "json")

    async def _call_user_op(self, op: str, args: dict[str, Any]) -> dict[str, Any]:
        known = self.control.ops.get(op)
        if known is None or known.face != "user":
            raise Refused(f"operation {op!r} is not available on this appliance")
        result: dict[str, Any] = await known.handler({"op": op, **args})
        return result

    # -- ending sessions whose token went ------------------------------------------

    async def _watch_tokens(self) -> None:
        """End every live session whose desktop's token was removed or replaced since it
        authenticated (the token files are reread, never cached)."""
        while True:
            await trio.sleep(TOKEN_CHECK_INTERVAL)
            if not self._sessions:
                continue
            desktops = sorted({s.desktop for s in self._sessions})
            current = await trio.to_thread.run_sync(self._digests, desktops)
            for session in list(self._sessions):
                if session.desktop not in current or session.ended is not None:
                    continue  # connected since the reread: the next round sees it
                digest = current[session.desktop]
                if digest is None or not hmac.compare_digest(digest, session.digest):
                    assert self._nursery is not None
                    self._nursery.start_soon(self._end, session, TOKEN_ENDED)

    def _digests(self, desktops: list[str]) -> dict[str, bytes | None]:
        return {d: self.keys.token_digest(d) for d in desktops}

    async def _end(self, session: _Session, reason: str) -> None:
        """Tell the desktop why, then cancel its session (which closes the connection)."""
        if session.ended is not None:
            return
        session.ended = reason
        self.stats.sessions_ended += 1
        log.warning("desktop %s: %s: ending its session", session.desktop, reason)
        with (
            trio.move_on_after(END_SEND_TIMEOUT),
            contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError),
        ):
            # Under the send lock, between two answers; cancelled while still holding it,
            # so no answer follows the end frame.
            async with session.send_lock:
                await session.stream.send_all(wire.encode({"t": "end", "error": reason}))
                session.scope.cancel()
        session.scope.cancel()  # also when the link was too busy or slow for the frame

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
        result = {
            "blob": stored_id(entry.id),
            "size": layout.size,
            "handle": self._handle(session, entry.id),
        }
        return {"ok": True, "enc": "msgpack"}, encode_result(result, "msgpack")

    def _handle_context(self, session: _Session) -> bytes:
        # Bound to the token too: a replaced token's holder cannot use its handles.
        return _HANDLE_DOMAIN + session.desktop.encode() + b"\0" + session.digest

    def _handle(self, session: _Session, ref: bytes) -> bytes:
        """The file's ref sealed for this desktop: stateless (it survives reconnects),
        useless to any other desktop, and it never shows a private volume's key."""
        return seal_small(self._handle_key, ref, self._handle_context(session))

    def _open_handle(self, session: _Session, blob: bytes, handle: bytes) -> bytes:
        try:
            ref = open_small(self._handle_key, handle, self._handle_context(session))
        except IntegrityError:
            raise Refused("refused: that read handle was not issued to this desktop") from None
        if stored_id(ref) != blob:
            raise Refused("refused: that read handle is for another file")
        return ref

    def _volume_entry(self, name: str, head: Head) -> Entry:
        snap = head.snapshot
        return Entry(name.encode(), Kind.DIR, 0o755, snap.time_ns, 0, head.root, None)

    def _head(self, parts: list[bytes]) -> Head:
        head = self.heads().get(parts[0].decode(errors="surrogateescape"))
        if head is None:
            raise BadPath(f"no volume {parts[0][:255]!r}")
        return head

    def _is_snapshots(self, parts: list[bytes]) -> bool:
        """``VOLUME/.snapshots/...``: the volume's history, when the policy offers it."""
        return self.snapshots and len(parts) >= 2 and parts[1] == SNAPSHOTS_DIR

    async def _snapshot_root(self, name: str, head: Head, seq: bytes) -> tuple[Entry, bytes]:
        """``VOLUME/.snapshots/<seq>``: that snapshot's root and id, found as the mount
        finds it (``snapshot_dirs``), walking back from the head no further than ``seq``."""
        if not seq.isdigit() or len(seq) > 20 or (seq.startswith(b"0") and seq != b"0"):
            raise BadPath(f"no snapshot {seq[:32]!r} of volume {name!r}")
        back = head.snapshot.seq - int(seq)
        if not 0 <= back < MAX_HISTORY:
            raise BadPath(f"no snapshot {seq[:32]!r} of volume {name!r}")
        dirs = await snapshot_dirs(
            self.content,
            head.snapshot_id,
            head.snapshot,
            back + 1,
            volume=name,
            root_of=self.root_of,
        )
        for entry, sid in dirs:
            if entry.name == seq:
                return entry, sid
        raise BadPath(f"snapshot {seq.decode()} of volume {name!r} is not available here")

    def _snapshots_entry(self, head: Head) -> Entry:
        snap = head.snapshot
        return Entry(SNAPSHOTS_DIR, Kind.DIR, 0o555, snap.time_ns, 0, SNAPSHOTS_ID, None)

    async def _resolve(self, parts: list[bytes]) -> tuple[Entry, bytes]:
        if not parts:
            return Entry(b"", Kind.DIR, 0o755, 0, 0, None, None), b""
        head = self._head(parts)
        volume = parts[0].decode(errors="surrogateescape")
        entry, sid, rest = self._volume_entry(volume, head), head.snapshot_id, parts[1:]
        if self._is_snapshots(parts):
            if len(parts) == 2:
                return self._snapshots_entry(head), head.snapshot_id
            entry, sid = await self._snapshot_root(volume, head, parts[2])
            rest = parts[3:]
        for name in rest:
            if entry.kind is not Kind.DIR or entry.id is None:
                raise NotADirectory("not a directory")
            tree, names = await self.content.tree(entry.id)
            i = bisect_left(names, name)
            if i >= len(names) or names[i] != name:
                raise BadPath(f"no such file: {name[:255]!r}")
            entry = tree.entries[i]
        return entry, sid

    async def _list(self, parts: list[bytes]) -> list[dict[str, Any]]:
        if not parts:
            return [
                attrs_of(self._volume_entry(name, head), head.snapshot_id)
                for name, head in sorted(self.heads().items())
            ]
        if self._is_snapshots(parts) and len(parts) == 2:
            head = self._head(parts)
            dirs = await snapshot_dirs(
                self.content,
                head.snapshot_id,
                head.snapshot,
                MAX_HISTORY,
                volume=parts[0].decode(errors="surrogateescape"),
                root_of=self.root_of,
            )
            return [attrs_of(e, sid) for e, sid in dirs]
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
        if len(handle) > 256:
            raise Refused("a read handle is at most 256 bytes")
        ref = self._open_handle(session, blob, handle)
        if not isinstance(offset, int) or not isinstance(size, int):
            raise Refused("read takes an offset and a size")
        if offset < 0 or not 0 <= size <= MAX_READ:
            err = P2pfsError(f"read offset must be >= 0 and size 0..{MAX_READ}")
            err.errno = errno.EINVAL
            raise err
        layout = await self.content.layout(ref)
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
            window = self.content.readahead_window(READAHEAD_CHUNKS)
            read_ahead(chunks, layout, end, self._nursery, window)
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
            desktop_snapshots=self.snapshots,
            **dataclasses.asdict(self.stats),
        )
