"""Keeping a connection honest about being alive: a cut cable leaves TCP silent, not closed.

A connection silent for ``period`` is pinged, once per period; silent for
SILENT_PERIODS of them it is closed, so ``peers`` tells the truth within seconds and
the dialer reconnects when the cable is back. While a send of ours is under way the
peer may be busy taking a long queue of our answers over a slow link (its pong waits
behind them): then the socket's TCP_USER_TIMEOUT, the same span, judges instead,
from the ACKs that the kernel sees and we do not.
"""

from __future__ import annotations

import contextlib
import logging
import socket

import trio

from .connection import Connection, PeerUnavailable

log = logging.getLogger(__name__)

SILENT_PERIODS = 3  # keepalive periods of silence before a connection is given up


async def keep_alive(conn: Connection, period: float) -> None:
    """Ping ``conn`` when quiet, close it when mute; runs until the connection ends."""
    async with trio.open_nursery() as nursery:
        while True:
            quiet = trio.current_time() - conn.last_received
            if quiet >= SILENT_PERIODS * period and not conn.sending:
                conn.close_reason = f"silent for {quiet:.1f} s (keepalive)"
                log.info("peer %s: %s; closing", conn.peer_id.hex(), conn.close_reason)
                await conn.aclose()
                return
            if quiet >= period:
                nursery.start_soon(_ping, conn, SILENT_PERIODS * period)
                await trio.sleep(period)
            else:
                await trio.sleep_until(conn.last_received + period)


async def _ping(conn: Connection, within: float) -> None:
    with contextlib.suppress(PeerUnavailable):
        await conn.request({"t": "ping"}, within=within)


def set_user_timeout(tcp: trio.SocketStream, period: float) -> None:
    """Unacknowledged data older than the keepalive's span breaks the socket."""
    ms = int(SILENT_PERIODS * period * 1000)
    with contextlib.suppress(OSError, AttributeError):
        tcp.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, max(ms, 1000))
