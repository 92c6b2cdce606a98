"""Who gets in: strangers at the door (OpenSSH's MaxStartups), and peers that broke the
protocol (refused for a while that doubles each time). docs/protocol.md, "Limits"."""

from __future__ import annotations

import logging
import random
from collections.abc import Callable

import trio

from .peers import Peer

log = logging.getLogger(__name__)

# A connection someone opened to us must finish TLS this fast: until then it is a
# stranger holding a socket (OpenSSH's LoginGraceTime, much shorter).
PRE_AUTH_TIMEOUT = 5.0
# OpenSSH's MaxStartups 10:30:100, for connections not yet authenticated: beyond
# STARTUPS_BEGIN drop new ones with a chance rising from STARTUPS_RATE to 1 at
# STARTUPS_FULL; and at most PER_SOURCE_STARTUPS at a time from one address.
STARTUPS_BEGIN, STARTUPS_RATE, STARTUPS_FULL = 10, 0.3, 100
PER_SOURCE_STARTUPS = 8
# A peer that breaks the protocol is refused for 5, 10, 20 ... up to 300 s.
BACKOFF_MIN, BACKOFF_MAX = 5.0, 300.0


class Door:
    """The connections not yet authenticated, by source address."""

    def __init__(self) -> None:
        self._startups: dict[str | None, int] = {}
        self.dropped = 0

    def enter(self, addr: str | None) -> Callable[[], None] | None:
        """A stranger's new connection: None if it is dropped at the door, else the
        call that says it is authenticated (or gone; calling it again does nothing)."""
        total = sum(self._startups.values())
        if total >= STARTUPS_FULL or self._startups.get(addr, 0) >= PER_SOURCE_STARTUPS:
            admitted = False
        elif total >= STARTUPS_BEGIN:
            span = (total - STARTUPS_BEGIN) / (STARTUPS_FULL - STARTUPS_BEGIN)
            admitted = random.random() >= STARTUPS_RATE + (1 - STARTUPS_RATE) * span
        else:
            admitted = True
        if not admitted:
            self.dropped += 1
            return None
        self._startups[addr] = self._startups.get(addr, 0) + 1
        inside = True

        def leave() -> None:
            nonlocal inside
            if inside:
                inside = False
                self._startups[addr] -= 1
                if not self._startups[addr]:
                    del self._startups[addr]

        return leave


def back_off(peer: Peer, reason: str) -> None:
    """A peer broke the protocol: refuse it, and do not dial it, for a while that
    doubles with each time (a fault that reconnects at once cannot spin us)."""
    peer.protocol_errors += 1
    delay = min(BACKOFF_MAX, BACKOFF_MIN * 2 ** (peer.protocol_errors - 1))
    peer.backoff_until = trio.current_time() + delay
    peer.last_error = f"broke the protocol ({reason}); refused for {delay:.0f} s"
    log.warning("peer %s %s", peer.node_id.hex(), peer.last_error)
