"""The daemon's side of origins: sources for the fetcher, following ``latest``, and the
publisher's uploads after each new snapshot.

* Every origin announced by a head this node holds becomes one fetcher source
  (``source.OriginSource``), shared by the volumes that name it.
* For a volume it follows, the node asks each origin's ``latest`` every ``poll_s``
  (conditionally, with the ETag it last saw: an unchanged pointer costs one small
  answer), and takes a newer snapshot as from a peer: a site with no publisher in
  reach still follows.
* On the publisher, every new head is uploaded to each origin it can write, one sync
  at a time per volume (the lock the CLI's ``origin sync`` takes too); a failed
  upload is retried after ``retry_s``, and every sync resumes where the last stopped.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import trio

from p2pfs.errors import NotFound, P2pfsError
from p2pfs.fsutil import locked
from p2pfs.home import Home
from p2pfs.ids import matches
from p2pfs.net.fetcher import Fetcher
from p2pfs.net.following import VolumeSync
from p2pfs.objects.model import MAX_SNAPSHOT_BYTES, Snapshot
from p2pfs.objects.origins import OriginRef
from p2pfs.store.cas import Store
from p2pfs.volume.content import Content
from p2pfs.volume.registry import VolumeRegistry

from . import settings
from .backend import Backend, OriginError
from .kinds import open_backend
from .layout import LATEST
from .source import OriginSource, SourceStats
from .sync import sync

log = logging.getLogger(__name__)

THREADS = 16  # origin reads at once, from every fetch


@dataclass(frozen=True)
class UploadState:
    volume: str
    url: str
    seq: int  # the seq last uploaded (0: none yet)
    error: str | None


@dataclass(frozen=True)
class OriginStats:
    sources: tuple[SourceStats, ...]
    uploads: tuple[UploadState, ...]
    snapshots_from_origins: int
    poll_errors: int


class OriginWatch:
    def __init__(
        self,
        home: Home,
        registry: VolumeRegistry,
        store: Store,
        content: Content,
        fetcher: Fetcher | None,
        following: VolumeSync | None,
        *,
        poll_s: float = 60.0,
        retry_s: float = 30.0,
    ) -> None:
        self.home = home
        self.registry = registry
        self.store = store
        self.content = content
        self.fetcher = fetcher
        self.following = following
        self.poll_s = poll_s
        self.retry_s = retry_s
        self.limiter = trio.CapacityLimiter(THREADS)
        self._sources: dict[str, OriginSource] = {}
        self._origins: dict[str, tuple[OriginRef, ...]] = {}  # volume -> its head's origins
        self._published: set[str] = set()
        self._etags: dict[tuple[str, str], str] = {}
        self._dirty: set[str] = set()
        self._wake = trio.Event()
        self._uploads: dict[tuple[str, str], UploadState] = {}
        self._taken = self._poll_errors = 0

    # -- heads -------------------------------------------------------------------

    def heads_changed(
        self, heads: dict[str, Snapshot], published: set[str], changed: list[str]
    ) -> None:
        """What the daemon's reload found: each volume's head and which are ours."""
        self._origins = {name: snap.origins for name, snap in heads.items() if snap.origins}
        self._published = published
        wanted = {ref.url: ref for refs in self._origins.values() for ref in refs}
        for url in list(self._sources):
            if url not in wanted:
                del self._sources[url]
        for url, ref in wanted.items():
            if url not in self._sources:
                self._sources[url] = OriginSource(ref, self.limiter)
        if self.fetcher is not None:
            self.fetcher.sources = list(self._sources.values())
        for name in changed:
            if name in published and name in self._origins:
                self._dirty.add(name)
                self._wake.set()

    # -- running -----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        # Heads present at start are uploaded too: a sync cut off by the last stop resumes.
        self._dirty |= {n for n in self._origins if n in self._published}
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._uploader)
            if self.following is not None:
                nursery.start_soon(self._poller)
            task_status.started()

    async def _uploader(self) -> None:
        while True:
            if not self._dirty:
                await self._wake.wait()
                self._wake = trio.Event()
            retry = set()
            for name in sorted(self._dirty):
                self._dirty.discard(name)
                if not await self.upload(name):
                    retry.add(name)
            if retry:
                self._dirty |= retry
                with trio.move_on_after(self.retry_s):
                    await self._wake.wait()
                    self._wake = trio.Event()

    def _backend(self, name: str, ref: OriginRef) -> Backend:
        local = settings.load(self.home, name).get(ref.url)
        return open_backend(ref, local_dir=local.dir if local else None)

    async def upload(self, name: str) -> bool:
        """Sync every writable origin of volume ``name``; False if one must be retried."""
        ok = True
        for ref in self._origins.get(name, ()):
            try:
                backend = await trio.to_thread.run_sync(self._backend, name, ref)
                if not backend.writable:
                    continue  # a mirror someone else fills
                with locked(settings.sync_lock(self.home, name), blocking=False):
                    report = await sync(backend, self.content, self.store, self.registry, name)
                self._uploads[(name, ref.url)] = UploadState(name, ref.url, report.seq, None)
                log.info(
                    "volume %s: seq %d uploaded to %s (%d objects new)",
                    name,
                    report.seq,
                    ref.url,
                    report.uploaded,
                )
            except BlockingIOError:
                ok = False  # the CLI's sync holds it: ours follows
            except P2pfsError as e:
                ok = False
                old = self._uploads.get((name, ref.url))
                self._uploads[(name, ref.url)] = UploadState(
                    name, ref.url, old.seq if old else 0, str(e)
                )
                log.warning("volume %s: upload to %s failed (retried): %s", name, ref.url, e)
        return ok

    async def _poller(self) -> None:
        while True:
            await trio.sleep(self.poll_s)
            for name, refs in list(self._origins.items()):
                if name in self._published:
                    continue
                for ref in refs:
                    with contextlib.suppress(trio.TooSlowError):
                        await self.poll(name, ref)

    async def poll(self, name: str, ref: OriginRef) -> bool:
        """Ask one origin's ``latest`` for a newer snapshot of ``name``; True if taken."""
        source = self._sources.get(ref.url)
        if source is None or self.following is None:
            return False
        key = (name, ref.url)
        try:
            fetched = await trio.to_thread.run_sync(
                lambda: source.backend.get(LATEST, MAX_SNAPSHOT_BYTES, etag=self._etags.get(key)),
                limiter=self.limiter,
                abandon_on_cancel=True,
            )
            if fetched is None:
                return False  # not modified
            record = await trio.to_thread.run_sync(self.registry.get, name)

            async def get(part_id: bytes) -> bytes:
                data = await source.fetch(part_id)
                if not matches(part_id, data):
                    raise P2pfsError(f"origin {ref.url} holds a corrupt part of the id list")
                return data

            taken = await self.following.accept_from_origin(record, fetched.data, get, ref.url)
        except NotFound:
            return False  # nothing uploaded there yet
        except (OriginError, P2pfsError) as e:
            self._poll_errors += 1
            log.info("volume %s: latest of %s not taken: %s", name, ref.url, e)
            return False
        if fetched.etag is not None:
            self._etags[key] = fetched.etag
        if taken:
            self._taken += 1
        return taken

    def statistics(self) -> OriginStats:
        return OriginStats(
            tuple(s.statistics() for s in self._sources.values()),
            tuple(self._uploads.values()),
            self._taken,
            self._poll_errors,
        )
