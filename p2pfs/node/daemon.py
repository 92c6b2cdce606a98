"""The node process: store, volumes, the mount and the control socket, assembled.

``p2pfs daemon`` runs this in the foreground (what a systemd unit runs);
SIGTERM and SIGINT unmount cleanly and exit 0. ``p2pfs mount`` starts it
detached and waits for the readiness line it writes to ``ready_fd``.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trio

from p2pfs import config as config_mod
from p2pfs.chunking import chunker
from p2pfs.errors import Busy, NotFound, P2pfsError, UsageError
from p2pfs.fs import fuse
from p2pfs.fs.mount import ReadyLine, check_mountpoint, set_readahead
from p2pfs.fs.vfs import ROOT_INO, FileSystem, Head
from p2pfs.fsutil import locked
from p2pfs.home import Home
from p2pfs.net.following import VolumeSync
from p2pfs.net.link import parse_address
from p2pfs.net.service import Network
from p2pfs.store.cas import QuotaExceeded, Store
from p2pfs.trust.estate import Estate
from p2pfs.volume.content import Content
from p2pfs.volume.pins import PinRegistry, normalize_path
from p2pfs.volume.registry import VolumeRegistry

from .control import AFTER_REPLY, ControlServer
from .desktop_api import DesktopServer
from .keeper import Keeper
from .live import LiveVolumes, work_dir

log = logging.getLogger(__name__)


@contextlib.contextmanager
def pid_lock(home: Home) -> Iterator[None]:
    """One daemon per home: an flock on the pid file, released by the kernel on exit."""
    home.run_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.ExitStack() as stack:
        try:
            fd = stack.enter_context(locked(home.pid_file, blocking=False))
        except BlockingIOError:
            pid = home.pid_file.read_text(errors="replace").strip() or "?"
            raise Busy(f"a p2pfs daemon (pid {pid}) is already running for {home.root}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield


class Daemon:
    def __init__(
        self,
        home: Home,
        mountpoint: Path | None,
        *,
        ready_fd: int | None = None,
        debug_faults: bool = False,
        read_only: bool = False,
    ) -> None:
        self.home = home
        self.read_only = read_only
        self.live: LiveVolumes | None = None
        self.mountpoint = mountpoint
        self.ready = ReadyLine(ready_fd)
        self.debug_faults = debug_faults
        self.heads: dict[str, Head] = {}
        self.network: Network | None = None
        self.sync: VolumeSync | None = None
        self.nursery: trio.Nursery | None = None
        self._inflight: dict[bytes, trio.Event] = {}
        self.started = time.time()
        self.mounted = False
        self.desktop_link: DesktopServer | None = None

    def run(self) -> int:
        try:
            return trio.run(self._main)
        except P2pfsError as e:
            self.ready.failed(e)
            raise

    async def _main(self) -> int:
        self.home.require()
        with pid_lock(self.home):
            chunker.self_test()
            if self.mountpoint is not None:
                check_mountpoint(self.mountpoint)
            store = Store(self.home.store_dir)
            try:
                return await self._serve(store)
            finally:
                store.close()

    async def _serve(self, store: Store) -> int:
        self.store = store
        self.registry = VolumeRegistry(self.home)
        self.config = config_mod.load(self.home.config_file)
        store.set_quota(self.config.cache_max_bytes, self.config.cache_min_free_bytes)
        self.estate = Estate.load(self.home)
        self.content = Content(
            store,
            remote=self._fetch if self.estate else None,
            chunk_cache_bytes=self.config.memory_cache_bytes,
        )
        self.fs = FileSystem(self.content, lambda: self.heads)
        store.set_protector(self.fs.open_chunk_ids)
        if self.mountpoint is not None and not self.read_only:
            self.live = LiveVolumes(
                work_dir(self.home.root),
                self.registry,
                store,
                self.content,
                self.fs,
                self.config,
                self._committed,
                self._keep_published,
            )
            self.live.open()
        self.keeper = Keeper(
            self.content,
            store,
            PinRegistry(self.home),
            lambda: {n: (h.snapshot_id, h.snapshot) for n, h in self.heads.items()},
            self._fetch if self.estate else None,
            self.home.root / "scrub.json",
            scrub_interval_s=self.config.scrub_interval_s,
            scrub_rate_bytes_s=self.config.scrub_rate_bytes_s,
        )
        if self.estate is not None:
            self.sync = VolumeSync(
                self.registry,
                store,
                self.estate,
                on_change=self._heads_changed,
                announce=lambda head: self.network.announce(head) if self.network else None,
                only=frozenset(self.config.follow_volumes),
            )
            self.network = Network(self.estate, store, self.sync, self.config)
            # A peer that made us a chunk's home: fetch it (never via another home).
            self.network.fetch_for_peer = functools.partial(self._fetch, proxy=False)
        self.reload_heads()
        control = ControlServer(self.home.control_socket)
        self._register(control)
        await self._bind_desktop_link(control)
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            self.fs.attach(nursery)
            await nursery.start(control.run)
            if self.desktop_link is not None:
                await nursery.start(self.desktop_link.run)
            await nursery.start(self.keeper.run)
            if self.live is not None:
                await nursery.start(self.live.run)
            for name in self.heads:
                if self.registry.is_publisher(name):
                    nursery.start_soon(self._keep_published, name)
            nursery.start_soon(self._signals, nursery.cancel_scope)
            if self.network is not None:
                await nursery.start(self.network.run)
            else:
                log.info("this node has joined no estate: serving local volumes only")
            if self.mountpoint is not None:
                await self._mount(nursery)
            log.info("node %s ready (pid %d)", self.home.node_id().hex(), os.getpid())
            self.ready.ok()
        self.nursery = None
        if self.mounted:
            fuse.close(unmount=True)
            self.mounted = False
            log.info("unmounted %s", self.mountpoint)
        if self.live is not None:
            # What was written and closed becomes a snapshot now rather than at next start.
            await self.live.commit_all()
            self.live.close()
        return 0

    async def _bind_desktop_link(self, control: ControlServer) -> None:
        """Appliance mode: the user API for desktops ([appliance] user_listen), bound now
        so that a bad address is a clear start-up error."""
        if not self.config.appliance_listen:
            return
        self.desktop_link = DesktopServer(
            self.home,
            self.content,
            lambda: self.heads,
            control,
            [parse_address(a) for a in self.config.appliance_listen],
            allow_pin=self.config.desktop_pin,
            frame_timeout=self.config.frame_timeout_s,
        )
        await self.desktop_link.listen()

    async def _fetch(self, cid: bytes, *, proxy: bool = True) -> bytes:
        """A chunk or object the store lacks: fetched verified, stored, then returned.

        Our own reads and peers that made us the chunk's home share one fetch: a
        second fetch of a chunk already on its way would cost the origin a copy.
        """
        while (pending := self._inflight.get(cid)) is not None:
            await pending.wait()
            try:  # the fetch we waited for stored it
                return await trio.to_thread.run_sync(
                    self.store.get, cid, limiter=self.content.limiter
                )
            except P2pfsError:
                continue  # it failed, or could not be cached: fetch it ourselves
        event = self._inflight[cid] = trio.Event()
        try:
            return await self._fetch_once(cid, proxy=proxy)
        finally:
            del self._inflight[cid]
            event.set()

    async def _keep_published(self, name: str) -> bool:
        """Pin a volume published here as its origin; True once done (a writable
        volume's work-tree pins may then go)."""
        try:
            await self.keeper.keep_published(name)
        except P2pfsError as e:
            log.error("could not pin volume %s on its publisher: %s", name, e)
            return False
        return True

    async def _fetch_once(self, cid: bytes, *, proxy: bool) -> bytes:
        assert self.network is not None
        data, _peer = await self.network.fetcher.fetch(cid, proxy=proxy)
        try:
            await trio.to_thread.run_sync(
                functools.partial(
                    self.store.put, cid, data, verify=False, source="peer", durable=False
                ),
                limiter=self.content.limiter,
            )
        except QuotaExceeded as e:
            # Everything stored is pinned or in use: serve the read from memory, uncached.
            log.debug("not caching %s: %s", cid.hex(), e)
        else:
            self.network.store_changed()
        return data

    async def _mount(self, nursery: trio.Nursery) -> None:
        assert self.mountpoint is not None
        try:
            fuse.init(self.fs, str(self.mountpoint), allow_other=os.getuid() == 0)
        except RuntimeError as e:
            raise Busy(f"cannot mount on {self.mountpoint}: {e}") from None
        self.mounted = True

        async def serve_then_stop() -> None:
            await fuse.serve()
            # Unmounted from outside (fusermount3 -u) or terminated: the node is done.
            nursery.cancel_scope.cancel()

        nursery.start_soon(serve_then_stop)
        # The kernel answers stat() on the mountpoint only once the session is up.
        await trio.to_thread.run_sync(set_readahead, self.mountpoint)
        log.info("mounted on %s", self.mountpoint)

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("got %s: unmounting and stopping", signal.Signals(signum).name)
                self.stop(scope)
                return

    def stop(self, scope: trio.CancelScope | None = None) -> None:
        if self.mounted:
            fuse.terminate()
        if scope is None and self.nursery is not None:
            scope = self.nursery.cancel_scope
        if scope is not None:
            scope.cancel()

    def _heads_changed(self, names: list[str]) -> None:
        self.reload_heads()

    def _committed(self, name: str) -> None:
        """A commit moved a writable volume's head: show it and announce it."""
        self.reload_heads(keep_published=False)

    def reload_heads(self, *, keep_published: bool = True) -> list[str]:
        """Load every volume's verified head; returns the names whose head changed."""
        changed = []
        fresh: dict[str, Head] = {}
        for name in self.registry.names():
            try:
                record = self.registry.get(name)
                snap = self.registry.load_head(self.store, record)
            except P2pfsError as e:
                log.error("volume %s unavailable: %s", name, e)
                old = self.heads.get(name)
                if old is not None:
                    fresh[name] = old
                continue
            if snap is None or record.head is None:
                continue
            fresh[name] = Head(record.head, snap)
            old = self.heads.get(name)
            if old is None or old.snapshot_id != record.head:
                changed.append(name)
        gone = [n for n in self.heads if n not in fresh]
        self.heads = fresh
        if changed and self.nursery is not None:
            self.nursery.start_soon(self.keeper.follow, changed)
            for name in changed:
                if keep_published and self.registry.is_publisher(name):
                    self.nursery.start_soon(self._keep_published, name)
        writable = self.live.names if self.live is not None else []
        if self.live is not None:
            for name in changed:
                if self.live.head_changed(name):
                    log.info(
                        "volume %s: the mount now shows snapshot %d", name, fresh[name].snapshot.seq
                    )
        if self.network is not None and self.sync is not None:
            self.network.fetcher.origins = self.sync.origins()
            # (After shutdown, a final commit's snapshot reaches peers at next start.)
            for name in changed if self.nursery is not None else []:
                # A new snapshot made here (an import): tell the peers.
                if self.registry.is_publisher(name):
                    head = self.sync.head_of(self.registry.get(name))
                    if head is not None and head.endorsement is not None:
                        self.network.announce(head)
        if self.mounted:
            for name in changed + gone:
                if name not in writable:  # a writable volume's root inode never changes
                    fuse.invalidate_entry(ROOT_INO, name.encode())
        return changed

    # -- control operations -------------------------------------------------

    def _register(self, control: ControlServer) -> None:
        control.register("status", "user", self._op_status)
        control.register("peers", "user", self._op_peers)
        control.register("pin", "user", self._op_pin)
        control.register("pin-status", "user", self._op_pin_status)
        control.register("pin-cancel", "user", self._op_pin_cancel)
        control.register("unpin", "user", self._op_unpin)
        control.register("pins", "user", self._op_pins)
        control.register("log", "user", self._op_log)
        control.register("scrub", "user", self._op_scrub)
        control.register("fsck", "admin", self._op_fsck)
        control.register("reload", "admin", self._op_reload)
        control.register("commit", "admin", self._op_commit)
        control.register("stop", "admin", self._op_stop)
        if self.debug_faults:
            control.register("inject-fault", "admin", self._op_fault)

    async def _op_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return self.status()

    def _target(self, request: dict[str, Any]) -> tuple[str, str]:
        volume, path = request.get("volume"), request.get("path")
        if not isinstance(volume, str) or not isinstance(path, str):
            raise UsageError("pin requests name a volume and a path")
        return volume, normalize_path(path)

    async def _op_pin(self, request: dict[str, Any]) -> dict[str, Any]:
        volume, path = self._target(request)
        job = await self.keeper.pin(volume, path, follow=bool(request.get("follow")))
        return job.describe()

    async def _op_pin_status(self, request: dict[str, Any]) -> dict[str, Any]:
        volume, path = self._target(request)
        job = self.keeper.jobs.get(f"{volume}:{path}")
        if job is None:
            raise NotFound(f"no pin job for {volume}:{path}")
        return job.describe()

    async def _op_pin_cancel(self, request: dict[str, Any]) -> dict[str, Any]:
        volume, path = self._target(request)
        return self.keeper.cancel(f"{volume}:{path}").describe()

    async def _op_unpin(self, request: dict[str, Any]) -> dict[str, Any]:
        volume, path = self._target(request)
        record = await self.keeper.unpin(volume, path)
        return {"unpinned": record.name}

    async def _op_pins(self, request: dict[str, Any]) -> dict[str, Any]:
        return {"pins": self.keeper.describe_pins(), "offline_ready": self.keeper.offline_ready()}

    async def _op_log(self, request: dict[str, Any]) -> dict[str, Any]:
        volume = request.get("volume")
        if not isinstance(volume, str):
            raise UsageError("log names a volume")
        limit = request.get("limit", 100)
        if not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise UsageError("limit must be 1..100000")
        return {"volume": volume, "snapshots": await self.keeper.history(volume, limit)}

    async def _op_scrub(self, request: dict[str, Any]) -> dict[str, Any]:
        return await self.keeper.run_scrub()

    async def _op_fsck(self, request: dict[str, Any]) -> dict[str, Any]:
        report = await trio.to_thread.run_sync(
            functools.partial(self.store.fsck, repair=bool(request.get("repair")))
        )
        return {"clean": report.clean, "lines": report.lines()}

    async def _op_peers(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.network is None:
            return {"peers": [], "estate": None}
        assert self.estate is not None
        return {"peers": self.network.status()["peers"], "estate": self.estate.estate_id.hex()}

    async def _op_reload(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.estate is not None and self.network is not None:
            # `estate revoke` on this node wrote a newer list: apply and spread it.
            fresh = Estate.load(self.home)
            if (
                fresh is not None
                and fresh.revocation_number > self.estate.revocation_number
                and self.estate.accept_revocation_list(fresh.revocation_list())
            ):
                self.network.revocations_changed()
        return {"changed": self.reload_heads()}

    async def _op_commit(self, request: dict[str, Any]) -> dict[str, Any]:
        volume = request.get("volume")
        if not isinstance(volume, str):
            raise UsageError("commit names a volume")
        if self.live is None:
            reason = "--read-only" if self.read_only else "no mount"
            raise P2pfsError(f"this daemon has no writable volumes ({reason})")
        return (await self.live.commit(volume)).as_dict()

    async def _op_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        request[AFTER_REPLY] = self.stop
        return {"stopping": True}

    async def _op_fault(self, request: dict[str, Any]) -> dict[str, Any]:
        handler = str(request.get("handler", ""))
        # "net:NAME" arms a fault in the network layer, "publish:NAME" in every writable
        # volume's commits, anything else in a FUSE handler.
        faults, key = self.fs.faults, handler
        if handler.startswith("net:") and self.network is not None:
            faults, key = self.network.faults, handler.removeprefix("net:")
        if handler.startswith("publish:") and self.live is not None:
            key = handler.removeprefix("publish:")
            for publisher in self.live.publishers.values():
                if request.get("clear"):
                    publisher.faults.discard(key)
                else:
                    publisher.faults.add(key)
            return {"disarmed" if request.get("clear") else "armed": handler}
        if request.get("clear"):
            faults.discard(key)
            return {"disarmed": handler}
        faults.add(key)
        return {"armed": handler}

    def status(self) -> dict[str, Any]:
        stats = self.store.statistics()
        cache = self.content.chunks
        return {
            "node_id": self.home.node_id().hex(),
            "home": str(self.home.root),
            "daemon": {
                "pid": os.getpid(),
                "uptime_s": round(time.time() - self.started, 1),
                "mountpoint": str(self.mountpoint) if self.mounted else None,
            },
            "volumes": self._volumes_status(),
            "store": {
                "chunks": stats.chunks,
                "bytes": stats.bytes,
                "corrupt_chunks": stats.corrupt_chunks,
                "quarantined": stats.quarantined,
            },
            "memory_cache": {
                "bytes": cache.bytes,
                "hits": cache.stats.hits,
                "misses": cache.stats.misses,
                "evictions": cache.stats.evictions,
            },
            "cache": self._cache_status(),
            "offline_ready": self.keeper.offline_ready(),
            "pins": len(self.keeper.pins.all()),
            "scrub": self.keeper.status(),
            "fuse_errors": self.fs.errors,
            "inodes": self.fs.inode_count,
            **self._network_status(),
            **self._desktop_link_status(),
        }

    def _volumes_status(self) -> list[dict[str, Any]]:
        out = []
        writable = self.live.names if self.live is not None else []
        for name in sorted({*self.heads, *writable}):
            head = self.heads.get(name)
            entry: dict[str, Any] = {
                "name": name,
                "id": head.snapshot.volume_id.hex() if head else self.registry.get(name).id.hex(),
                "seq": head.snapshot.seq if head else 0,
                "snapshot": head.snapshot_id.hex() if head else None,
                "writable": name in writable,
            }
            if self.live is not None and name in writable:
                entry["live"] = self.live.status(name)
            out.append(entry)
        return out

    def _desktop_link_status(self) -> dict[str, Any]:
        link = self.desktop_link
        return {"desktop_link": link.status()} if link is not None else {}

    def _cache_status(self) -> dict[str, Any]:
        u = self.store.cache_usage()
        return {
            "bytes": u.bytes,
            "quota": u.quota,
            "max_bytes": u.max_bytes,
            "min_free_bytes": u.min_free_bytes,
            "pinned_bytes": u.pinned_bytes,
            "evictions": u.evictions,
        }

    def _network_status(self) -> dict[str, Any]:
        local = self.content.bytes_from_local
        if self.network is None or self.estate is None or self.sync is None:
            return {
                "estate": None,
                "peers": [],
                "bytes_from": {"local": local, "peers": 0, "origin": 0},
                "bytes_served": 0,
                "corrupt_chunks_rejected": 0,
                "quarantined_peers": 0,
            }
        net = self.network.status()
        fetch = self.network.fetcher.stats
        return {
            "estate": self.estate.estate_id.hex(),
            "port": net["port"],
            "peers": net["peers"],
            "bytes_from": {
                "local": local,
                "peers": fetch.bytes_from_peers,
                "origin": fetch.bytes_from_origin,
            },
            "bytes_served": net["bytes_served"],
            "chunks_served": net["chunks_served"],
            "corrupt_chunks_rejected": fetch.corrupt_chunks_rejected,
            "quarantined_peers": net["quarantined_peers"],
            "fetch": {
                "chunks": fetch.chunks_fetched,
                "hedged": fetch.hedged_requests,
                "failed": fetch.failed_fetches,
            },
            "connections_refused": net["connections_refused"],
            "snapshots": self.sync.status(),
        }
