"""The daemon's control socket: one JSON request per connection, answered by one JSON
line (a long operation sends progress lines before it).

Operations have two faces (DESIGN.md, Trust): *user* operations (status,
volumes) and *admin* operations (reload, stop, fault injection). Today both
are served on the node's local socket, which only the node's owner can open
(mode 0600); the appliance will expose only the user face to the desktop.

The exchange, one connection per request:

- the client sends one line ``{"op": ..., ...}`` and keeps its end open until the
  answer: closing it means it has gone away (Ctrl-C);
- the server bounds how long it waits for that line (``REQUEST_READ_TIMEOUT``), so a
  stuck client cannot hold a connection;
- a *short* operation must answer within the short deadline (``REQUEST_TIMEOUT``, or
  ``$P2PFS_CONTROL_DEADLINE_S``) or it is cut off, logged and answered with an error
  that says so;
- a *long* operation (commit, scrub, fsck, pin, log) has no deadline: it runs to its
  end. Meanwhile the server sends ``{"progress": {...}}`` lines every
  ``PROGRESS_INTERVAL``, which the client shows or ignores;
- when the client goes away, an operation is cancelled, unless it is marked
  ``runs_to_end`` (commit): that one finishes in the daemon and its outcome is logged;
- the last line is the answer: ``{"ok": true, "result": ...}`` or
  ``{"ok": false, "error": ..., "exit_code": N}``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from p2pfs.errors import ConnectionLost, NotRunning, P2pfsError
from p2pfs.fsutil import pid_alive

log = logging.getLogger(__name__)

MAX_MESSAGE = 1024 * 1024
REQUEST_TIMEOUT = 30.0  # a short operation's deadline, and the CLI's default wait for one
REQUEST_READ_TIMEOUT = 30.0  # for the bytes of a request, and for a client to take a line
DEADLINE_ENV = "P2PFS_CONTROL_DEADLINE_S"  # overrides REQUEST_TIMEOUT (tests, debugging)
PROGRESS_INTERVAL = 1.0
CONNECT_TIMEOUT = 10.0

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
ProgressSource = Callable[[], dict[str, Any]]


@dataclass(frozen=True)
class Operation:
    name: str
    face: str  # "user" or "admin"
    handler: Handler
    long: bool = False  # no deadline; progress lines while it runs
    runs_to_end: bool = False  # not cancelled when its client goes away


def short_deadline() -> float:
    """The short operations' deadline: ``$P2PFS_CONTROL_DEADLINE_S`` or ``REQUEST_TIMEOUT``."""
    text = os.environ.get(DEADLINE_ENV)
    if not text:
        return REQUEST_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        log.warning(
            "%s=%r is not a positive number of seconds: using %.0f s",
            DEADLINE_ENV,
            text,
            REQUEST_TIMEOUT,
        )
        return REQUEST_TIMEOUT
    return value


# A handler finds this under its request's PROGRESS key (on the control socket only)
# and calls it with a function the server polls for the operation's progress.
PROGRESS = "__progress__"


def report_progress(request: dict[str, Any], source: ProgressSource) -> None:
    """Have the server poll ``source`` (a dict of JSON values: ``stage``, and ``done``,
    ``total``, ``unit`` where they are known) for this request's progress lines. A no-op
    where nobody listens (a short operation, the desktop link)."""
    register = request.get(PROGRESS)
    if callable(register):
        register(source)


@dataclass
class _Exchange:
    """One request's state while its operation runs."""

    op: Operation
    started: float = field(default_factory=time.monotonic)
    source: ProgressSource | None = None
    gone: str | None = None  # why the client is no longer there, once it is not

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def progress(self) -> dict[str, Any]:
        out: dict[str, Any] = {"op": self.op.name, "elapsed_s": round(self.elapsed(), 1)}
        if self.source is not None:
            try:
                out.update(self.source())
            except Exception:  # a progress report must never fail the operation
                log.debug("progress of %r failed", self.op.name, exc_info=True)
        return out


