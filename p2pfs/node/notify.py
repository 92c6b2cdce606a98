"""systemd's service notification protocol (``Type=notify``), written out in a few lines.

systemd passes ``$NOTIFY_SOCKET``, an AF_UNIX datagram socket (a leading ``@``: the
abstract namespace); each notification is one datagram of ``KEY=VALUE`` lines
(sd_notify(3)). The daemon sends ``READY=1`` once its mount answers, ``STATUS=`` lines
a human reads in ``systemctl status``, ``WATCHDOG=1`` from the trio event loop at half
of ``$WATCHDOG_USEC`` (a wedged loop then stops them, and systemd restarts the node),
and ``STOPPING=1`` when it begins to stop. Without ``$NOTIFY_SOCKET`` every call does
nothing, so the daemon runs the same by hand.

Sending never blocks the event loop and never fails the daemon: a full or vanished
socket loses a notification, which is logged once.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, MutableMapping

import trio

from p2pfs.errors import UsageError

log = logging.getLogger(__name__)

STATUS_EVERY_S = 10.0  # how often the STATUS= line is brought up to date
EXTEND_PERIODS = 3  # while stopping, each tick extends the stop timeout this many ticks


def _address(value: str) -> str | bytes:
    if value.startswith("@"):  # abstract namespace: the name begins with a NUL byte
        return b"\0" + value[1:].encode()
    if not value.startswith("/"):
        raise UsageError(f"NOTIFY_SOCKET={value!r} is neither an absolute path nor @abstract")
    return value


def watchdog_interval(environ: MutableMapping[str, str]) -> float | None:
    """Seconds between keepalives (half of ``$WATCHDOG_USEC``), None if not asked for.

    ``$WATCHDOG_PID``, when set, names the process systemd watches; any other process
    (a child that inherited the environment) must not answer for it."""
    usec = environ.get("WATCHDOG_USEC")
    if not usec:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None
    if not usec.isdecimal() or int(usec) == 0:
        raise UsageError(f"WATCHDOG_USEC={usec!r} is not a positive number of microseconds")
    return int(usec) / 2e6


class Notifier:
    def __init__(self, environ: MutableMapping[str, str] | None = None) -> None:
        """Read (and remove) the variables from ``environ`` (default: the process's), so
        that nothing the daemon starts mistakes itself for the service."""
        env = os.environ if environ is None else environ
        value = env.pop("NOTIFY_SOCKET", "")
        self.address = _address(value) if value else None
        self.watchdog_s = watchdog_interval(env)
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)
        self._sock: socket.socket | None = None
        self._warned = False
        self._stopping = False
        self._status = ""
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """One datagram of ``lines``; False if it was not delivered (or not asked for)."""
        if self._sock is None:
            return False
        try:
            self._sock.sendto("\n".join(lines).encode(), self.address)  # type: ignore[arg-type]
        except OSError as e:
            if not self._warned:
                self._warned = True
                log.warning("systemd notification lost (NOTIFY_SOCKET): %s", e)
            return False
        return True

    def ready(self, status: str) -> None:
        self._status = status
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        """A new STATUS= line, sent only when it changed."""
        if status != self._status:
            self._status = status
            self.send(f"STATUS={status}")

    def stopping(self, status: str = "stopping: unmounting") -> None:
        if not self._stopping:
            self._stopping = True
            self.send("STOPPING=1", f"STATUS={status}")

    async def run(
        self,
        describe: Callable[[], str] | None = None,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Keepalives and STATUS= updates from the event loop, until cancelled."""
        task_status.started()
        if self._sock is None:
            return
        every = STATUS_EVERY_S if self.watchdog_s is None else min(self.watchdog_s, STATUS_EVERY_S)
        while True:
            if self.watchdog_s is not None:
                self.send("WATCHDOG=1")
            if self._stopping:
                # The last commit may outlast TimeoutStopSec=: while the loop lives it
                # pushes the stop timeout on; a wedged one stops pushing and is killed.
                self.send(f"EXTEND_TIMEOUT_USEC={int(EXTEND_PERIODS * every * 1e6)}")
            if describe is not None and not self._stopping:
                self.status(describe())
            await trio.sleep(every)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
