"""Pins: what the user pinned for offline use, and what that means in ids.

``HOME/pins.json`` lists each pinned path (volume, path inside it, whether it
follows new snapshots, the snapshot it was resolved in). The chunk ids each pin
holds live in the store's pin sets, under the pin's name ``VOLUME:/path``: the
file is what a user asked for, the store what that meant in chunks.

Pinning a path resolves it in a snapshot and records every id it needs: the
snapshot object, every tree from the root down to the path, and everything under
it (trees, file blobs with their index nodes, chunks); with those, the path reads
offline at local speed. The ids are recorded in the store's pin set before
anything is fetched, so an interrupted pin (Ctrl-C, kill -9, a lost network)
resumes by fetching only what is still missing.
"""

from __future__ import annotations

import json
import logging
import time
from bisect import bisect_left
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import trio

from p2pfs.errors import IntegrityError, NotFound, P2pfsError, UsageError
from p2pfs.fsutil import write_atomic
from p2pfs.home import Home
from p2pfs.names import check_volume_name
from p2pfs.objects.id_list import decode_id_list
from p2pfs.objects.model import Kind, Snapshot, decode_blob
from p2pfs.seal import stored_id
from p2pfs.store.cas import Store

from .content import Content

log = logging.getLogger(__name__)

MAX_PINS = 10_000
MAX_PATH = 4096
FETCH_CONCURRENCY = 8


def normalize_path(path: str) -> str:
    """'/a/b' form; no '.' or '..' components, no empty names."""
    if len(path.encode()) > MAX_PATH or "\0" in path:
        raise UsageError(f"path {path[:80]!r}... is too long or has a NUL byte")
    parts = [p for p in PurePosixPath("/" + path).parts[1:] if p != "."]
    if ".." in parts:
        raise UsageError(f"path {path!r} may not contain '..'")
    return "/" + "/".join(parts)


def parse_target(text: str) -> tuple[str, str]:
    """``VOLUME:/path`` -> (volume, normalized path)."""
    volume, sep, path = text.partition(":")
    if not sep:
        raise UsageError(f"{text!r} is neither VOLUME:/path nor a path inside the mount")
    check_volume_name(volume)
    return volume, normalize_path(path)


@dataclass(frozen=True)
class PinRecord:
    volume: str
    path: str
    follow: bool
    seq: int  # the snapshot the pin was resolved in
    created: float

    @property
    def name(self) -> str:
        return f"{self.volume}:{self.path}"


class PinRegistry:
    def __init__(self, home: Home) -> None:
        self.path: Path = home.root / "pins.json"

    def all(self) -> list[PinRecord]:
        try:
            doc = json.loads(self.path.read_bytes())
            return [PinRecord(**item) for item in doc["pins"]]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as e:
            raise P2pfsError(f"{self.path} is damaged ({e}): restore it or remove it") from None

    def _save(self, pins: list[PinRecord]) -> None:
        doc = {"format": 1, "pins": [asdict(p) for p in pins]}
        write_atomic(self.path, json.dumps(doc, indent=2).encode() + b"\n")

    def get(self, volume: str, path: str) -> PinRecord | None:
        return next((p for p in self.all() if (p.volume, p.path) == (volume, path)), None)

    def put(self, volume: str, path: str, *, follow: bool, seq: int) -> PinRecord:
        pins = [p for p in self.all() if (p.volume, p.path) != (volume, path)]
        if len(pins) >= MAX_PINS:
            raise P2pfsError(f"too many pins ({MAX_PINS}); unpin some first")
        record = PinRecord(volume, path, follow, seq, time.time())
        self._save([*pins, record])
        return record

    def remove(self, volume: str, path: str) -> PinRecord:
        pins = self.all()
        keep = [p for p in pins if (p.volume, p.path) != (volume, path)]
        if len(keep) == len(pins):
            raise NotFound(f"{volume}:{path} is not pinned")
        self._save(keep)
        return next(p for p in pins if (p.volume, p.path) == (volume, path))