class ControlServer:
    def __init__(
        self,
        path: Path,
        *,
        faces: frozenset[str] = frozenset({"user", "admin"}),
        deadline_s: float | None = None,
    ) -> None:
        self.path = path
        self.faces = faces
        self.ops: dict[str, Operation] = {}
        self.deadline_s = short_deadline() if deadline_s is None else deadline_s

    def register(
        self,
        name: str,
        face: str,
        handler: Handler,
        *,
        long: bool = False,
        runs_to_end: bool = False,
    ) -> None:
        self.ops[name] = Operation(name, face, handler, long=long, runs_to_end=runs_to_end)

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
                with trio.fail_after(REQUEST_READ_TIMEOUT):
                    request = await _read_message(stream)
            except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
                log.warning(
                    "control: no whole request within %.0f s: dropped", REQUEST_READ_TIMEOUT
                )
                return
            except P2pfsError as e:
                await _send_quietly(stream, {"ok": False, "error": str(e)})
                return
            op, refusal = self._lookup(request)
            if op is None:
                await _send_quietly(stream, refusal)
                return
            assert isinstance(request, dict)
            answer = await self._run(op, request, stream)
            if answer is None:
                return
            if not await _send_quietly(stream, answer):
                log.warning("control: %r finished but its client did not take the answer", op.name)
                return
            # An operation that ends the daemon (stop) acts only once its
            # answer is on the wire, or the caller would see a dropped line.
            if callable(request.get(AFTER_REPLY)):
                request[AFTER_REPLY]()

    def _lookup(self, request: object) -> tuple[Operation | None, dict[str, Any]]:
        if not isinstance(request, dict) or not isinstance(request.get("op"), str):
            return None, {"ok": False, "error": "request must be a JSON object with an 'op'"}
        op = self.ops.get(request["op"])
        if op is None or op.face not in self.faces:
            return None, {"ok": False, "error": f"unknown operation {request['op']!r}"}
        return op, {}

    async def _run(
        self, op: Operation, request: dict[str, Any], stream: trio.abc.Stream
    ) -> dict[str, Any] | None:
        """Run ``op``: its answer, or None when its client is gone (nobody to answer)."""
        ex = _Exchange(op)
        answer: dict[str, Any] | None = None
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_client, stream, ex, nursery.cancel_scope)
            if op.long:
                request[PROGRESS] = lambda source: setattr(ex, "source", source)
                nursery.start_soon(self._send_progress, stream, ex, nursery.cancel_scope)
            try:
                answer = await self._answer(ex, request)
            finally:
                # The watcher and the progress lines end with the operation.
                nursery.cancel_scope.cancel()
        if ex.gone is not None:
            if answer is not None:  # it ran to its end alone (runs_to_end)
                outcome = "succeeded" if answer.get("ok") else f"failed: {answer.get('error')}"
                log.info(
                    "control: %r %s after %.1f s, its client gone", op.name, outcome, ex.elapsed()
                )
            return None
        return answer

    async def _answer(self, ex: _Exchange, request: dict[str, Any]) -> dict[str, Any]:
        op = ex.op
        deadline = math.inf if op.long else self.deadline_s
        try:
            with trio.fail_after(deadline):
                return {"ok": True, "result": await op.handler(request)}
        except trio.TooSlowError:
            log.error("control: %r did not finish within %g s: cut off", op.name, deadline)
            return {
                "ok": False,
                "error": f"the daemon cut {op.name!r} off: it did not finish within {deadline:g} s",
            }
        except P2pfsError as e:
            log.warning("control: %r failed after %.1f s: %s", op.name, ex.elapsed(), e)
            return {"ok": False, "error": str(e), "exit_code": e.exit_code}
        except trio.Cancelled:
            # Its client went away (logged by the watcher), or the daemon is stopping.
            if ex.gone is None:
                log.warning(
                    "control: %r cut off after %.1f s: the daemon is stopping",
                    op.name,
                    ex.elapsed(),
                )
            raise
        except Exception as e:
            # A bug: loud in the log, and the client hears that it failed rather than
            # seeing the connection drop.
            log.exception("control: %r failed", op.name)
            return {
                "ok": False,
                "error": f"the daemon failed on {op.name!r} ({type(e).__name__}: {e}); see its log",
            }

    async def _watch_client(
        self, stream: trio.abc.Stream, ex: _Exchange, scope: trio.CancelScope
    ) -> None:
        """Notice the client going away (it closes its end: Ctrl-C, or it died)."""
        try:
            while await stream.receive_some(4096):
                pass  # nothing more is expected; a stray byte is not a hang-up
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        self._client_gone(ex, "closed the connection", scope)

    def _client_gone(self, ex: _Exchange, why: str, scope: trio.CancelScope) -> None:
        if ex.gone is not None:
            return
        ex.gone = why
        if ex.op.runs_to_end:
            log.warning(
                "control: the client of %r %s after %.1f s; the operation runs to its end",
                ex.op.name,
                why,
                ex.elapsed(),
            )
            return
        log.warning(
            "control: the client of %r %s after %.1f s: cancelled", ex.op.name, why, ex.elapsed()
        )
        scope.cancel()

    async def _send_progress(
        self, stream: trio.abc.Stream, ex: _Exchange, scope: trio.CancelScope
    ) -> None:
        while ex.gone is None:
            await trio.sleep(PROGRESS_INTERVAL)
            line = json.dumps({"progress": ex.progress()}).encode() + b"\n"
            # Shielded: a line cut in half by the operation ending would garble the
            # answer after it. Bounded: a client that takes no line is a gone client.
            with trio.CancelScope(shield=True):
                try:
                    with trio.fail_after(REQUEST_READ_TIMEOUT):
                        await stream.send_all(line)
                except trio.TooSlowError:
                    self._client_gone(ex, "took no progress line for 30 s", scope)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    self._client_gone(ex, "closed the connection", scope)


