"""The node on the network: listener, dialer, discovery, and the protocol's handlers.

Every connection is TLS 1.3 with mutual authentication against the estate CA;
right after the handshake the peer's certificate yields its node id, and a
revoked or unknown certificate ends the connection before a single frame is
read or sent, so a machine outside the estate learns nothing. Then both sides
send ``hello``; the connection serves requests both ways until it breaks.

Followers learn volumes from hellos and announces; what to do with a newer
snapshot is the daemon's business (``LocalNode.on_volume_head``).

Private volumes (trust/access.py): a peer hears only of volumes it may read or
cache. Hellos, announces and snapshot answers leave the others out; ``get`` and
``have`` treat an id tagged with a volume the asker may not see as absent; each
peer gets a digest of what it may see. Acting as a chunk's home, the node fetches
for a peer only ids its followed private volumes vouch for, or else asks only the
publishers (no cache stuffing).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from p2pfs.config import Config
from p2pfs.errors import MissingChunk, P2pfsError
from p2pfs.store.cas import Store
from p2pfs.trust.access import MAX_ACCESS_LIST
from p2pfs.trust.estate import Estate
from p2pfs.trust.revocation import MAX_REVOCATION_LIST
from p2pfs.trust.tlsstream import TLSStream

from . import messages, wire
from .admission import PRE_AUTH_TIMEOUT, Door, back_off
from .connection import Connection, PeerUnavailable
from .digest import Bloom, Digests
from .discovery import Candidate, Discovery, local_ipv4_networks
from .fetcher import Fetcher, FetchStats
from .keepalive import keep_alive, set_user_timeout
from .messages import Hello, VolumeHead
from .peers import Peer, PeerStats, PeerTable

log = logging.getLogger(__name__)

HANDSHAKE_TIMEOUT = 10.0  # a peer we dialled
CONNECT_TIMEOUT = 5.0
REQUEST_TIMEOUT = 10.0
DIGEST_INTERVAL = 2.0  # at most one digest per this many seconds, and only when the store changed
MAX_CONNECTIONS = 256
RETRY_MIN, RETRY_MAX = 1.0, 10.0


class LocalNode(Protocol):
    """What the network needs from the daemon."""

    def volume_heads(self) -> list[VolumeHead]: ...

    def snapshot_for(self, volume_id: bytes) -> tuple[VolumeHead, bytes] | None: ...

    async def on_volume_head(self, peer: Peer, head: VolumeHead) -> None: ...

    def on_revocations_changed(self) -> None: ...

    def on_access_changed(self) -> None: ...


@dataclass(frozen=True)
class NetworkStats:
    port: int
    peers: tuple[PeerStats, ...]
    quarantined_peers: int
    bytes_served: int
    chunks_served: int
    connections_refused: int
    connections_dropped: int  # not yet authenticated, dropped at the door (MaxStartups)
    protocol_errors: int  # connections closed because the peer broke the protocol
    fetch: FetchStats
    peers_from_hints: int = 0  # peers first heard of in another peer's hello


class _NotForThisPeer(Exception):
    """The id belongs to a private volume the asking peer may not see."""


class Network:
    def __init__(
        self,
        estate: Estate,
        store: Store,
        local: LocalNode,
        config: Config,
        *,
        disk: trio.CapacityLimiter | None = None,
    ) -> None:
        self.estate = estate
        self.store = store
        self.local = local
        self.config = config
        self.table = PeerTable(site=config.site)  # homes are chosen within our site
        self.fetcher = Fetcher(
            estate.node_id,
            self.table,
            self,
            deadline_s=config.fetch_deadline_s,
            hedge_after_s=config.hedge_after_s,
            others=config.peers_without_digest,
            peer_fetch=config.peer_fetch,
            store=store,
            on_stored=self.store_changed,
            disk=disk,
        )
        self.port = 0
        self.bytes_served = 0
        self.chunks_served = 0
        self.connections_refused = 0
        self.protocol_errors = 0
        self.hints_taken = 0  # peers first heard of from another's hello
        self._networks: list[ipaddress.IPv4Network] = []  # ours: where hints may point
        self._nursery: trio.Nursery | None = None
        # Inbound and outbound sessions have their own slots: a flood of strangers
        # must not stop us from redialling the peers we lost.
        self._in_slots = trio.Semaphore(MAX_CONNECTIONS)
        self._out_slots = trio.Semaphore(MAX_CONNECTIONS)
        self.door = Door()
        self._dialing: set[bytes] = set()
        self._store_changed = trio.Event()
        self.digests = Digests(store)
        self.on_peer_change: Callable[[], None] = lambda: None
        # The node's summary for the estate view, as the asking peer may see it (set by
        # the daemon; node/summary.py).
        self.summary: Callable[[bytes], Awaitable[bytes]] | None = None
        # Test hooks, armed only through the admin control operation of a daemon started
        # with --debug-faults: "serve-unverified" plays a faulty peer that sends what its
        # disk holds without checking it.
        self.faults: set[str] = set()

    @property
    def node_id(self) -> bytes:
        return self.estate.node_id

    # -- lifecycle ---------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(self.config.port, host=self.config.listen)
        self.port = listeners[0].socket.getsockname()[1]
        self._networks = await trio.to_thread.run_sync(local_ipv4_networks)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            await nursery.start(self.fetcher.run)
            nursery.start_soon(trio.serve_listeners, self._accept, listeners)
            if self.config.discovery:
                discovery = Discovery(self.node_id, self.estate.estate_id, self.port)
                await nursery.start(discovery.run, self._on_candidate)
            for host, port in self.config.static_peers:
                nursery.start_soon(self._static_peer, host, port)
            nursery.start_soon(self._digest_loop)
            log.info("listening for peers on port %d", self.port)
            task_status.started(self.port)

    def store_changed(self) -> None:
        self._store_changed.set()

    # -- connecting --------------------------------------------------------------

    def _on_candidate(self, cand: Candidate) -> None:
        if cand.node_id == self.node_id or self._nursery is None:
            return
        peer = self.table.get(cand.node_id)
        peer.address, peer.port = cand.address, cand.port
        if peer.conn is None and not peer.quarantined and cand.node_id not in self._dialing:
            self._nursery.start_soon(self._keep_connected, peer)

    async def _static_peer(self, host: str, port: int) -> None:
        """A configured peer: dial until it answers; its certificate tells who it is."""
        delay = RETRY_MIN
        while True:
            try:
                await self._dial(host, port, expect=None)
                delay = RETRY_MIN
            except Exception as e:  # a peer must never take the node down
                log.debug("static peer %s:%d: %s", host, port, e)
                delay = min(RETRY_MAX, delay * 2)
            await trio.sleep(delay * random.uniform(0.8, 1.2))

    async def _keep_connected(self, peer: Peer) -> None:
        self._dialing.add(peer.node_id)
        delay = RETRY_MIN
        try:
            while not peer.quarantined and peer.address is not None:
                if peer.backoff_until > trio.current_time():
                    await trio.sleep_until(peer.backoff_until)
                    continue
                if peer.conn is None:
                    assert peer.port is not None
                    try:
                        await self._dial(peer.address, peer.port, expect=peer.node_id)
                        delay = RETRY_MIN
                    except Exception as e:  # a peer must never take the node down
                        if not isinstance(e, OSError | P2pfsError | trio.BrokenResourceError):
                            log.exception("connection to %s failed", peer.node_id.hex())
                        peer.last_error = str(e) or type(e).__name__
                        if peer.state != "rejected":
                            peer.state = "unreachable"
                        delay = min(RETRY_MAX, delay * 2)
                        log.debug("peer %s: %s", peer.node_id.hex(), peer.last_error)
                    self.on_peer_change()
                await trio.sleep(delay * random.uniform(0.8, 1.2))
        finally:
            self._dialing.discard(peer.node_id)

    async def _dial(self, host: str, port: int, *, expect: bytes | None) -> None:
        if expect is not None:
            self.table.get(expect).state = "connecting"
        with trio.fail_after(CONNECT_TIMEOUT):
            tcp = await trio.open_tcp_stream(host, port)
        set_user_timeout(tcp, self.config.keepalive_s)
        stream = TLSStream(tcp, self.estate.client_context(), server_side=False)
        async with self._out_slots:
            await self._session(stream, address=host, port=port, expect=expect)

    async def _accept(self, tcp: trio.SocketStream) -> None:
        try:
            addr = tcp.socket.getpeername()[0]
        except OSError:
            addr = None
        authenticated = self.door.enter(addr) if self._in_slots.value else None
        if authenticated is None:
            await tcp.aclose()
            return

        set_user_timeout(tcp, self.config.keepalive_s)
        stream = TLSStream(tcp, self.estate.server_context(), server_side=True)
        try:
            async with self._in_slots:
                await self._session(
                    stream,
                    address=addr,
                    port=None,
                    expect=None,
                    inbound=True,
                    authenticated=authenticated,
                )
        except (OSError, P2pfsError, trio.BrokenResourceError, trio.TooSlowError) as e:
            log.debug("incoming connection from %s: %s", addr, e)
        except Exception:  # a peer must never take the node down
            log.exception("incoming connection from %s failed", addr)
        finally:
            authenticated()

    async def _session(
        self,
        stream: TLSStream,
        *,
        address: str | None,
        port: int | None,
        expect: bytes | None,
        inbound: bool = False,
        authenticated: Callable[[], None] = lambda: None,
    ) -> None:
        # (The caller holds an inbound or an outbound slot.)
        try:
            with trio.fail_after(PRE_AUTH_TIMEOUT if inbound else HANDSHAKE_TIMEOUT):
                await stream.do_handshake()
                der = stream.getpeercert(binary_form=True)
                if not der:
                    raise P2pfsError("peer sent no certificate")
                peer_id = self.estate.peer_node_id(der)
        except (trio.BrokenResourceError, trio.TooSlowError, P2pfsError) as e:
            self.connections_refused += 1
            if expect is not None:
                peer = self.table.get(expect)
                peer.state = "rejected"
                peer.last_error = f"TLS: {e}"
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()
            raise P2pfsError(f"TLS with {address} failed: {e}") from None
        finally:
            authenticated()
        if peer_id == self.node_id:
            await stream.aclose()
            return
        if expect is not None and peer_id != expect:
            log.warning("%s answered as %s, not %s", address, peer_id.hex(), expect.hex())
        peer = self.table.get(peer_id)
        if peer.quarantined:
            await stream.aclose()
            return
        if peer.backoff_until > trio.current_time():
            self.connections_refused += 1
            await stream.aclose()
            return
        if port is not None:
            peer.address, peer.port = address, port
        elif peer.address is None:
            peer.address = address
        peer.state = "connecting"
        conn = Connection(
            stream,
            peer_id,
            on_request=self._on_request,
            on_notice=self._on_notice,
            frame_timeout=self.config.frame_timeout_s,
        )
        await self._run_conn(peer, conn)

    async def _run_conn(self, peer: Peer, conn: Connection) -> None:
        peer.conns.append(conn)
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._greet, conn)
                nursery.start_soon(keep_alive, conn, self.config.keepalive_s)
                await conn.run()
                nursery.cancel_scope.cancel()
        finally:
            peer.conns.remove(conn)
            if not peer.quarantined and peer.state != "rejected" and peer.conn is None:
                peer.state = "unreachable" if peer.address else "candidate"
                peer.last_error = conn.close_reason
            if conn.broke_protocol:
                self.protocol_errors += 1
                back_off(peer, conn.close_reason)
            self.on_peer_change()

    async def _greet(self, conn: Connection) -> None:
        """Each side speaks first with its hello; the other's must arrive in time."""
        try:
            await conn.send(self._hello(conn.peer_id).to_wire())
            await conn.send(*await self.digests.notice(self._visible(conn.peer_id)))
        except PeerUnavailable:
            return
        with trio.move_on_after(HANDSHAKE_TIMEOUT):
            await conn.ready.wait()
        if not conn.ready.is_set():
            conn.close_reason = "no hello in time"
            await conn.aclose()

    def may_see(self, peer_id: bytes, volume_id: bytes) -> bool:
        return self.estate.access.may_see(peer_id, volume_id)

    def _visible(self, peer_id: bytes) -> frozenset[bytes]:
        return self.estate.access.visible_private(peer_id)

    def _hello(self, peer_id: bytes) -> Hello:
        return Hello(
            node_id=self.node_id,
            estate_id=self.estate.estate_id,
            version=messages.PROTOCOL_VERSION,
            volumes=tuple(
                h for h in self.local.volume_heads() if self.may_see(peer_id, h.volume_id)
            ),
            revocation_number=self.estate.revocation_number,
            access_number=self.estate.access.number,
            port=self.port or None,
            peers=tuple(
                (p.node_id, p.address, p.port)
                for p in self.table.connected()[: messages.MAX_PEER_HINTS]
                if p.node_id != peer_id and p.address is not None and p.port is not None
            ),
            features=messages.FEATURES,
            site=self.config.site,
        )

    def _on_hints(self, hello: Hello) -> None:
        """Dial the peers a member names that we have not found ourselves.

        Only addresses on our own networks: a hostile member must not make us dial
        hosts elsewhere (TLS would refuse them, but the dial itself is the harm).
        """
        networks = self._networks
        for node_id, host, port in hello.peers:
            if node_id == self.node_id or not any(
                ipaddress.IPv4Address(host) in net for net in networks
            ):
                continue
            peer = self.table.peers.get(node_id)
            if peer is not None and (peer.address is not None or peer.quarantined):
                continue
            self.hints_taken += 1
            self._on_candidate(Candidate(node_id, self.estate.estate_id, 1, host, port))

    def _read_for(self, peer_id: bytes, cid: bytes) -> tuple[bytes | None, list[bytes]]:
        """(bytes or None if absent, the private volumes the id belongs to); blocking.
        _NotForThisPeer if it belongs only to volumes ``peer_id`` may not see."""
        vols = self.store.volumes_of(cid)
        if vols and not any(self.may_see(peer_id, v) for v in vols):
            raise _NotForThisPeer
        read = self._read_unverified if "serve-unverified" in self.faults else self.store.get
        try:
            return read(cid), vols
        except MissingChunk:
            return None, vols

    # -- handling ---------------------------------------------------------------

    async def _on_request(
        self, conn: Connection, header: dict[str, Any], payload: bytes
    ) -> tuple[dict[str, Any], bytes]:
        rid = messages.request_id(header)
        kind = header["t"]
        if kind == "get":
            cid = messages.parse_get(header)
            try:
                stored, vols = await trio.to_thread.run_sync(self._read_for, conn.peer_id, cid)
            except _NotForThisPeer:  # the same answer as for an id we never heard of
                return messages.answer(rid, error="missing"), b""
            except P2pfsError as e:  # corrupt here: quarantined by the store; say missing
                log.warning("not serving %s: %s", cid.hex(), e)
                return messages.answer(rid, error="missing"), b""
            if stored is None:
                if not messages.get_wants_fetch(header):
                    return messages.answer(rid, error="missing"), b""
                # We are this chunk's home: fetch it once, for everyone who asks (but
                # never through another home: no loops). An id no private volume we
                # follow vouches for is asked of the publishers only.
                try:
                    stored = await self.fetcher.fetch_for_peer(
                        conn, rid, header, origins_only=not vols
                    )
                except P2pfsError:
                    return messages.answer(rid, error="missing"), b""
            data = stored
            self.bytes_served += len(data)
            self.chunks_served += 1
            return messages.answer(rid), data
        if kind == "have":
            ids = messages.parse_have(header)
            peer_id = conn.peer_id

            def has(i: bytes) -> bool:
                vols = self.store.volumes_of(i)
                if vols and not any(self.may_see(peer_id, v) for v in vols):
                    return False
                return self.store.has(i)

            bits = await trio.to_thread.run_sync(lambda: [has(i) for i in ids])
            packed = bytearray((len(ids) + 7) // 8)
            for i, yes in enumerate(bits):
                if yes:
                    packed[i >> 3] |= 1 << (i & 7)
            return messages.answer(rid, bits=bytes(packed)), b""
        if kind == "snapshot":
            vid = messages.parse_snapshot(header)
            found = self.local.snapshot_for(vid) if self.may_see(conn.peer_id, vid) else None
            if found is None:
                return messages.answer(rid, error="unknown volume"), b""
            head, data = found
            return messages.answer(rid, vol=head.to_wire()), data
        if kind == "ping":
            return messages.answer(rid), b""
        if kind == "summary":
            if self.summary is None:
                return messages.answer(rid, error="no summary here"), b""
            return messages.answer(rid), await self.summary(conn.peer_id)
        if kind == "revocations":
            return messages.answer(rid, n=self.estate.revocation_number), (
                self.estate.revocation_list()
            )
        if kind == "access-list":
            return messages.answer(rid, n=self.estate.access.number), self.estate.access.encoded
        raise wire.ProtocolError(f"unknown request {kind!r}")

    def _read_unverified(self, cid: bytes) -> bytes:
        try:
            return self.store.path_of(cid).read_bytes()
        except FileNotFoundError:
            raise MissingChunk(f"chunk {cid.hex()} is not here") from None

    async def _on_notice(self, conn: Connection, header: dict[str, Any], payload: bytes) -> None:
        kind = header["t"]
        peer = self.table.get(conn.peer_id)
        if kind == "hello":
            hello = Hello.from_wire(header)
            if hello.node_id != conn.peer_id:
                raise wire.ProtocolError("hello names another node than the certificate")
            if hello.estate_id != self.estate.estate_id:
                raise wire.ProtocolError("hello names another estate")
            peer.hello = hello
            if peer.port is None and hello.port is not None and peer.address is not None:
                peer.port = hello.port  # (an inbound peer: now we can redial it)
            self._on_hints(hello)
            peer.state = "connected"
            conn.ready.set()
            peer.last_error = ""
            self.on_peer_change()
            if hello.revocation_number > self.estate.revocation_number:
                await self._pull_revocations(conn)
            elif hello.revocation_number < self.estate.revocation_number:
                await conn.send(messages.revoked_notice(self.estate.revocation_number))
            # Before its volumes: a grant that arrives with them must be in force.
            if hello.access_number > self.estate.access.number:
                await self._pull_access(conn)
            elif hello.access_number < self.estate.access.number:
                await conn.send(messages.access_notice(self.estate.access.number))
            for head in hello.volumes:
                await self.local.on_volume_head(peer, head)
        elif kind == "announce":
            await self.local.on_volume_head(peer, messages.parse_announce(header))
        elif kind == "digest":
            gen, k, _n = messages.parse_digest(header, payload)
            if gen > peer.digest_generation:
                peer.digest = Bloom(payload, k)
                peer.digest_generation = gen
        elif kind == "revoked" and messages.parse_revoked(header) > self.estate.revocation_number:
            await self._pull_revocations(conn)
        elif kind == "access" and messages.parse_access_notice(header) > self.estate.access.number:
            await self._pull_access(conn)

    async def _pull_signed(
        self,
        conn: Connection,
        request: str,
        limit: int,
        accept: Callable[[bytes], bool],
        changed: Callable[[], None],
    ) -> None:
        """Ask for a CA-signed list the peer says is newer; apply it if it is."""
        header, data = await conn.request({"t": request}, within=REQUEST_TIMEOUT)
        if messages.answer_error(header) is None and len(data) <= limit and accept(data):
            changed()

    async def _pull_access(self, conn: Connection) -> None:
        await self._pull_signed(
            conn,
            "access-list",
            MAX_ACCESS_LIST,
            self.estate.accept_access_list,
            self.access_changed,
        )

    def access_changed(self) -> None:
        """A newer access list is in force: pass it on, and tell every peer again what
        it may now see (a new grant shows it volumes; a revoked one stops hearing)."""
        self.local.on_access_changed()
        self.digests.forget()
        self.broadcast(messages.access_notice(self.estate.access.number))
        if self._nursery is None:
            return
        for peer in self.table.connected():
            conn = peer.conn
            if conn is not None:
                self._nursery.start_soon(self._regreet, conn)
        self.store_changed()  # each peer's digest again, for what it may see now

    async def _regreet(self, conn: Connection) -> None:
        with contextlib.suppress(PeerUnavailable):
            await conn.send(self._hello(conn.peer_id).to_wire())

    async def _pull_revocations(self, conn: Connection) -> None:
        await self._pull_signed(
            conn,
            "revocations",
            MAX_REVOCATION_LIST,
            self.estate.accept_revocation_list,
            self.revocations_changed,
        )

    def revocations_changed(self) -> None:
        """Drop revoked peers at once and pass the news on."""
        for peer in list(self.table.peers.values()):
            if self.estate.is_revoked(peer.node_id):
                peer.state = "rejected"
                peer.last_error = "revoked"
                for conn in list(peer.conns):
                    if self._nursery is not None:
                        self._nursery.start_soon(conn.aclose)
        self.local.on_revocations_changed()
        self.broadcast(messages.revoked_notice(self.estate.revocation_number))

    # -- quarantine --------------------------------------------------------------

    def quarantine(self, peer: Peer, reason: str) -> None:
        if peer.quarantined:
            return
        log.error("quarantining peer %s: %s", peer.node_id.hex(), reason)
        peer.state = "quarantined"
        peer.quarantine_reason = reason
        for conn in list(peer.conns):
            if self._nursery is not None:
                self._nursery.start_soon(conn.aclose)
        self.on_peer_change()

    # -- gossip ------------------------------------------------------------------

    def broadcast(
        self, header: dict[str, Any], payload: bytes = b"", *, volume: bytes | None = None
    ) -> None:
        """Send to every connected peer (about ``volume``: to those that may see it)."""
        if self._nursery is None:
            return
        for peer in self.table.connected():
            conn = peer.conn
            if conn is not None and (volume is None or self.may_see(peer.node_id, volume)):
                self._nursery.start_soon(self._send_quietly, conn, header, payload)

    async def _send_quietly(self, conn: Connection, header: dict[str, Any], payload: bytes) -> None:
        try:
            await conn.send(header, payload)
        except PeerUnavailable as e:
            log.debug("send to %s failed: %s", conn.peer_id.hex(), e)

    def announce(self, head: VolumeHead) -> None:
        self.broadcast(messages.announce(head), volume=head.volume_id)

    async def _digest_loop(self) -> None:
        """Refresh and push the digests when the store changed, at most every DIGEST_INTERVAL."""
        while True:
            await self._store_changed.wait()
            self._store_changed = trio.Event()
            await trio.sleep(DIGEST_INTERVAL)
            self.digests.renew()
            for peer in self.table.connected():
                conn = peer.conn
                if conn is not None and self._nursery is not None:
                    notice = await self.digests.notice(self._visible(peer.node_id))
                    self._nursery.start_soon(self._send_quietly, conn, *notice)

    # -- status ------------------------------------------------------------------

    def statistics(self) -> NetworkStats:
        return NetworkStats(
            port=self.port,
            peers=tuple(p.statistics() for p in self.table.peers.values()),
            quarantined_peers=len(self.table.quarantined()),
            bytes_served=self.bytes_served,
            chunks_served=self.chunks_served,
            connections_refused=self.connections_refused,
            connections_dropped=self.door.dropped,
            protocol_errors=self.protocol_errors,
            fetch=self.fetcher.statistics(),
            peers_from_hints=self.hints_taken,
        )
