"""Peers on the local segment by mDNS (zeroconf), bridged into trio.

The only module that imports ``zeroconf``. A node registers one service of type
``_p2pfs._tcp.local.`` named ``p2pfs-<first 32 hex digits of its node id>`` (a DNS
label holds at most 63 bytes, so not the whole 64-digit id) with TXT records
``node`` (node id hex), ``estate`` (estate id hex), ``v`` (protocol version) and
``port``, and browses for the others. mDNS only yields candidate addresses:
whoever answers there proves who it is with TLS later.

Threads: zeroconf runs its own asyncio loop in a thread, and its browser calls our
handler on another thread. The handler only hands ``(name, change)`` to trio with
``TrioToken.run_sync_soon`` into a bounded memory channel; everything else (the
view, the callbacks) happens in the trio thread. Zeroconf's blocking calls (open,
register, resolve, close) go through ``trio.to_thread``; resolving returns plain
copies (dicts, tuples), so worker threads share no mutable state with trio.

What arrives from the network is hostile: TXT values are bounded and validated,
names and events are bounded in number, and anything malformed is ignored with a
debug log. Idle chatter is zeroconf's own (RFC 6762 backoff, refresh at 75 % of a
TTL); this module adds only the queries of a resolution that failed and is tried
again (backing off, at most RESOLVE_ATTEMPTS times). And mDNS is not the only way
in: every hello names the peers its sender is connected to (``service.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import ipaddress
import json
import logging
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import ifaddr
import trio
import zeroconf
from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, ServiceStateChange

from p2pfs.errors import P2pfsError

log = logging.getLogger(__name__)

PROTOCOL_VERSION = 1
SERVICE_TYPE = "_p2pfs._tcp.local."
INSTANCE_PREFIX = "p2pfs-"
NAME_HEX_DIGITS = 32  # 128 bits of the node id name the instance; the TXT record has all of it
MAX_ID_BYTES = 64  # node and estate ids from the network: at most this long
MAX_INT_DIGITS = 5  # "v" and "port"
MAX_PEERS = 1024  # candidates in the view
MAX_NAMES = 2048  # service names being tracked (resolving or resolved)
EVENT_BUFFER = 512  # browser events waiting for the trio side; beyond, they are dropped
RESOLVE_TIMEOUT_MS = 3000
RESOLVE_ATTEMPTS = 8  # then the name is dropped until zeroconf reports it again
RESOLVE_BACKOFF_MAX_S = 30.0
RESOLVE_THREADS = 4
CLOSE_TIMEOUT_S = 10.0

_HEX = frozenset(b"0123456789abcdef")
_DIGITS = frozenset(b"0123456789")


@dataclass(frozen=True)
class Candidate:
    """A peer as mDNS describes it: where to dial, and who it claims to be."""

    node_id: bytes
    estate_id: bytes
    version: int
    address: str
    port: int


def instance_label(node_id: bytes) -> str:
    return INSTANCE_PREFIX + node_id.hex()[:NAME_HEX_DIGITS]


def txt_record(node_id: bytes, estate_id: bytes, port: int) -> dict[str, str]:
    return {
        "node": node_id.hex(),
        "estate": estate_id.hex(),
        "v": str(PROTOCOL_VERSION),
        "port": str(port),
    }


# -- validating what the network says ----------------------------------------------------


def _hex_field(props: Mapping[bytes, bytes | None], key: bytes) -> bytes:
    value = props.get(key)
    if not isinstance(value, bytes) or not value:
        raise ValueError(f"TXT {key.decode()} is missing")
    if len(value) > 2 * MAX_ID_BYTES or len(value) % 2 or not set(value) <= _HEX:
        raise ValueError(f"TXT {key.decode()} is not lowercase hex of at most {MAX_ID_BYTES} bytes")
    return bytes.fromhex(value.decode("ascii"))


def _int_field(props: Mapping[bytes, bytes | None], key: bytes, low: int, high: int) -> int:
    value = props.get(key)
    if not isinstance(value, bytes) or not value:
        raise ValueError(f"TXT {key.decode()} is missing")
    if len(value) > MAX_INT_DIGITS or not set(value) <= _DIGITS:
        raise ValueError(f"TXT {key.decode()} is not a small decimal number")
    number = int(value)
    if not low <= number <= high:
        raise ValueError(f"TXT {key.decode()} {number} is out of range")
    return number


def usable_address(text: str) -> bool:
    """An IPv4 address a peer can be dialled at (not loopback, multicast or unspecified)."""
    try:
        addr = ipaddress.IPv4Address(text)
    except ValueError:
        return False
    return not (
        addr.is_loopback or addr.is_multicast or addr.is_unspecified or addr.is_reserved
    ) and addr != ipaddress.IPv4Address("255.255.255.255")


def parse_candidate(
    name: str,
    properties: Mapping[bytes, bytes | None],
    addresses: Sequence[str],
    near: Sequence[ipaddress.IPv4Network] = (),
) -> Candidate:
    """The candidate a resolved service describes; ValueError (with the reason) if malformed.

    Of the peer's usable addresses, the first one inside one of the ``near``
    networks (ours) is taken, else the first one.

    The port is the TXT record's (the SRV record's is not cross-checked: during a
    restart on a new port, zeroconf's cache briefly holds the old SRV beside the new).
    """
    node_id = _hex_field(properties, b"node")
    estate_id = _hex_field(properties, b"estate")
    version = _int_field(properties, b"v", 0, 65535)
    port = _int_field(properties, b"port", 1, 65535)
    label = name.split(".", 1)[0]
    if not label.startswith(instance_label(node_id)):
        raise ValueError(f"instance name {label!r} does not carry its node id")
    usable = [a for a in addresses if usable_address(a)]
    if not usable:
        raise ValueError(f"no usable IPv4 address in {list(addresses)[:4]}")
    on_link = [a for a in usable if any(ipaddress.IPv4Address(a) in net for net in near)]
    return Candidate(node_id, estate_id, version, (on_link or usable)[0], port)


# -- local addresses ---------------------------------------------------------------------


def local_ipv4_addresses(interfaces: Sequence[str] | None = None) -> list[str]:
    """IPv4 addresses to announce: of the named interfaces (names or addresses), else all.

    Without a choice, loopback addresses are left out unless there is nothing else.
    """
    adapters = ifaddr.get_adapters()
    by_name: dict[str, list[str]] = {}
    for adapter in adapters:
        ips = [str(ip.ip) for ip in adapter.ips if ip.is_IPv4]
        by_name.setdefault(str(adapter.name), []).extend(ips)
    if interfaces:
        out: list[str] = []
        for item in interfaces:
            try:
                out.append(str(ipaddress.IPv4Address(item)))
            except ValueError:
                if not by_name.get(item):
                    raise P2pfsError(f"interface {item!r} has no IPv4 address") from None
                out.extend(by_name[item])
        return list(dict.fromkeys(out))
    everything = [ip for ips in by_name.values() for ip in ips]
    outside = [ip for ip in everything if not ipaddress.IPv4Address(ip).is_loopback]
    return list(dict.fromkeys(outside or everything))


def local_ipv4_networks() -> list[ipaddress.IPv4Network]:
    """The IPv4 networks this machine is on (not loopback): peers there are preferred."""
    nets = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            if ip.is_IPv4:
                net = ipaddress.IPv4Network(f"{ip.ip}/{ip.network_prefix}", strict=False)
                if not net.is_loopback:
                    nets.append(net)
    return list(dict.fromkeys(nets))


# -- the service -------------------------------------------------------------------------


@dataclass(frozen=True)
class DiscoveryStats:
    events: int  # zeroconf events handed over
    dropped_events: int
    ignored: int  # services of other estates, or malformed
    unresolved: int
    peers: int  # candidates announced now
    names: int


class Discovery:
    """Announce this node and report the peers of its estate seen by mDNS.

    ``interfaces``: interface names (``eth0``) or IPv4 addresses to listen, announce
    and browse on; by default every IPv4 interface (the announcement leaves loopback
    addresses out). ``candidates()`` is the current view; ``statistics()`` counts
    events, ignored services and dropped events.
    """

    def __init__(
        self,
        node_id: bytes,
        estate_id: bytes,
        port: int,
        *,
        interfaces: list[str] | None = None,
    ) -> None:
        if not 0 < port < 65536:
            raise ValueError(f"port {port} is out of range")
        if not 0 < len(node_id) <= MAX_ID_BYTES or not 0 < len(estate_id) <= MAX_ID_BYTES:
            raise ValueError("node and estate ids must be 1 to 64 bytes")
        self.node_id = node_id
        self.estate_id = estate_id
        self.port = port
        self.interfaces = list(interfaces) if interfaces else None
        self.instance_name = f"{instance_label(node_id)}.{SERVICE_TYPE}"
        self.addresses: list[str] = []
        self._networks: list[ipaddress.IPv4Network] = []
        # The view, touched only in the trio thread.
        self._view: dict[bytes, Candidate] = {}
        self._name_of: dict[bytes, str] = {}  # node id -> the service name it came from
        self._node_of: dict[str, bytes] = {}  # and back
        self._tickets: dict[str, int] = {}  # live service name -> number of its latest event
        self._resolving: set[str] = set()
        self._events = 0
        self._limiter = trio.CapacityLimiter(RESOLVE_THREADS)
        self._stats = {"events": 0, "dropped_events": 0, "ignored": 0, "unresolved": 0}

    def candidates(self) -> list[Candidate]:
        """The peers of this estate currently announced on the segment."""
        return list(self._view.values())

    def statistics(self) -> DiscoveryStats:
        return DiscoveryStats(**self._stats, peers=len(self._view), names=len(self._tickets))

    async def run(
        self,
        on_candidate: Callable[[Candidate], None],
        *,
        on_lost: Callable[[bytes], None] | None = None,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Announce, browse, and call ``on_candidate`` (in the trio thread) for each peer found
        or changed; ``on_lost`` with a node id when a peer says goodbye. Runs until cancelled,
        then withdraws the announcement (goodbye) and closes zeroconf.

        ``started`` comes once zeroconf listens and browses; the announcement itself
        (probing, then announcing) completes about two seconds later in the background.
        """
        token = trio.lowlevel.current_trio_token()
        send, receive = trio.open_memory_channel[tuple[str, ServiceStateChange]](EVENT_BUFFER)

        def handler(
            zeroconf: zeroconf.Zeroconf,
            service_type: str,
            name: str,
            state_change: ServiceStateChange,
        ) -> None:  # on zeroconf's browser thread: hand over, nothing else
            with contextlib.suppress(trio.RunFinishedError):
                token.run_sync_soon(self._deliver, send, name, state_change)

        self.addresses = await trio.to_thread.run_sync(local_ipv4_addresses, self.interfaces)
        self._networks = await trio.to_thread.run_sync(local_ipv4_networks)
        zc = await trio.to_thread.run_sync(self._open)
        browser: ServiceBrowser | None = None
        try:
            info = ServiceInfo(
                SERVICE_TYPE,
                self.instance_name,
                port=self.port,
                properties=txt_record(self.node_id, self.estate_id, self.port),
                server=f"{instance_label(self.node_id)}.local.",
                addresses=[socket.inet_aton(a) for a in self.addresses],
            )
            browser = await trio.to_thread.run_sync(
                functools.partial(ServiceBrowser, zc, SERVICE_TYPE, handlers=[handler])
            )
            async with trio.open_nursery() as nursery, receive:
                nursery.start_soon(self._register, zc, info)
                log.info(
                    "mDNS: announcing %s on %s port %d",
                    self.instance_name,
                    ", ".join(self.addresses),
                    self.port,
                )
                task_status.started()
                async for name, change in receive:
                    self._on_event(nursery, zc, name, change, on_candidate, on_lost)
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
                await trio.to_thread.run_sync(self._close, zc, browser, abandon_on_cancel=True)

    # -- zeroconf's blocking calls (worker threads) ---------------------------------------

    def _open(self) -> zeroconf.Zeroconf:
        choice: Any = list(self.addresses) if self.interfaces else InterfaceChoice.All
        try:
            return zeroconf.Zeroconf(
                interfaces=choice, ip_version=IPVersion.V4Only, use_asyncio=False
            )
        except (OSError, RuntimeError) as e:
            raise P2pfsError(
                f"mDNS discovery cannot start ({e}); set discovery = false in config.toml"
            ) from e

    async def _register(self, zc: zeroconf.Zeroconf, info: ServiceInfo) -> None:
        try:
            await trio.to_thread.run_sync(
                functools.partial(zc.register_service, info, allow_name_change=True),
                abandon_on_cancel=True,
            )
        except (zeroconf.Error, OSError) as e:
            log.warning("mDNS: could not announce this node (%s): peers will not find it", e)
            return
        if info.name != self.instance_name:
            log.warning(
                "mDNS: another node announces %s; renamed to %s", self.instance_name, info.name
            )
        log.debug("mDNS: announced %s", info.name)

    @staticmethod
    def _lookup(
        zc: zeroconf.Zeroconf, name: str
    ) -> tuple[dict[bytes, bytes | None], tuple[str, ...]] | None:
        """A service's TXT and IPv4 addresses, from the cache or by asking."""
        try:
            info = zc.get_service_info(SERVICE_TYPE, name, timeout=RESOLVE_TIMEOUT_MS)
        except (zeroconf.Error, ValueError, RuntimeError, OSError) as e:
            log.debug("mDNS: cannot resolve %r: %s", name, e)
            return None
        if info is None:
            return None
        return dict(info.properties), tuple(info.parsed_addresses(IPVersion.V4Only))

    @staticmethod
    def _close(zc: zeroconf.Zeroconf, browser: ServiceBrowser | None) -> None:
        if browser is not None:
            browser.cancel()
        zc.close()  # sends goodbyes for what it registered

    # -- the trio side --------------------------------------------------------------------

    def _deliver(
        self,
        send: trio.MemorySendChannel[tuple[str, ServiceStateChange]],
        name: str,
        change: ServiceStateChange,
    ) -> None:
        """Runs in the trio thread (from ``run_sync_soon``): must never raise."""
        try:
            send.send_nowait((name, change))
        except trio.WouldBlock:
            self._stats["dropped_events"] += 1
            log.debug("mDNS: event queue full, dropping %s %r", change.name, name)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    def _on_event(
        self,
        nursery: trio.Nursery,
        zc: zeroconf.Zeroconf,
        name: str,
        change: ServiceStateChange,
        on_candidate: Callable[[Candidate], None],
        on_lost: Callable[[bytes], None] | None,
    ) -> None:
        self._stats["events"] += 1
        if change is ServiceStateChange.Removed:
            self._tickets.pop(name, None)
            self._forget(name, on_lost)
            return
        if name not in self._tickets and len(self._tickets) >= MAX_NAMES:
            self._stats["ignored"] += 1
            log.debug("mDNS: tracking %d names already, ignoring %r", MAX_NAMES, name)
            return
        self._events += 1
        self._tickets[name] = self._events
        if name not in self._resolving:
            self._resolving.add(name)
            nursery.start_soon(self._resolve, zc, name, on_candidate)

    async def _resolve(
        self, zc: zeroconf.Zeroconf, name: str, on_candidate: Callable[[Candidate], None]
    ) -> None:
        attempt = 0
        try:
            while (ticket := self._tickets.get(name)) is not None:
                found = await trio.to_thread.run_sync(
                    self._lookup, zc, name, limiter=self._limiter, abandon_on_cancel=True
                )
                if self._tickets.get(name) != ticket:
                    continue  # removed or changed again meanwhile: look again (or stop)
                if found is None:
                    # A lost answer (a busy link, every node starting at once) must not
                    # hide a peer for good: zeroconf sends no new event for a name it
                    # already has, so we ask again, backing off, while it is live.
                    self._stats["unresolved"] += 1
                    attempt += 1
                    if attempt >= RESOLVE_ATTEMPTS:
                        log.debug("mDNS: %r did not resolve; giving up", name)
                        del self._tickets[name]
                        return
                    log.debug("mDNS: %r did not resolve; asking again", name)
                    await trio.sleep(min(RESOLVE_BACKOFF_MAX_S, 2.0**attempt))
                    continue
                self._accept(name, *found, on_candidate)
                return
        finally:
            self._resolving.discard(name)

    def _accept(
        self,
        name: str,
        properties: dict[bytes, bytes | None],
        addresses: tuple[str, ...],
        on_candidate: Callable[[Candidate], None],
    ) -> None:
        try:
            cand = parse_candidate(name, properties, addresses, self._networks)
        except ValueError as e:
            self._stats["ignored"] += 1
            log.debug("mDNS: ignoring %r: %s", name, e)
            return
        if cand.node_id == self.node_id:
            return
        if cand.estate_id != self.estate_id:
            self._stats["ignored"] += 1
            log.debug(
                "mDNS: ignoring %r (node %s): estate %s is not ours",
                name,
                cand.node_id.hex(),
                cand.estate_id.hex(),
            )
            return
        if cand.version != PROTOCOL_VERSION:
            self._stats["ignored"] += 1
            log.debug(
                "mDNS: ignoring %r (node %s): protocol version %d, ours is %d",
                name,
                cand.node_id.hex(),
                cand.version,
                PROTOCOL_VERSION,
            )
            return
        if cand.node_id not in self._view and len(self._view) >= MAX_PEERS:
            self._stats["ignored"] += 1
            log.debug("mDNS: %d peers known already, ignoring %r", MAX_PEERS, name)
            return
        # One node, one name: a node id seen under a new name moves there.
        old_name = self._name_of.get(cand.node_id)
        if old_name is not None and old_name != name:
            self._node_of.pop(old_name, None)
        old_node = self._node_of.get(name)
        if old_node is not None and old_node != cand.node_id:
            self._view.pop(old_node, None)
            self._name_of.pop(old_node, None)
        self._name_of[cand.node_id] = name
        self._node_of[name] = cand.node_id
        previous = self._view.get(cand.node_id)
        self._view[cand.node_id] = cand
        if previous != cand:
            log.info("mDNS: peer %s at %s:%d", cand.node_id.hex()[:16], cand.address, cand.port)
            on_candidate(cand)

    def _forget(self, name: str, on_lost: Callable[[bytes], None] | None) -> None:
        node_id = self._node_of.pop(name, None)
        if node_id is None:
            return
        self._name_of.pop(node_id, None)
        if self._view.pop(node_id, None) is not None:
            log.info("mDNS: peer %s said goodbye", node_id.hex()[:16])
            if on_lost is not None:
                on_lost(node_id)


