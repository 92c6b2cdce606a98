"""From the publisher's work tree to signed snapshots: absorb closed files, commit, debounce.

*Absorbing* chunks a staged file into the store once its last writer closed it;
the chunks are pinned (``work:VOLUME#N``) before they are stored, so a cache
quota can never evict data that exists nowhere else yet. The staging file is
deleted only after the store and the work tree's new row are durable.

A *commit* captures the work tree at one instant (directories changed since the
last commit, with their children's current ids), makes their tree objects in a
worker thread, stores them durably, signs the snapshot and only then moves the
volume's head (one atomic rename of ``volume.json``). A kill -9 anywhere leaves
either the old head or the new one, both complete.

Automatic commits follow the changes: ``settle_s`` after the last change, at most
``max_delay_s`` after the first one. They leave out files still open for writing
(those enter when closed); ``p2pfs commit`` takes them as they are now.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import trio

from p2pfs.chunking.chunker import iter_chunks
from p2pfs.chunking.params import ChunkParams
from p2pfs.errors import IntegrityError, NotFound, P2pfsError
from p2pfs.objects.model import ChunkRef, Snapshot, Tree, object_id
from p2pfs.store.cas import Store

from .importer import BATCH_BYTES, store_blob
from .registry import VolumeRegistry
from .wnodes import Chunked, WNode
from .worktree import WorkTree

log = logging.getLogger(__name__)

ABSORB_BATCH_FILES = 1024
# Closed files are absorbed once writing pauses this long: one durability barrier for a
# burst of small files (tar x, git clone) instead of one each, and no chunking competing
# with the writer for two cores and the GIL (it tripled the time per small file).
ABSORB_QUIET_S = 0.5
# ... or once a batch is waiting, whatever the writer does (so a long burst does not
# leave all the chunking to the commit).
ABSORB_BACKLOG_FILES = ABSORB_BATCH_FILES
# Rounds of "chunk what changed" before a commit takes a file as last chunked.
COMMIT_ROUNDS = 3


@dataclass
class CommitResult:
    volume: str
    seq: int
    snapshot: bytes | None
    changed: bool
    files_chunked: int = 0
    trees: int = 0
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "volume": self.volume,
            "seq": self.seq,
            "snapshot": self.snapshot.hex() if self.snapshot else None,
            "changed": self.changed,
            "files_chunked": self.files_chunked,
            "trees": self.trees,
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class PublisherStats:
    """A writable volume's state, as status shows it (``volumes[].live``)."""

    writable: bool
    uncommitted: bool  # changes not yet in a snapshot
    staged_files: int
    staged_bytes: int
    commits: int
    absorbed_files: int
    auto_commit_in_s: float | None
    committing: str | None  # what a running commit is doing
    last_commit: dict[str, object] | None
    error: str | None
    failsafe: str | None  # why writes are refused, if they are


class PinnedWriter:
    """Chunks and objects for the store, pinned under ``pin`` before they are stored,
    written in batches: one durability barrier per batch, not per file. Blocking:
    use it in a worker thread."""

    def __init__(self, store: Store, pin: str) -> None:
        self.store = store
        self.pin = pin
        self.pending: dict[bytes, bytes] = {}
        self.pending_bytes = 0
        self.kept: list[bytes] = []  # stored already (shared with other data): pinned too

    def add(self, oid: bytes, data: bytes | memoryview) -> None:
        if oid in self.pending:
            return
        if self.store.has(oid):
            self.kept.append(oid)
            return
        self.pending[oid] = bytes(data)
        self.pending_bytes += len(self.pending[oid])
        if self.pending_bytes >= BATCH_BYTES:
            self.flush()

    def put_object(self, data: bytes) -> bytes:
        oid = object_id(data)
        self.add(oid, data)
        return oid

    def flush(self) -> None:
        if self.pending or self.kept:
            self.store.pin(self.pin, [*self.pending, *self.kept])
            self.kept.clear()
        if self.pending:
            self.store.put_many(self.pending.items(), source="local")
            self.pending.clear()
            self.pending_bytes = 0