@dataclass(frozen=True)
class PinState:
    """A pin and how much of it is stored: what ``p2pfs pins`` and status show."""

    name: str
    volume: str
    path: str
    follow: bool
    seq: int
    ids: int  # ids the pin holds
    present: int  # of those, stored here
    bytes: int  # their bytes
    complete: bool  # everything is here: the path reads offline


def pin_states(pins: PinRegistry, store: Store) -> list[PinState]:
    """Every pin with what of it is stored (blocking: the registry file and the index)."""
    sets = {s.name: s for s in store.pin_sets()}
    out = []
    for record in pins.all():
        s = sets.get(record.name)
        out.append(
            PinState(
                record.name,
                record.volume,
                record.path,
                record.follow,
                record.seq,
                ids=s.count if s else 0,
                present=s.present if s else 0,
                bytes=s.present_bytes if s else 0,
                complete=s is not None and s.present == s.count,
            )
        )
    return out


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


async def collect(
    content: Content, snapshot_id: bytes, snapshot: Snapshot, path: str, root: bytes | None = None
) -> Collected:
    """Every stored id needed to read ``path`` (a normalized '/a/b') of ``snapshot``;
    ``root``: its root's ref when that is not the snapshot's root id (a private volume)."""
    tree_id = snapshot.root if root is None else root
    out = Collected(objects=[snapshot_id, stored_id(tree_id)])
    parts = [p.encode() for p in path.strip("/").split("/") if p]
    for i, name in enumerate(parts):
        tree, names = await content.tree(tree_id)
        at = bisect_left(names, name)
        entry = tree.entries[at] if at < len(names) and names[at] == name else None
        here = "/" + b"/".join(parts[: i + 1]).decode(errors="replace")
        if entry is None:
            raise NotFound(f"{here} does not exist in snapshot {snapshot.seq} of {snapshot.name}")
        if entry.kind is Kind.DIR and entry.id is not None:
            out.objects.append(stored_id(entry.id))
            tree_id = entry.id
        elif i == len(parts) - 1:
            if entry.kind is Kind.FILE and entry.id is not None:
                await _collect_blob(content, entry.id, out)
            return out  # a file or a symlink (held in its tree)
        else:
            raise NotFound(f"{here} is not a directory")
    await _collect_tree(content, tree_id, out)
    return out


MAX_ID_LIST_PARTS = 1 << 16


async def collect_id_list(content: Content, snapshot_id: bytes, snapshot: Snapshot) -> Collected:
    """Every stored id of a private snapshot from its id list: what a node that may
    only cache the volume fetches and pins, without a key to read any of it."""
    if snapshot.ids is None:
        raise P2pfsError(f"snapshot {snapshot.seq} of {snapshot.name} has no id list")
    out = Collected(objects=[snapshot_id])
    part_id: bytes | None = snapshot.ids
    while part_id is not None:
        if part_id in out.objects or len(out.objects) > MAX_ID_LIST_PARTS:
            raise IntegrityError(f"the id list of {snapshot.name} {snapshot.seq} loops")
        out.objects.append(part_id)
        part = decode_id_list(await content.load_stored(part_id))
        out.chunks.update(zip(part.ids, part.sizes, strict=True))
        part_id = part.next
    return out


async def _collect_tree(content: Content, tree_id: bytes, out: Collected) -> None:
    tree, _ = await content.tree(tree_id)
    for entry in tree.entries:
        if entry.id is None:
            continue
        if entry.kind is Kind.DIR:
            out.objects.append(stored_id(entry.id))
            await _collect_tree(content, entry.id, out)
        elif entry.kind is Kind.FILE:
            await _collect_blob(content, entry.id, out)


async def _collect_blob(content: Content, blob_id: bytes, out: Collected) -> None:
    out.objects.append(stored_id(blob_id))
    blob = decode_blob(await content.object_bytes(blob_id))
    for ref in blob.refs:
        if blob.level == 0:
            out.chunks[stored_id(ref.id)] = ref.length
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
                await content.load_stored(cid)
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
