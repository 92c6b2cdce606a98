"""Keeping the cache: pin jobs, following pins, scrubbing and healing.

The daemon owns one Keeper. Pin jobs run in the daemon (it has the network);
the CLI starts one and watches its progress. Scrub verifies every stored chunk
(on demand, and in the background at a limited rate), quarantines the bad ones
and fetches them again from peers or the origin, pinned chunks first.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from p2pfs.errors import MissingChunk, NotFound, P2pfsError
from p2pfs.fsutil import write_atomic
from p2pfs.objects.model import Snapshot
from p2pfs.store.cas import Store
from p2pfs.volume.content import Content
from p2pfs.volume.history import history
from p2pfs.volume.pins import (
    PinJob,
    PinRecord,
    PinRegistry,
    PinState,
    check_quota,
    collect,
    collect_id_list,
    fetch_missing,
    pin_states,
)

log = logging.getLogger(__name__)

# name -> (snapshot id, snapshot, root ref) of every volume this node reads
Heads = Callable[[], dict[str, tuple[bytes, Snapshot, bytes]]]
Fetch = Callable[[bytes], Awaitable[bytes]]
SCRUB_BATCH = 64


@dataclass(frozen=True)
class ScrubStats:
    """The scrubs so far (kept in HOME/scrub.json across restarts)."""

    last_run: float | None = None
    chunks_checked: int = 0
    corrupt_found: int = 0
    healed: int = 0
    unhealed: int = 0
    running: bool = False


class Keeper:
    def __init__(
        self,
        content: Content,
        store: Store,
        pins: PinRegistry,
        heads: Heads,
        fetch: Fetch | None,
        state_file: Path,
        *,
        scrub_interval_s: float,
        scrub_rate_bytes_s: float,
    ) -> None:
        self.content = content
        self.store = store
        self.pins = pins
        self.heads = heads
        self.fetch = fetch
        self.state_file = state_file
        self.scrub_interval_s = scrub_interval_s
        self.scrub_rate = scrub_rate_bytes_s
        self.jobs: dict[str, PinJob] = {}
        self.scrub = self._load_scrub_state()
        self.started = time.time()
        self._nursery: trio.Nursery | None = None
        self._scrub_lock = trio.Lock()
        # What a running scrub is doing, for `p2pfs scrub`'s progress lines; None when idle.
        self.scrub_progress: dict[str, Any] | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            if self.scrub_interval_s > 0:
                nursery.start_soon(self._background_scrub)
            await trio.sleep_forever()  # pin jobs run in this nursery until the daemon stops

    # -- pins -------------------------------------------------------------------

    def _head(self, volume: str) -> tuple[bytes, Snapshot, bytes]:
        head = self.heads().get(volume)
        if head is None:
            known = ", ".join(sorted(self.heads())) or "none"
            raise NotFound(f"unknown volume {volume!r} (volumes here: {known})")
        return head

    async def pin(self, volume: str, path: str, *, follow: bool) -> PinJob:
        """Start (or resume) pinning; returns the job, which runs in the background."""
        snapshot_id, snapshot, root = self._head(volume)
        name = f"{volume}:{path}"
        running = self.jobs.get(name)
        if running is not None and running.state in ("resolving", "fetching"):
            return running
        job = PinJob(name)
        self.jobs[name] = job
        # Resolve and check the quota now, so the CLI hears a refusal at once.
        try:
            collected = await collect(self.content, snapshot_id, snapshot, path, root)
            check_quota(self.store, name, collected)
            await trio.to_thread.run_sync(self.store.pin, name, collected.ids)
            self.pins.put(volume, path, follow=follow, seq=snapshot.seq)
        except BaseException as e:
            job.state, job.error, job.finished = "failed", str(e), time.monotonic()
            raise
        assert self._nursery is not None
        self._nursery.start_soon(self._run_job, job, collected)
        return job

    async def _run_job(self, job: PinJob, collected: Any) -> None:
        with job.scope:
            try:
                await fetch_missing(self.content, self.store, job, collected)
            except P2pfsError as e:
                job.state, job.error = "failed", str(e)
                log.warning("pin %s: %s", job.name, e)
            else:
                job.state = "complete"
                log.info("pin %s complete: %d chunks", job.name, job.chunks_total)
        if job.scope.cancelled_caught:
            job.state = "cancelled"
        job.finished = time.monotonic()

    def cancel(self, name: str) -> PinJob:
        job = self.jobs.get(name)
        if job is None:
            raise NotFound(f"no pin job for {name}")
        job.scope.cancel()
        return job

    async def unpin(self, volume: str, path: str) -> PinRecord:
        record = self.pins.remove(volume, path)
        job = self.jobs.pop(record.name, None)
        if job is not None:
            job.scope.cancel()
        await trio.to_thread.run_sync(self.store.unpin, record.name)
        return record

    async def follow(self, volumes: list[str]) -> None:
        """New snapshots arrived: re-pin the following pins of those volumes."""
        for record in self.pins.all():
            if record.follow and record.volume in volumes:
                try:
                    await self.repin(record)
                except P2pfsError as e:
                    log.warning("pin %s could not follow the new snapshot: %s", record.name, e)

    async def repin(self, record: PinRecord) -> None:
        snapshot_id, snapshot, root = self._head(record.volume)
        if snapshot.seq == record.seq:
            return
        collected = await collect(self.content, snapshot_id, snapshot, record.path, root)
        check_quota(self.store, record.name, collected)
        await self._replace_pin_set(record.name, collected.ids, snapshot.seq)
        self.pins.put(record.volume, record.path, follow=True, seq=snapshot.seq)
        job = PinJob(record.name)
        self.jobs[record.name] = job
        assert self._nursery is not None
        self._nursery.start_soon(self._run_job, job, collected)

    async def _replace_pin_set(self, name: str, ids: list[bytes], seq: int) -> None:
        """Make pin set ``name`` hold exactly ``ids``. The new ids are pinned under a
        staging name first, so what old and new versions share is never unpinned."""
        staging = f"{name}#{seq}"
        await trio.to_thread.run_sync(self.store.pin, staging, ids)
        with contextlib.suppress(NotFound):
            await trio.to_thread.run_sync(self.store.unpin, name)
        await trio.to_thread.run_sync(self.store.pin, name, ids)
        await trio.to_thread.run_sync(self.store.unpin, staging)

    async def keep_published(self, volume: str) -> None:
        """The publisher is where every chunk of its volumes always exists (the origin):
        pin the whole head snapshot so a cache quota never evicts any of it."""
        snapshot_id, snapshot, root = self._head(volume)
        collected = await collect(self.content, snapshot_id, snapshot, "/", root)
        await self._replace_pin_set(f"publish:{volume}", collected.ids, snapshot.seq)
        log.info("volume %s: %d ids pinned as its origin", volume, len(collected.ids))

    async def keep_cached(self, volume: str, snapshot_id: bytes, snapshot: Snapshot) -> None:
        """A volume this node may only cache (its ciphertext, never its plaintext): hold
        all of its head snapshot, as its id list names it, pinned and fetched."""
        name = f"cache:{volume}"
        running = self.jobs.get(name)
        if running is not None and running.state in ("resolving", "fetching"):
            running.scope.cancel()  # a newer snapshot replaces what it was fetching
        job = PinJob(name)
        self.jobs[name] = job
        try:
            collected = await collect_id_list(self.content, snapshot_id, snapshot)
            await self._replace_pin_set(name, collected.ids, snapshot.seq)
        except P2pfsError as e:
            job.state, job.error, job.finished = "failed", str(e), time.monotonic()
            log.warning("cache of %s: %s", volume, e)
            return
        assert self._nursery is not None
        self._nursery.start_soon(self._run_job, job, collected)

    async def pin_states(self) -> list[PinState]:
        return await trio.to_thread.run_sync(pin_states, self.pins, self.store)

    async def describe_pins(self) -> list[dict[str, Any]]:
        """Every pin, what of it is stored, and its running job if any."""
        out = []
        for state in await self.pin_states():
            job = self.jobs.get(state.name)
            out.append({**dataclasses.asdict(state), "job": job.describe() if job else None})
        return out

    # -- history -------------------------------------------------------------------

    async def history(self, volume: str, limit: int = 100) -> list[dict[str, Any]]:
        """The volume's snapshots, newest first, following parent links (each verified:
        same volume key, signature, sequence falling by one)."""
        snapshot_id, snapshot, _root = self._head(volume)
        found = await history(self.content, snapshot_id, snapshot, limit)
        if found.broken is not None:
            raise found.broken
        out: list[dict[str, Any]] = []
        for v in found.versions:
            if v.snapshot is None:
                out.append({"seq": v.seq, "id": v.id.hex(), "available": False, "error": v.error})
                continue
            out.append(
                {
                    "seq": v.seq,
                    "id": v.id.hex(),
                    "time": v.snapshot.time_ns / 1e9,
                    "root": v.snapshot.root.hex(),
                    "available": True,
                }
            )
        return out

    # -- scrub and heal ------------------------------------------------------------

    def _load_scrub_state(self) -> ScrubStats:
        try:
            state = ScrubStats(**json.loads(self.state_file.read_text()))
        except (FileNotFoundError, ValueError, TypeError):
            state = ScrubStats()
        return dataclasses.replace(state, running=False)

    async def _save_scrub_state(self) -> None:
        data = json.dumps(dataclasses.asdict(self.scrub)).encode()
        await trio.to_thread.run_sync(write_atomic, self.state_file, data)

    async def run_scrub(self, *, rate_bytes_s: float | None = None) -> dict[str, Any]:
        """Verify every stored id; quarantine and heal the bad ones (pinned first)."""
        async with self._scrub_lock:
            self.scrub = dataclasses.replace(self.scrub, running=True)
            checked = corrupt = healed = unhealed = 0
            bad: list[bytes] = []
            try:
                self.scrub_progress = {"stage": "listing chunks"}
                ids = await trio.to_thread.run_sync(self.store.chunk_ids)
                started = time.monotonic()
                done_bytes = 0
                for i in range(0, len(ids), SCRUB_BATCH):
                    batch = ids[i : i + SCRUB_BATCH]
                    self.scrub_progress = _counted("verifying", checked, len(ids), "chunks")
                    found, nbytes = await trio.to_thread.run_sync(self._verify, batch)
                    checked += len(batch)
                    bad += found
                    done_bytes += nbytes
                    if rate_bytes_s:
                        # Stay under the rate: sleep off any lead over it.
                        lead = done_bytes / rate_bytes_s - (time.monotonic() - started)
                        if lead > 0:
                            await trio.sleep(lead)
                corrupt = len(bad)
                pinned = await trio.to_thread.run_sync(
                    lambda: {cid for cid in bad if self.store.is_pinned(cid)}
                )
                for n, cid in enumerate(sorted(bad, key=lambda c: c not in pinned)):
                    self.scrub_progress = _counted("healing", n, len(bad), "chunks")
                    if await self._heal(cid):
                        healed += 1
                    else:
                        unhealed += 1
            finally:
                self.scrub_progress = None
                s = self.scrub
                self.scrub = ScrubStats(
                    last_run=time.time(),
                    chunks_checked=s.chunks_checked + checked,
                    corrupt_found=s.corrupt_found + corrupt,
                    healed=s.healed + healed,
                    unhealed=s.unhealed + unhealed,
                    running=False,
                )
                with trio.CancelScope(shield=True):
                    await self._save_scrub_state()
            return {
                "chunks_checked": checked,
                "corrupt_found": corrupt,
                "healed": healed,
                "unhealed": unhealed,
                "bad": [c.hex() for c in bad],
            }

    def _verify(self, batch: list[bytes]) -> tuple[list[bytes], int]:
        bad: list[bytes] = []
        nbytes = 0
        for cid in batch:
            try:
                nbytes += len(self.store.get(cid))
            except MissingChunk:
                continue  # evicted meanwhile
            except P2pfsError:
                bad.append(cid)  # quarantined by the store
        return bad, nbytes

    async def _heal(self, cid: bytes) -> bool:
        if self.fetch is None:
            return False
        try:
            await self.fetch(cid)
        except P2pfsError as e:
            log.warning("could not heal %s: %s", cid.hex(), e)
            return False
        return True

    async def _background_scrub(self) -> None:
        while True:
            # A new node waits a whole interval too: a scrub right at first start
            # would only compete with the reads it was started for.
            last = self.scrub.last_run or self.started
            wait = max(60.0, last + self.scrub_interval_s - time.time())
            await trio.sleep(wait)
            try:
                result = await self.run_scrub(rate_bytes_s=self.scrub_rate)
                log.info("background scrub: %s", {k: v for k, v in result.items() if k != "bad"})
            except P2pfsError as e:
                log.error("background scrub failed: %s", e)

    def statistics(self) -> ScrubStats:
        return self.scrub


def _counted(stage: str, done: int, total: int, unit: str) -> dict[str, Any]:
    return {"stage": stage, "done": done, "total": total, "unit": unit}