def chunk_file(writer: PinnedWriter, params: ChunkParams, path: Path) -> tuple[bytes, int] | None:
    """Chunk a staging file into ``writer``: (blob id, size), or None if the file is gone.
    Durable only after ``writer.flush()``."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        refs: list[ChunkRef] = []
        size = 0
        for record, data in iter_chunks(fd, params, size_hint=os.fstat(fd).st_size):
            refs.append(ChunkRef(record.id, record.length))
            size += record.length
            writer.add(record.id, data)
    finally:
        os.close(fd)
    return store_blob(writer.put_object, size, refs), size


class Publisher:
    """Absorbs and commits one writable volume."""

    def __init__(
        self,
        name: str,
        tree: WorkTree,
        store: Store,
        registry: VolumeRegistry,
        *,
        settle_s: float,
        max_delay_s: float,
        on_committed: Callable[[str], Awaitable[None]],
        keep: Callable[[str], Awaitable[bool]],
        on_absorbed: Callable[[WNode], None] = lambda n: None,
    ) -> None:
        self.name = name
        self.tree = tree
        self.store = store
        self.registry = registry
        self.params = registry.get(name).params
        self.settle_s = settle_s
        self.max_delay_s = max_delay_s
        self.on_committed = on_committed
        self.keep = keep
        self._nursery: trio.Nursery | None = None
        self.faults: set[str] = set()  # armed only through a --debug-faults daemon
        self.stage: str | None = None  # what a running commit is doing
        self.on_absorbed = on_absorbed
        self._closed: set[int] = set()
        self._wake_absorber = trio.Event()
        self._wake_timer = trio.Event()
        self._commit_lock = trio.Lock()
        self._first_change: float | None = None
        self._last_change = 0.0
        self._work_gen = int(time.time())  # names this run's work pin sets apart
        self.commits = 0
        self.absorbed_files = 0
        self.last_commit: CommitResult | None = None
        self.last_error: str | None = None
        self.failsafe: str | None = None  # why writes are refused (enter_failsafe)

    @property
    def pin_name(self) -> str:
        return f"work:{self.name}#{self._work_gen}"

    # -- events from the filesystem -------------------------------------------------

    def changed(self) -> None:
        now = time.monotonic()
        self._last_change = now
        if self._first_change is None:
            self._first_change = now
            self._wake_timer.set()

    def closed(self, n: WNode) -> None:
        self._closed.add(n.ino)
        self._wake_absorber.set()

    # -- background tasks -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Staged files left by an earlier run with no writer now: absorb them.
        for n in self.tree.staged_nodes():
            self._closed.add(n.ino)
        if self.tree.dirty:
            self.changed()
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._absorber)
                if self.settle_s > 0:
                    nursery.start_soon(self._timer)
                task_status.started()
        finally:
            # Closed: the last commit at stop re-pins in the foreground, not in it.
            self._nursery = None

    async def _absorber(self) -> None:
        while True:
            if not self._closed:
                await self._wake_absorber.wait()
                self._wake_absorber = trio.Event()
                continue
            quiet = time.monotonic() - self._last_change
            if quiet < ABSORB_QUIET_S and len(self._closed) < ABSORB_BACKLOG_FILES:
                await trio.sleep(ABSORB_QUIET_S - quiet)
                continue
            queued = list(self._closed)
            inos, self._closed = queued[:ABSORB_BATCH_FILES], set(queued[ABSORB_BATCH_FILES:])
            nodes = [n for i in inos if (n := self.tree.node(i)) is not None and n.staged]
            try:
                await self._absorb([n for n in nodes if n.writers == 0])
            except IntegrityError as e:
                self.enter_failsafe(e)
                return  # the files stay staged; nothing more is absorbed
            except Exception as e:
                # Nothing lost: the files stay staged, are read from there, and are
                # chunked again by the next commit. (A bug must not take the mount down.)
                self.last_error = f"cannot absorb into the store: {e}"
                log.error("volume %s: %s", self.name, self.last_error, exc_info=True)
                await trio.sleep(5)

    async def _timer(self) -> None:
        while True:
            if self._first_change is None:
                await self._wake_timer.wait()
                self._wake_timer = trio.Event()
                continue
            now = time.monotonic()
            due = min(self._last_change + self.settle_s, self._first_change + self.max_delay_s)
            if now < due:
                await trio.sleep(due - now)
                continue
            if self.failsafe is not None:
                return
            try:
                await self.commit(include_open=False)
            except Exception as e:
                if self.failsafe is not None:
                    return
                self.last_error = f"automatic commit failed: {e}"
                log.error("volume %s: %s", self.name, self.last_error, exc_info=True)
                self._first_change = time.monotonic()  # try again after max_delay_s
                self._last_change = self._first_change
                await trio.sleep(min(self.settle_s, 5))

    # -- absorbing ---------------------------------------------------------------------

    async def _absorb(self, nodes: list[WNode]) -> int:
        """Chunk staged files into the store; those still unchanged and closed become clean."""
        if not nodes:
            return 0
        work = [(n, n.gen, self.tree.staging_path(n.ino)) for n in nodes]
        pin = self.pin_name

        def chunk_all() -> list[tuple[bytes, int] | None]:
            writer = PinnedWriter(self.store, pin)
            results = [chunk_file(writer, self.params, path) for _, _, path in work]
            writer.flush()
            return results

        results = await trio.to_thread.run_sync(chunk_all)
        clean = self.tree.absorbed(
            [
                (n, Chunked(result[0], result[1], gen))
                for (n, gen, _path), result in zip(work, results, strict=True)
                if result is not None
            ]
        )
        if clean:
            await trio.to_thread.run_sync(self.tree.sync)
            # Here, with no await between the check and the unlink: a file reopened for
            # writing meanwhile has a new staging file, which must stay.
            for n in clean:
                if not n.staged:
                    self.on_absorbed(n)
                    with contextlib.suppress(FileNotFoundError):
                        self.tree.staging_path(n.ino).unlink()
        self.absorbed_files += len(clean)
        return len(work)

    # -- committing --------------------------------------------------------------------

    async def commit(self, *, include_open: bool = True) -> CommitResult:
        async with self._commit_lock:
            if self.failsafe is not None:
                raise P2pfsError(
                    f"volume {self.name!r} takes no commits (failsafe since an integrity "
                    f"fault: {self.failsafe}); check the store with 'p2pfs fsck' and "
                    "'p2pfs scrub', then restart the daemon"
                )
            try:
                return await self._commit(include_open)
            except IntegrityError as e:
                self.enter_failsafe(e)
                raise
            finally:
                self.stage = None

    def refusal(self) -> str | None:
        """Why this volume takes no writes now (failsafe), or None."""
        return self.failsafe

    def enter_failsafe(self, e: BaseException) -> None:
        """An integrity fault in this volume's own data (a corrupt chunk or tree it
        needs, a damaged index): from now on the volume takes no writes and no commits,
        rather than risk publishing a snapshot that references what is lost (S3QL's
        failsafe mode). It lasts until the daemon restarts."""
        if self.failsafe is None:
            self.failsafe = str(e) or type(e).__name__
            self.last_error = f"failsafe: writes refused after an integrity fault: {self.failsafe}"
            log.error("volume %s: %s", self.name, self.last_error)

    async def _commit(self, include_open: bool) -> CommitResult:
        self.stage = "chunking"
        started = time.monotonic()
        chunked = 0
        for _ in range(COMMIT_ROUNDS):
            todo = [
                n
                for n in self.tree.staged_nodes()
                if (n.chunked is None or n.chunked.gen != n.gen)
                and (include_open or n.writers == 0)
            ]
            if not todo:
                break
            chunked += await self._absorb(todo)
        self._first_change = None  # changes from here on wait for the next commit
        clock, plans = self.tree.capture()
        # Chunks absorbed from here on belong to the next commit: a new pin set.
        committing_gen = self._work_gen
        self._work_gen += 1
        record = self.registry.get(self.name)
        head = await trio.to_thread.run_sync(self.registry.load_head, self.store, record)
        pin = self.pin_name

        def make_trees() -> dict[int, bytes]:
            ids: dict[int, bytes] = {}
            writer = PinnedWriter(self.store, pin)
            for plan in plans:  # children before parents
                entries = tuple(
                    e
                    if e.name not in plan.subdirs
                    else dataclasses.replace(e, id=ids[plan.subdirs[e.name]])
                    for e in plan.entries
                )
                ids[plan.ino] = writer.put_object(Tree(entries).encode())
            writer.flush()
            return ids

        ids = await trio.to_thread.run_sync(make_trees)
        for ino, tid in ids.items():
            self.tree.set_tree(ino, tid, clock)
        root = self.tree.root_tree()
        assert root is not None
        if head is not None and record.head is not None and head.root == root:
            self.tree.committed(record.head, clock)
            result = CommitResult(self.name, record.seq, record.head, False, chunked, len(ids))
        else:
            snapshot = Snapshot.create(
                self.registry.publisher_key(self.name),
                name=self.name,
                seq=record.seq + 1,
                parent=record.head,
                root=root,
                time_ns=time.time_ns(),
                params=self.params.to_dict(),
                origins=head.origins if head is not None else (),
            )

            def publish() -> bytes:
                sid = self.store.put_object(snapshot.encode())  # durable
                self.registry.advance(record, snapshot, sid)
                return sid

            if "stall-before-head" in self.faults:
                # Test hook (daemon --debug-faults): hold a commit whose trees are
                # stored but whose head has not moved, for a kill -9 to land there.
                self.stage = "stalled before the head moved"
                await trio.sleep_forever()
            sid = await trio.to_thread.run_sync(publish)
            self.tree.committed(sid, clock)
            self.commits += 1
            result = CommitResult(self.name, snapshot.seq, sid, True, chunked, len(ids))
            log.info(
                "volume %s: committed snapshot %d (%d trees, %d files chunked)",
                self.name,
                snapshot.seq,
                len(ids),
                chunked,
            )
            await self.on_committed(self.name)
            # Re-pinning the whole head takes a while on a big volume: the commit
            # returns first (the work pins hold everything meanwhile).
            if self._nursery is not None:
                self._nursery.start_soon(self._keep_then_release, committing_gen)
            else:  # stopping: no background left
                await self._keep_then_release(committing_gen)
        result.seconds = time.monotonic() - started
        self.last_commit = result
        self.last_error = None
        return result

    async def _keep_then_release(self, upto: int) -> None:
        if await self.keep(self.name):
            await self._release_work_pins(upto)

    async def _release_work_pins(self, upto: int) -> None:
        """The head's own pin now holds what the work pins of generations up to ``upto``
        kept: drop them."""
        prefix = f"work:{self.name}#"
        for s in await trio.to_thread.run_sync(self.store.pin_sets):
            gen = s.name.removeprefix(prefix)
            if s.name.startswith(prefix) and gen.isdigit() and int(gen) <= upto:
                with contextlib.suppress(NotFound):
                    await trio.to_thread.run_sync(self.store.unpin, s.name)

    def statistics(self) -> PublisherStats:
        staged = self.tree.staged_nodes()
        due = None
        if self._first_change is not None and self.settle_s > 0:
            due = min(self._last_change + self.settle_s, self._first_change + self.max_delay_s)
            due = max(0.0, due - time.monotonic())
        return PublisherStats(
            writable=True,
            uncommitted=self.tree.dirty,
            staged_files=len(staged),
            staged_bytes=sum(n.size for n in staged),
            commits=self.commits,
            absorbed_files=self.absorbed_files,
            auto_commit_in_s=None if due is None else round(due, 1),
            committing=self.stage,
            last_commit=self.last_commit.as_dict() if self.last_commit else None,
            error=self.last_error,
            failsafe=self.failsafe,
        )