# -- a probe to run by hand or in the lab: `python -m p2pfs.net.discovery NODE ESTATE PORT` ------


def main(argv: list[str] | None = None) -> int:
    """Run one Discovery and print a JSON line per event (``time`` is ``time.monotonic()``)."""
    ap = argparse.ArgumentParser(prog="python -m p2pfs.net.discovery")
    ap.add_argument("node", help="node id, hex")
    ap.add_argument("estate", help="estate id, hex")
    ap.add_argument("port", type=int)
    ap.add_argument("--interface", action="append", help="interface name or IPv4 address")
    ap.add_argument("--protocol-version", type=int, help="announce another version (tests)")
    ap.add_argument("--debug", action="store_true", help="debug log on stderr")
    args = ap.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("zeroconf").setLevel(logging.INFO)
    if args.protocol_version is not None:
        global PROTOCOL_VERSION
        PROTOCOL_VERSION = args.protocol_version
    disc = Discovery(
        bytes.fromhex(args.node), bytes.fromhex(args.estate), args.port, interfaces=args.interface
    )

    def emit(event: str, **fields: object) -> None:
        print(json.dumps({"event": event, "time": time.monotonic(), **fields}), flush=True)

    def found(c: Candidate) -> None:
        emit(
            "found",
            node=c.node_id.hex(),
            estate=c.estate_id.hex(),
            version=c.version,
            address=c.address,
            port=c.port,
        )

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                emit("starting")
                await nursery.start(
                    functools.partial(
                        disc.run, found, on_lost=lambda node: emit("lost", node=node.hex())
                    )
                )
                emit("started", addresses=disc.addresses)
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break
        emit("stopped", **dataclasses.asdict(disc.statistics()))

    trio.run(run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
