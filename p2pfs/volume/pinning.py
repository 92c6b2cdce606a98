"""Pinning a path: resolve it in a snapshot, record every id it needs, fetch the missing.

A pin holds the snapshot object, every tree from the root down to the path, and
everything under it (trees, file blobs with their index nodes, chunks): with
those, the path reads offline at local speed. The ids are recorded in the
store's pin set before anything is fetched, so an interrupted pin (Ctrl-C, kill
-9, a lost network) resumes by fetching only what is still missing.
"""

from __future__ import annotations

import logging
import time
from bisect import bisect_left
from dataclasses import dataclass, field
from typing import Any

import trio

from p2pfs.errors import NotFound, P2pfsError
from p2pfs.objects.model import Kind, Snapshot, decode_blob
from p2pfs.store.cas import Store

from .content import Content

log = logging.getLogger(__name__)

FETCH_CONCURRENCY = 8


@dataclass
class Collected:
    objects: list[bytes] = field(default_factory=list)
    chunks: dict[bytes, int] = field(default_factory=dict)  # id -> length

    @property
    def ids(self) -> list[bytes]:
        return [*dict.fromkeys(self.objects), *self.chunks]

    @property
    def chunk_bytes(self) -> int:
        return sum(self.chunks.values())


async def collect(content: Content, snapshot_id: bytes, snapshot: Snapshot, path: str) -> Collected:
    """Every id needed to read ``path`` (a normalized '/a/b') of ``snapshot``."""
    out = Collected(objects=[snapshot_id, snapshot.root])
    tree_id = snapshot.root
    parts = [p.encode() for p in path.strip("/").split("/") if p]
    for i, name in enumerate(parts):
        tree, names = await content.tree(tree_id)
        at = bisect_left(names, name)
        entry = tree.entries[at] if at < len(names) and names[at] == name else None
        here = "/" + b"/".join(parts[: i + 1]).decode(errors="replace")
        if entry is None:
            raise NotFound(f"{here} does not exist in snapshot {snapshot.seq} of {snapshot.name}")
        if entry.kind is Kind.DIR and entry.id is not None:
            out.objects.append(entry.id)
            tree_id = entry.id
        elif i == len(parts) - 1:
            if entry.kind is Kind.FILE and entry.id is not None:
                await _collect_blob(content, entry.id, out)
            return out  # a file or a symlink (held in its tree)
        else:
            raise NotFound(f"{here} is not a directory")
    await _collect_tree(content, tree_id, out)
    return out


async def _collect_tree(content: Content, tree_id: bytes, out: Collected) -> None:
    tree, _ = await content.tree(tree_id)
    for entry in tree.entries:
        if entry.id is None:
            continue
        if entry.kind is Kind.DIR:
            out.objects.append(entry.id)
            await _collect_tree(content, entry.id, out)
        elif entry.kind is Kind.FILE:
            await _collect_blob(content, entry.id, out)


async def _collect_blob(content: Content, blob_id: bytes, out: Collected) -> None:
    out.objects.append(blob_id)
    blob = decode_blob(await content.object_bytes(blob_id))
    for ref in blob.refs:
        if blob.level == 0:
            out.chunks[ref.id] = ref.length
        else:
            await _collect_blob(content, ref.id, out)


@dataclass
class PinJob:
    name: str
    state: str = "resolving"  # resolving, fetching, complete, failed, cancelled
    chunks_total: int = 0
    chunks_done: int = 0
    bytes_total: int = 0
    bytes_done: int = 0
    missing_at_start: int = 0
    failed: int = 0
    error: str | None = None
    started: float = field(default_factory=time.monotonic)
    finished: float | None = None
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)

    def describe(self) -> dict[str, Any]:
        elapsed = (self.finished or time.monotonic()) - self.started
        return {
            "name": self.name,
            "state": self.state,
            "chunks_total": self.chunks_total,
            "chunks_done": self.chunks_done,
            "bytes_total": self.bytes_total,
            "bytes_done": self.bytes_done,
            "missing_at_start": self.missing_at_start,
            "failed_chunks": self.failed,
            "elapsed_s": round(elapsed, 2),
            "error": self.error,
        }


def check_quota(store: Store, name: str, collected: Collected) -> None:
    """Refuse, before fetching, a pin that cannot fit under the quota with the other pins."""
    usage = store.cache_usage()
    if usage.quota is None:
        return
    already = {cid for cid in collected.chunks if store.is_pinned(cid)}
    extra = sum(n for cid, n in collected.chunks.items() if cid not in already)
    if usage.pinned_bytes + extra > usage.quota:
        mib = 1 << 20
        raise P2pfsError(
            f"pinning {name} needs {extra / mib:.1f} MiB more; the cache quota is "
            f"{usage.quota / mib:.1f} MiB with {usage.pinned_bytes / mib:.1f} MiB pinned "
            f"already ({(usage.pinned_bytes + extra - usage.quota) / mib:.1f} MiB missing): "
            "raise [cache] max_bytes in config.toml or unpin something"
        )


async def fetch_missing(content: Content, store: Store, job: PinJob, collected: Collected) -> None:
    """Fetch every chunk of the pin not stored yet, a few at a time."""
    present = await trio.to_thread.run_sync(
        lambda: {cid for cid in collected.chunks if store.has(cid)}
    )
    job.chunks_total = len(collected.chunks)
    job.bytes_total = collected.chunk_bytes
    job.chunks_done = len(present)
    job.bytes_done = sum(collected.chunks[c] for c in present)
    job.missing_at_start = job.chunks_total - job.chunks_done
    job.state = "fetching"
    limiter = trio.CapacityLimiter(FETCH_CONCURRENCY)
    errors: list[str] = []

    async def one(cid: bytes) -> None:
        async with limiter:
            try:
                await content.load_chunk(cid)
            except P2pfsError as e:
                job.failed += 1
                errors.append(str(e))
                return
        job.chunks_done += 1
        job.bytes_done += collected.chunks[cid]

    async with trio.open_nursery() as nursery:
        for cid in collected.chunks:
            if cid not in present:
                nursery.start_soon(one, cid)
    if job.failed:
        raise P2pfsError(
            f"{job.failed} chunks of {job.name} could not be fetched ({errors[-1]}); "
            "run the pin again to resume"
        )