async def _send_quietly(stream: trio.abc.Stream, answer: dict[str, Any]) -> bool:
    """Send the last line; False if the client is no longer there to take it."""
    try:
        with trio.fail_after(REQUEST_READ_TIMEOUT):
            await stream.send_all(json.dumps(answer).encode() + b"\n")
    except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError):
        return False
    return True


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


def call(
    socket_path: Path,
    op: str,
    timeout: float | None = REQUEST_TIMEOUT,
    *,
    on_progress: Callable[[dict[str, Any]], None] | None = None,
    **args: Any,
) -> Any:
    """Blocking client for the CLI: send one request, return its result or raise.

    ``timeout`` bounds the whole exchange; None waits as long as the operation runs
    (a long operation: the user stops it with Ctrl-C, which closes the connection).
    ``on_progress`` gets each progress line's object. Raises NotRunning when nothing
    listens on the socket, ConnectionLost when the connection breaks before the answer.
    """
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        s.settimeout(CONNECT_TIMEOUT if timeout is None else min(timeout, CONNECT_TIMEOUT))
        try:
            s.connect(str(socket_path))
        except (FileNotFoundError, ConnectionRefusedError):
            raise NotRunning(
                f"no p2pfs daemon is running for {socket_path.parent.parent}"
            ) from None
        try:
            s.sendall(json.dumps({"op": op, **args}).encode() + b"\n")
            return _receive_answer(s, op, deadline, on_progress, socket_path)
        except (BrokenPipeError, ConnectionResetError):
            raise _lost(socket_path, op) from None
    except TimeoutError:
        if timeout is None:  # only the connect has a bound then: the daemon's loop is stuck
            raise P2pfsError(
                f"the daemon did not take the connection for {op!r} within {CONNECT_TIMEOUT:.0f} s"
            ) from None
        raise P2pfsError(f"the daemon did not answer {op!r} within {timeout:.0f} s") from None
    finally:
        s.close()


def _receive_answer(
    s: socket.socket,
    op: str,
    deadline: float | None,
    on_progress: Callable[[dict[str, Any]], None] | None,
    socket_path: Path,
) -> Any:
    buf = bytearray()
    while True:
        while b"\n" in buf:
            line, _, rest = bytes(buf).partition(b"\n")
            buf = bytearray(rest)
            message = _parse(line, socket_path, op)
            if "progress" in message and "ok" not in message:
                if on_progress is not None and isinstance(message["progress"], dict):
                    on_progress(message["progress"])
                continue
            return _result(message)
        s.settimeout(None if deadline is None else max(0.001, deadline - time.monotonic()))
        data = s.recv(65536)
        if not data:
            raise _lost(socket_path, op)
        buf += data
        if len(buf) > MAX_MESSAGE:
            raise P2pfsError("control answer too large")


def _parse(line: bytes, socket_path: Path, op: str) -> dict[str, Any]:
    try:
        message = json.loads(line)
    except ValueError:
        raise _lost(socket_path, op, "sent a garbled line") from None
    if not isinstance(message, dict):
        raise _lost(socket_path, op, "sent a garbled line")
    return message


def _result(answer: dict[str, Any]) -> Any:
    if not answer.get("ok"):
        err = P2pfsError(answer.get("error", "the daemon refused the request"))
        err.exit_code = int(answer.get("exit_code", 1))
        raise err
    return answer.get("result")


def _lost(
    socket_path: Path, op: str, what: str = "closed the control connection"
) -> ConnectionLost:
    home = socket_path.parent.parent
    gone = ""
    with contextlib.suppress(OSError, ValueError):
        pid = int((socket_path.parent / "daemon.pid").read_text().strip())
        if not pid_alive(pid):
            gone = f" (daemon pid {pid} is no longer running)"
    return ConnectionLost(
        f"the daemon {what} while running {op!r}{gone}: see {home / 'log' / 'daemon.log'}"
    )
