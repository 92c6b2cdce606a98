"""The node process: store, volumes, the mount and the control socket, assembled.

``p2pfs daemon`` runs this in the foreground (what a systemd unit runs);
SIGTERM and SIGINT unmount cleanly and exit 0. ``p2pfs mount`` starts it
detached and waits for the readiness line it writes to ``ready_fd``; under
systemd (``Type=notify``) it tells systemd instead (``notify.py``). With
``[metrics] listen`` it serves Prometheus metrics (``metrics.py``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import trio

from p2pfs import config as config_mod
from p2pfs.chunking import chunker
from p2pfs.errors import Busy, P2pfsError
from p2pfs.fs import fuse
from p2pfs.fs.fuse import Operations as FuseOperations
from p2pfs.fs.mount import ReadyLine, check_mountpoint, mount_answers, set_readahead
from p2pfs.fs.page_cache import PageOffers
from p2pfs.fs.vfs import ROOT_INO, FileSystem, Head
from p2pfs.fsutil import locked
from p2pfs.home import Home
from p2pfs.keys import SigningKey
from p2pfs.net.following import VolumeSync
from p2pfs.net.link import parse_address
from p2pfs.net.service import Network
from p2pfs.objects.model import Snapshot
from p2pfs.origin.watch import OriginWatch
from p2pfs.store.cas import Store
from p2pfs.trust.estate import Estate, node_key
from p2pfs.trust.grants import approved_nodes
from p2pfs.volume.content import Content
from p2pfs.volume.pins import PinRegistry
from p2pfs.volume.registry import VolumeRecord, VolumeRegistry

from .control import ControlServer
from .desktop_api import DesktopServer
from .estate_view import EstateWatch
from .keeper import Keeper
from .live import LiveVolumes, work_dir
from .metrics import MetricsServer
from .notify import Notifier
from .operations import Operations
from .stalls import StallWatch
from .status import NodeStatus, VolumeInfo, daemon_info, read_disk

log = logging.getLogger(__name__)

DISK_THREADS = 4  # worker threads reading and writing the store at once
SWITCH_INTERVAL_S = 0.0005  # sys.setswitchinterval: see Daemon.run


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
        allow_other: bool = False,
    ) -> None:
        self.home = home
        self.read_only = read_only
        # Root's mounts are always open to all: Samba and the desktop's users read them.
        self.allow_other = allow_other or os.getuid() == 0
        self.live: LiveVolumes | None = None
        self.mountpoint = mountpoint
        self.ready = ReadyLine(ready_fd)
        self.debug_faults = debug_faults
        self.heads: dict[str, Head] = {}
        # Private volumes this node follows but cannot read (cache-only, or not granted
        # any more): name -> (snapshot id, snapshot, access, problem).
        self.unread: dict[str, tuple[bytes, Snapshot, str, str]] = {}
        self._node_key: SigningKey | None = None
        self.network: Network | None = None
        self.sync: VolumeSync | None = None
        self.origins: OriginWatch | None = None
        self.nursery: trio.Nursery | None = None
        self.started = time.time()
        self.mounted = False
        self.desktop_link: DesktopServer | None = None
        self.metrics: MetricsServer | None = None
        self.watch: EstateWatch | None = None
        self.fuse_ops: FuseOperations | None = None
        self.notifier = Notifier()
        self.stalls = StallWatch()

    def run(self) -> int:
        # A thread waiting for the GIL gets it after this long at the latest. CPython's
        # 5 ms made the page-cache thread and the store's workers wait on a busy event
        # loop for whole intervals (docs/architecture.md, "Concurrency").
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        try:
            return trio.run(self._main)
        except P2pfsError as e:
            self.ready.failed(e)
            self.notifier.send(f"STATUS=failed: {e}")
            raise
        finally:
            self.notifier.close()

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
        disk = trio.CapacityLimiter(DISK_THREADS)  # store reads and writes, from everyone
        if self.estate is not None:
            self.sync = VolumeSync(
                self.registry,
                store,
                self.estate,
                on_change=self._heads_changed,
                announce=lambda head: self.network.announce(head) if self.network else None,
                only=frozenset(self.config.follow_volumes),
            )
            self.network = Network(self.estate, store, self.sync, self.config, disk=disk)
            self.sync.access_changed = self._access_changed
        fetcher = self.network.fetcher if self.network else None
        self.content = Content(
            store,
            remote=fetcher.fetch_into_store if fetcher else None,
            chunk_cache_bytes=self.config.memory_cache_bytes,
            limiter=disk,
            rate=fetcher.rate if fetcher else None,
        )
        # An appliance shows .snapshots/ on its mount (which SMB shares) only as its policy
        # for desktops says; any other node always does.
        appliance = bool(self.config.appliance_listen)
        snapshots = self.config.desktop_snapshots or not appliance
        self.fs = FileSystem(
            self.content, lambda: self.heads, snapshots=snapshots, root_of=self.root_of
        )
        store.set_protector(self.fs.open_chunk_ids)
        self.origins = OriginWatch(
            self.home,
            self.registry,
            store,
            self.content,
            fetcher,
            self.sync,
            poll_s=self.config.origin_poll_s,
        )
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
            estate = self.estate
            self.live.open(lambda vid: estate is not None and estate.access.is_private(vid))
        self.keeper = Keeper(
            self.content,
            store,
            PinRegistry(self.home),
            lambda: {n: (h.snapshot_id, h.snapshot, h.root) for n, h in self.heads.items()},
            fetcher.fetch_into_store if fetcher else None,
            self.home.root / "scrub.json",
            scrub_interval_s=self.config.scrub_interval_s,
            scrub_rate_bytes_s=self.config.scrub_rate_bytes_s,
        )
        await self.reload_heads()
        home = self.home
        self.watch = EstateWatch(
            self.status,
            self.network,
            name=self.config.node_name,
            site=self.config.site,
            approved=lambda: approved_nodes(home) if self.estate and self.estate.is_admin else [],
        )
        control = ControlServer(self.home.control_socket)
        Operations(self).register(control, debug_faults=self.debug_faults)
        await self._bind_desktop_link(control)
        if self.config.metrics_listen is not None:
            self.metrics = MetricsServer(self.config.metrics_listen, self.status)
            await self.metrics.listen()
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            await nursery.start(self.stalls.run)
            self.fs.attach(nursery)
            await nursery.start(self.notifier.run, self.describe)
            await nursery.start(control.run)
            if self.desktop_link is not None:
                await nursery.start(self.desktop_link.run)
            await nursery.start(self.keeper.run)
            await nursery.start(self.watch.run)
            if self.live is not None:
                await nursery.start(self.live.run)
            for name in self.heads:
                if await trio.to_thread.run_sync(self.registry.is_publisher, name):
                    nursery.start_soon(self._keep_published, name)
            nursery.start_soon(self._signals, nursery.cancel_scope)
            assert self.origins is not None
            await nursery.start(self.origins.run)
            if self.network is not None:
                await nursery.start(self.network.run)
            else:
                log.info("this node has joined no estate: serving local volumes only")
            if self.metrics is not None:
                await nursery.start(self.metrics.run)
            if self.mountpoint is not None:
                await self._mount(nursery)
            log.info("node %s ready (pid %d)", self.home.node_id().hex(), os.getpid())
            self.ready.ok()
            self.notifier.ready(self.describe())
        self.nursery = None
        self.notifier.stopping()
        if self.mounted:
            fuse.close(unmount=True)
            self.mounted = False
            log.info("unmounted %s", self.mountpoint)
        if self.live is not None:
            # What was written and closed becomes a snapshot now rather than at next start.
            # Keepalives go on meanwhile, and push systemd's stop timeout on: a long last
            # commit is not a wedged daemon (a wedged loop stops pushing and is killed).
            async with trio.open_nursery() as keepalive:
                keepalive.start_soon(self.notifier.run)
                await self.live.commit_all()
                keepalive.cancel_scope.cancel()
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
            snapshots=self.config.desktop_snapshots,
            root_of=self.root_of,
            frame_timeout=self.config.frame_timeout_s,
        )
        await self.desktop_link.listen()

    async def _keep_published(self, name: str) -> bool:
        """Pin a volume published here as its origin; True once done (a writable
        volume's work-tree pins may then go)."""
        try:
            await self.keeper.keep_published(name)
        except P2pfsError as e:
            log.error("could not pin volume %s on its publisher: %s", name, e)
            return False
        return True

    async def _mount(self, nursery: trio.Nursery) -> None:
        assert self.mountpoint is not None
        try:
            self.fuse_ops = fuse.init(self.fs, str(self.mountpoint), allow_other=self.allow_other)
        except RuntimeError as e:
            raise Busy(f"cannot mount on {self.mountpoint}: {e}") from None
        self.mounted = True
        if self.fuse_ops.pages is not None:
            self.fs.page_offers = PageOffers(self.fuse_ops.pages.offer)

        async def serve_then_stop() -> None:
            await fuse.serve()
            # Unmounted from outside (fusermount3 -u) or terminated: the node is done.
            nursery.cancel_scope.cancel()

        nursery.start_soon(serve_then_stop)
        # The kernel answers stat() on the mountpoint only once the session is up.
        await trio.to_thread.run_sync(set_readahead, self.mountpoint)
        # Ready means a reader can use the mount: it answers, through this session.
        await trio.to_thread.run_sync(mount_answers, self.mountpoint)
        log.info("mounted on %s", self.mountpoint)

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for signum in signals:
                log.info("got %s: unmounting and stopping", signal.Signals(signum).name)
                self.notifier.stopping()
                self.stop(scope)
                return

    def stop(self, scope: trio.CancelScope | None = None) -> None:
        if self.mounted:
            fuse.terminate()
        if scope is None and self.nursery is not None:
            scope = self.nursery.cancel_scope
        if scope is not None:
            scope.cancel()

    async def _heads_changed(self, names: list[str]) -> None:
        await self.reload_heads()

    async def _committed(self, name: str) -> None:
        """A commit moved a writable volume's head: show it and announce it."""
        await self.reload_heads(keep_published=False)

    def _read_heads(self) -> list[tuple[str, VolumeRecord | None, Snapshot | None, bool]]:
        """(name, record, verified head, published here) of every volume; blocking.

        A volume that cannot be read has no record (its error is logged)."""
        out: list[tuple[str, VolumeRecord | None, Snapshot | None, bool]] = []
        for name in self.registry.names():
            try:
                record = self.registry.get(name)
                snap = self.registry.load_head(self.store, record)
            except P2pfsError as e:
                log.error("volume %s unavailable: %s", name, e)
                out.append((name, None, None, False))
                continue
            out.append((name, record, snap, self.registry.is_publisher(name)))
        return out

    def _access_changed(self) -> None:
        # A grant may open volumes here now, a revocation close them: look again.
        if self.nursery is not None:
            self.nursery.start_soon(self.reload_heads)

    def access_of(self, volume_id: bytes) -> str:
        """This node's access to a volume: public, reader, cache-only or none."""
        if self.estate is None:
            return "public"
        va = self.estate.access.of(volume_id)
        return "public" if va is None else va.role_of(self.estate.node_id)

    def root_of(self, snap: Snapshot) -> bytes:
        """The root ref of ``snap``: a private one's root key opens with its epoch's
        secret, which this node holds only if it is granted to read the volume."""
        if not snap.private:
            return snap.root
        if self.estate is None:
            raise P2pfsError("a private volume is read only within its estate")
        if self._node_key is None:
            self._node_key = node_key(self.home)
        return self.estate.access.root_of(snap, self._node_key, self.estate.node_id)

    async def reload_heads(self, *, keep_published: bool = True) -> list[str]:
        """Load every volume's verified head (reads in a worker thread, the switch at
        one instant on the event loop); returns the names whose head changed."""
        read = await trio.to_thread.run_sync(self._read_heads)
        unread: dict[str, tuple[bytes, Snapshot, str, str]] = {}
        cache_changed: list[str] = []
        changed = []
        fresh: dict[str, Head] = {}
        records: dict[str, VolumeRecord] = {}
        publishing: set[str] = set()
        for name, record, snap, published in read:
            if record is None:
                old = self.heads.get(name)
                if old is not None:
                    fresh[name] = old
                continue
            records[name] = record
            if published:
                publishing.add(name)
            if snap is None or record.head is None:
                continue
            access = self.access_of(snap.volume_id)
            try:
                root = self.root_of(snap)
            except P2pfsError as e:
                problem = f"snapshot {snap.seq} is not readable here: {e}"
                if access == "none":
                    problem = (
                        "this node is no longer granted this volume: it cannot read it "
                        "and gets no newer snapshot"
                    )
                old_unread = self.unread.get(name)
                unread[name] = (record.head, snap, access, problem)
                if access == "cache-only" and (old_unread is None or old_unread[0] != record.head):
                    cache_changed.append(name)
                continue
            if access == "none":
                unread[name] = (
                    record.head,
                    snap,
                    access,
                    "this node is no longer granted this volume: it gets no newer snapshot",
                )
            fresh[name] = Head(record.head, snap, root)
            old = self.heads.get(name)
            if old is None or old.snapshot_id != record.head:
                changed.append(name)
        gone = [n for n in self.heads if n not in fresh]
        if self.origins is not None:
            heads = {name: snap for name, _, snap, _ in read if snap is not None}
            self.origins.heads_changed(heads, publishing, changed)
        self.heads = fresh
        self.unread = unread
        if self.nursery is not None:
            for name in cache_changed:
                sid, snap, _, _ = unread[name]
                self.nursery.start_soon(self.keeper.keep_cached, name, sid, snap)
        if changed and self.nursery is not None:
            self.nursery.start_soon(self.keeper.follow, changed)
            for name in changed:
                if keep_published and name in publishing:
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
                if name in publishing:
                    head = self.sync.head_of(records[name])
                    if head is not None and head.endorsement is not None:
                        self.network.announce(head)
        if self.mounted:
            for name in changed + gone:
                if name not in writable:  # a writable volume's root inode never changes
                    fuse.invalidate_entry(ROOT_INO, name.encode())
        return changed

    # -- status ------------------------------------------------------------------

    def describe(self) -> str:
        """One line for ``systemctl status``: peers connected, volumes, the mount."""
        parts = []
        if self.network is not None:
            n = len(self.network.table.connected())
            parts.append(f"{n} peer{'s' * (n != 1)}")
        parts.append(f"{len(self.heads)} volume{'s' * (len(self.heads) != 1)}")
        if self.mounted:
            parts.append(f"mounted on {self.mountpoint}")
        return ", ".join(parts)

    async def status(self) -> NodeStatus:
        """The node's status, from every service's statistics (disk parts in a thread)."""
        disk = await trio.to_thread.run_sync(read_disk, self.home, self.store)
        link = self.desktop_link
        return NodeStatus(
            disk=disk,
            volumes=self._volumes(),
            estate=self.estate.estate_id.hex() if self.estate else None,
            daemon=daemon_info(
                self.started,
                str(self.mountpoint) if self.mounted else None,
                self.stalls.stalls,
                self.stalls.longest_s,
            ),
            content=self.content.statistics(),
            scrub=self.keeper.statistics(),
            fs=self.fs.statistics(),
            network=self.network.statistics() if self.network else None,
            sync=self.sync.statistics() if self.sync else None,
            desktop_link=await trio.to_thread.run_sync(link.statistics) if link else None,
            fuse=self.fuse_ops.statistics() if self.fuse_ops is not None else None,
            origins=self.origins.statistics() if self.origins is not None else None,
        )

    def _volumes(self) -> tuple[VolumeInfo, ...]:
        out = []
        writable = self.live.names if self.live is not None else []
        for name in sorted({*self.heads, *writable}):
            head = self.heads.get(name)
            live = self.live.statistics(name) if self.live is not None else None
            if head is not None:
                vid, seq, sid = (
                    head.snapshot.volume_id.hex(),
                    head.snapshot.seq,
                    head.snapshot_id.hex(),
                )
            else:  # a writable volume with nothing committed yet
                assert self.live is not None
                vid, seq, sid = self.live.volume_ids[name].hex(), 0, None
            note = self.unread.get(name)
            access = note[2] if note else self.access_of(bytes.fromhex(vid))
            out.append(
                VolumeInfo(
                    name, vid, seq, sid, name in writable, live, access, note[3] if note else None
                )
            )
        for name, (sid_b, snap, access, problem) in sorted(self.unread.items()):
            if name not in self.heads:
                out.append(
                    VolumeInfo(
                        name,
                        snap.volume_id.hex(),
                        snap.seq,
                        sid_b.hex(),
                        False,
                        None,
                        access,
                        problem,
                    )
                )
        return tuple(out)
