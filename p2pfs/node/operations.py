"""The daemon's control API: each operation of the control socket (and, for its user face,
of the desktop link) as one method over the node's services.

Operations have two faces (DESIGN.md, Trust): *user* operations (status, peers,
pins, log, scrub) and *admin* operations (fsck, reload, commit, stop, fault
injection). ``register`` says which face each belongs to.
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

import trio

from p2pfs.errors import NotFound, P2pfsError, UsageError
from p2pfs.fs.vfs import FileSystem
from p2pfs.home import Home
from p2pfs.net.service import Network
from p2pfs.store.cas import Store
from p2pfs.trust.estate import Estate
from p2pfs.volume.pins import normalize_path

from .control import AFTER_REPLY, ControlServer, Handler, report_progress
from .estate_view import EstateWatch
from .keeper import Keeper
from .live import LiveVolumes
from .status import NodeStatus, peer_json


class Node(Protocol):
    """What the operations use of the running node (``daemon.Daemon``)."""

    home: Home
    store: Store
    estate: Estate | None
    network: Network | None
    keeper: Keeper
    live: LiveVolumes | None
    watch: EstateWatch | None
    fs: FileSystem
    read_only: bool

    def stop(self) -> None: ...
    async def status(self) -> NodeStatus: ...
    async def reload_heads(self, *, keep_published: bool = True) -> list[str]: ...


class Operations:
    """What the control socket can ask of a running node."""

    def __init__(self, node: Node) -> None:
        self.d = node
        self.stalls: dict[str, float] = {}  # operation -> seconds (debug faults only)

    def register(self, control: ControlServer, *, debug_faults: bool) -> None:
        def add(name: str, face: str, handler: Handler, **kind: bool) -> None:
            control.register(
                name, face, self._stallable(name, handler) if debug_faults else handler, **kind
            )

        add("status", "user", self._op_status)
        add("peers", "user", self._op_peers)
        # Every node of the estate, its volumes and traffic (`p2pfs web`): the admin's.
        add("estate", "admin", self._op_estate)
        # Long operations have no deadline (control.py): they take as long as the data.
        # Pin and log may fetch trees from peers; scrub reads the whole store. A client
        # that goes away cancels them: each stops cleanly at a checkpoint (a pin's job
        # fails and is resumable, a scrub saves what it counted).
        add("pin", "user", self._op_pin, long=True)
        add("pin-status", "user", self._op_pin_status)
        add("pin-cancel", "user", self._op_pin_cancel)
        add("unpin", "user", self._op_unpin)
        add("pins", "user", self._op_pins)
        add("log", "user", self._op_log, long=True)
        add("scrub", "user", self._op_scrub, long=True)
        # fsck runs in a worker thread, which cannot be stopped: cancelling it would only
        # throw its report away, so it runs to its end and its outcome is logged.
        add("fsck", "admin", self._op_fsck, long=True, runs_to_end=True)
        add("reload", "admin", self._op_reload)
        # A commit that has started runs to its end even when its client goes away:
        # cancelled at a checkpoint after its capture, it would leave the changes out of
        # the automatic commit's schedule until the next write, and cancelled after the
        # head moved it would skip announcing the snapshot. It is bounded by its data,
        # the user asked for it, and the automatic commit would do the same work anyway.
        add("commit", "admin", self._op_commit, long=True, runs_to_end=True)
        add("stop", "admin", self._op_stop)
        if debug_faults:
            control.register("inject-fault", "admin", self._op_fault)

    def _stallable(self, name: str, handler: Handler) -> Handler:
        """Test hook (daemon --debug-faults): ``inject-fault control:stall:OP seconds=N``
        makes operation OP take N seconds longer, to test deadlines and progress."""

        async def run(request: dict[str, Any]) -> Any:
            seconds = self.stalls.get(name)
            if seconds:
                report_progress(request, lambda: {"stage": "stalled by a debug fault"})
                await trio.sleep(seconds)
            return await handler(request)

        return run

    async def _op_status(self, request: dict[str, Any]) -> dict[str, Any]:
        return (await self.d.status()).to_json()

    async def _op_peers(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.d.network is None or self.d.estate is None:
            return {"peers": [], "estate": None}
        peers = self.d.network.statistics().peers
        return {"peers": [peer_json(p) for p in peers], "estate": self.d.estate.estate_id.hex()}

    async def _op_estate(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.d.watch is None:
            raise P2pfsError("the daemon is still starting")
        return await self.d.watch.view()

    async def _op_pins(self, request: dict[str, Any]) -> dict[str, Any]:
        pins = await self.d.keeper.describe_pins()
        return {"pins": pins, "offline_ready": all(p["complete"] for p in pins)}

    def _target(self, request: dict[str, Any]) -> tuple[str, str]:
        volume, path = request.get("volume"), request.get("path")
        if not isinstance(volume, str) or not isinstance(path, str):
            raise UsageError("pin requests name a volume and a path")
        return volume, normalize_path(path)

    async def _op_pin(self, request: dict[str, Any]) -> dict[str, Any]:
        volume, path = self._target(request)
        report_progress(request, lambda: {"stage": "resolving the paths"})
        job = await self.d.keeper.pin(volume, path, follow=bool(request.get("follow")))
        return job.describe()

    async def _op_pin_status(self, request: dict[str, Any]) -> dict[str, Any]:
        volume, path = self._target(request)
        job = self.d.keeper.jobs.get(f"{volume}:{path}")
        if job is None:
            raise NotFound(f"no pin job for {volume}:{path}")
        return job.describe()

    async def _op_pin_cancel(self, request: dict[str, Any]) -> dict[str, Any]:
        volume, path = self._target(request)
        return self.d.keeper.cancel(f"{volume}:{path}").describe()

    async def _op_unpin(self, request: dict[str, Any]) -> dict[str, Any]:
        volume, path = self._target(request)
        record = await self.d.keeper.unpin(volume, path)
        return {"unpinned": record.name}

    async def _op_log(self, request: dict[str, Any]) -> dict[str, Any]:
        volume = request.get("volume")
        if not isinstance(volume, str):
            raise UsageError("log names a volume")
        limit = request.get("limit", 100)
        if not isinstance(limit, int) or not 1 <= limit <= 100_000:
            raise UsageError("limit must be 1..100000")
        report_progress(request, lambda: {"stage": "reading snapshots"})
        return {"volume": volume, "snapshots": await self.d.keeper.history(volume, limit)}

    async def _op_scrub(self, request: dict[str, Any]) -> dict[str, Any]:
        keeper = self.d.keeper
        # A scrub already running (the periodic one) holds the lock: this one waits.
        report_progress(request, lambda: keeper.scrub_progress or {"stage": "waiting"})
        return await keeper.run_scrub()

    async def _op_fsck(self, request: dict[str, Any]) -> dict[str, Any]:
        stage = "repairing the index" if request.get("repair") else "checking index and files"
        report_progress(request, lambda: {"stage": stage})
        report = await trio.to_thread.run_sync(
            functools.partial(self.d.store.fsck, repair=bool(request.get("repair")))
        )
        return {"clean": report.clean, "lines": report.lines()}

    async def _op_reload(self, request: dict[str, Any]) -> dict[str, Any]:
        if self.d.estate is not None and self.d.network is not None:
            # `estate revoke` on this node wrote a newer list: apply and spread it.
            fresh = Estate.load(self.d.home)
            if (
                fresh is not None
                and fresh.revocation_number > self.d.estate.revocation_number
                and self.d.estate.accept_revocation_list(fresh.revocation_list())
            ):
                self.d.network.revocations_changed()
            # `volume grant/revoke`, `group add` here signed a newer access list.
            if (
                fresh is not None
                and fresh.access.number > self.d.estate.access.number
                and self.d.estate.accept_access_list(fresh.access.encoded)
            ):
                self.d.network.access_changed()
        return {"changed": await self.d.reload_heads()}

    async def _op_commit(self, request: dict[str, Any]) -> dict[str, Any]:
        volume = request.get("volume")
        if not isinstance(volume, str):
            raise UsageError("commit names a volume")
        if self.d.live is None:
            reason = "--read-only" if self.d.read_only else "no mount"
            raise P2pfsError(f"this daemon has no writable volumes ({reason})")
        live = self.d.live

        def progress() -> dict[str, Any]:
            st = live.statistics(volume)
            if st is None:
                return {}
            return {
                # No stage: between two commits, or this one about to take the lock.
                "stage": st.committing or "starting",
                "staged_files": st.staged_files,
                "staged_bytes": st.staged_bytes,
            }

        report_progress(request, progress)
        return (await live.commit(volume)).as_dict()

    async def _op_stop(self, request: dict[str, Any]) -> dict[str, Any]:
        request[AFTER_REPLY] = self.d.stop
        return {"stopping": True}

    async def _op_fault(self, request: dict[str, Any]) -> dict[str, Any]:
        handler = str(request.get("handler", ""))
        if handler.startswith("control:stall:"):
            op = handler.removeprefix("control:stall:")
            if request.get("clear"):
                self.stalls.pop(op, None)
                return {"disarmed": handler}
            seconds = request.get("seconds")
            if not isinstance(seconds, int | float) or not 0 < seconds <= 3600:
                raise UsageError("control:stall:OP takes seconds (0 < seconds <= 3600)")
            self.stalls[op] = float(seconds)
            return {"armed": handler, "seconds": seconds}
        # "control:stall:OP" (above) slows an operation of this socket, "net:NAME" arms a
        # fault in the network layer, "publish:NAME" in every writable volume's commits,
        # anything else in a FUSE handler.
        faults, key = self.d.fs.faults, handler
        if handler.startswith("net:") and self.d.network is not None:
            faults, key = self.d.network.faults, handler.removeprefix("net:")
        if handler.startswith("publish:") and self.d.live is not None:
            key = handler.removeprefix("publish:")
            for publisher in self.d.live.publishers.values():
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
