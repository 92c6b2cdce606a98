"""The publisher's live volumes: one work tree, writable view and publisher per volume.

The daemon makes one ``LiveVolumes`` when it mounts; every volume whose publisher
key this node holds is mounted writable (``HOME/work/VOLUME/`` holds its work
tree), every other volume stays a read-only snapshot.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import trio

from p2pfs.config import Config
from p2pfs.errors import NotFound, P2pfsError
from p2pfs.fs.vfs import FileSystem
from p2pfs.fs.writable import WritableVolume
from p2pfs.store.cas import Store
from p2pfs.volume.content import Content
from p2pfs.volume.publish import CommitResult, Publisher, PublisherStats
from p2pfs.volume.registry import VolumeRegistry
from p2pfs.volume.worktree import WorkTree

log = logging.getLogger(__name__)


class LiveVolumes:
    def __init__(
        self,
        work_dir: Path,
        registry: VolumeRegistry,
        store: Store,
        content: Content,
        fs: FileSystem,
        config: Config,
        on_committed: Callable[[str], Awaitable[None]],
        keep: Callable[[str], Awaitable[bool]],
    ) -> None:
        self.work_dir = work_dir
        self.registry = registry
        self.store = store
        self.content = content
        self.fs = fs
        self.config = config
        self.on_committed = on_committed
        self.keep = keep
        self.publishers: dict[str, Publisher] = {}
        self.volumes: dict[str, WritableVolume] = {}
        self.volume_ids: dict[str, bytes] = {}

    def open(self, private: Callable[[bytes], bool] = lambda vid: False) -> None:
        """Open (or start) the work tree of every volume published here, but private
        ones: the work tree and its commits would store plaintext (publish those with
        ``p2pfs import``; the mount shows them read-only)."""
        names = []
        for n in self.registry.names():
            if not self.registry.is_publisher(n):
                continue
            if private(self.registry.get(n).id):
                log.info("volume %s is private: read-only in the mount (publish with import)", n)
                continue
            names.append(n)
        for slot, name in enumerate(names, start=1):
            tree = WorkTree(
                self.work_dir / name,
                uid=self.fs.uid,
                gid=self.fs.gid,
                keep_owners=self.registry.get(name).keep_owners,
            )
            self._align(name, tree)
            volume = WritableVolume(name, slot, tree, self.content)
            publisher = Publisher(
                name,
                tree,
                self.store,
                self.registry,
                settle_s=self.config.settle_s,
                max_delay_s=self.config.max_delay_s,
                on_committed=self.on_committed,
                keep=self.keep,
                on_absorbed=volume.dropped_staging,
            )
            volume.on_change = publisher.changed
            volume.on_closed = publisher.closed
            volume.on_fault = publisher.enter_failsafe
            volume.refusal = publisher.refusal
            self.fs.add_writable(volume)
            self.volumes[name] = volume
            self.volume_ids[name] = self.registry.get(name).id
            self.publishers[name] = publisher
            log.info("volume %s is writable here (work tree %s)", name, tree.root)

    def _align(self, name: str, tree: WorkTree) -> bool:
        """Start the work tree from the volume's head when it has nothing of its own.

        True if it was reset. A head made elsewhere (``p2pfs import``) while the tree
        holds uncommitted changes is left alone: the next commit supersedes it."""
        record = self.registry.get(name)
        fresh = tree.node(1) is None
        if not fresh and tree.base == record.head:
            return False
        if not fresh and tree.dirty:
            log.warning(
                "volume %s: snapshot %d was made outside the mount while it holds uncommitted "
                "changes; the next commit replaces it",
                name,
                record.seq,
            )
            return False
        head = self.registry.load_head(self.store, record)
        tree.reset(
            record.head, head.root if head else None, head.time_ns if head else time.time_ns()
        )
        return True

    def head_changed(self, name: str) -> bool:
        """The registry's head moved (an import): follow it if nothing is pending here.
        True if the tree was reset (names the kernel holds are stale)."""
        w = self.volumes.get(name)
        if w is None or self.registry.get(name).head == w.tree.base:
            return False
        if any(n.opens for n in w.tree.nodes.values()):
            log.warning("volume %s: files are open; the new snapshot shows after they close", name)
            return False
        return self._align(name, w.tree)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for publisher in self.publishers.values():
                await nursery.start(publisher.run)
            task_status.started()

    async def commit(self, name: str) -> CommitResult:
        publisher = self.publishers.get(name)
        if publisher is None:
            if name not in self.registry.names():
                raise NotFound(f"unknown volume {name!r}")
            if not self.registry.is_publisher(name):
                raise P2pfsError(
                    f"volume {name!r} is published by another node: only its publisher commits"
                )
            raise P2pfsError(f"volume {name!r} is not mounted writable: mount it first")
        return await publisher.commit(include_open=True)

    async def commit_all(self) -> None:
        """Commit what is pending (at shutdown), each volume within a bound."""
        for name, publisher in self.publishers.items():
            if not publisher.tree.dirty:
                continue
            with trio.move_on_after(60) as scope:
                try:
                    await publisher.commit(include_open=True)
                except P2pfsError as e:
                    log.error("volume %s: final commit failed: %s", name, e)
            if scope.cancelled_caught:
                log.error("volume %s: final commit took too long; it runs at next start", name)

    def close(self) -> None:
        for w in self.volumes.values():
            w.tree.close()

    def statistics(self, name: str) -> PublisherStats | None:
        publisher = self.publishers.get(name)
        return publisher.statistics() if publisher else None

    @property
    def names(self) -> list[str]:
        return list(self.volumes)


def work_dir(home_root: Path) -> Path:
    path = home_root / "work"
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path
