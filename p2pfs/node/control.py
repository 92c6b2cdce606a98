"""The daemon's control socket: one JSON request and one JSON answer per connection.

Operations have two faces (DESIGN.md, Trust): *user* operations (status,
volumes) and *admin* operations (reload, stop, fault injection). Today both
are served on the node's local socket, which only the node's owner can open
(mode 0600); the appliance will expose only the user face to the desktop.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from p2pfs.errors import NotRunning, P2pfsError

log = logging.getLogger(__name__)

MAX_MESSAGE = 1024 * 1024
REQUEST_TIMEOUT = 30.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]


@dataclass(frozen=True)
class Operation:
    name: str
    face: str  # "user" or "admin"
    handler: Handler


class ControlServer:
    def __init__(self, path: Path, *, faces: frozenset[str] = frozenset({"user", "admin"})) -> None:
        self.path = path
        self.faces = faces
        self.ops: dict[str, Operation] = {}

    def register(self, name: str, face: str, handler: Handler) -> None:
        self.ops[name] = Operation(name, face, handler)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.path.unlink(missing_ok=True)
        old = os.umask(0o177)
        try:
            await sock.bind(str(self.path))
        finally:
            os.umask(old)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        task_status.started()
        try:
            await trio.serve_listeners(self._serve, [listener])
        finally:
            self.path.unlink(missing_ok=True)

    async def _serve(self, stream: trio.abc.Stream) -> None:
        async with stream:
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    request = await _read_message(stream)
                    answer = await self._answer(request)
                    await stream.send_all(json.dumps(answer).encode() + b"\n")
                # An operation that ends the daemon (stop) acts only once its
                # answer is on the wire, or the caller would see a dropped line.
                if isinstance(request, dict) and callable(request.get(AFTER_REPLY)):
                    request[AFTER_REPLY]()
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                pass
            except Exception:
                log.exception("control request failed")

    async def _answer(self, request: object) -> dict[str, Any]:
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return {"ok": False, "error": "request must be a JSON object with an 'op'"}
        op = self.ops.get(request["op"])
        if op is None or op.face not in self.faces:
            return {"ok": False, "error": f"unknown operation {request['op']!r}"}
        try:
            return {"ok": True, "result": await op.handler(request)}
        except P2pfsError as e:
            return {"ok": False, "error": str(e), "exit_code": e.exit_code}


async def _read_message(stream: trio.abc.ReceiveStream) -> object:
    buf = bytearray()
    while b"\n" not in buf:
        data = await stream.receive_some(65536)
        if not data:
            break
        buf += data
        if len(buf) > MAX_MESSAGE:
            raise P2pfsError("control message too large")
    try:
        return json.loads(bytes(buf).split(b"\n", 1)[0])
    except ValueError:
        return None


# A handler may put a callable under this key of its request: it runs once the
# answer has been sent.
AFTER_REPLY = "__after_reply__"


def call(socket_path: Path, op: str, timeout: float = REQUEST_TIMEOUT, **args: Any) -> Any:
    """Blocking client for the CLI: send one request, return its result or raise."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        try:
            s.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(
                f"no p2pfs daemon is running for {socket_path.parent.parent}"
            ) from None
        s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
        buf = bytearray()
        while True:
            data = s.recv(65536)
            if not data:
                break
            buf += data
            if len(buf) > MAX_MESSAGE:
                raise P2pfsError("control answer too large")
    except TimeoutError:
        raise P2pfsError(f"the daemon did not answer {op!r} within {timeout:.0f} s") from None
    finally:
        s.close()
    if not buf:
        raise NotRunning("the daemon closed the control connection without answering")
    answer = json.loads(buf)
    if not answer.get("ok"):
        err = P2pfsError(answer.get("error", "the daemon refused the request"))
        err.exit_code = int(answer.get("exit_code", 1))
        raise err
    return answer.get("result")
