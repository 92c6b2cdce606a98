"""Uploading a volume to an origin: what it lacks, then the snapshot, then ``latest``.

Resumable by construction: the origin's own listing says what it holds, so a sync cut
off by a crash, Ctrl-C or a lost network uploads, next time, only what is still
missing (no object twice without need, like casync's chunk stores). Objects go up
several at once (``threads``), each whole or not at all (S3 PUTs and the directory's
renames are atomic). The snapshot goes up after every object it reaches, ``latest``
last: a reader never finds a snapshot whose objects are missing (``layout``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass

import trio

from p2pfs.errors import DecodeError, MissingChunk, NotFound, P2pfsError, SignatureError
from p2pfs.objects.model import MAX_SNAPSHOT_BYTES, Snapshot, decode_snapshot
from p2pfs.store.cas import Store
from p2pfs.volume.content import Content
from p2pfs.volume.pins import collect, collect_id_list
from p2pfs.volume.registry import VolumeRegistry

from .backend import Backend, OriginError
from .layout import LATEST, OBJECTS, object_id_of, object_key, snapshot_key

log = logging.getLogger(__name__)

THREADS = 8


@dataclass(frozen=True)
class SyncReport:
    volume: str
    url: str
    seq: int
    objects: int  # every object the snapshot reaches
    uploaded: int  # of them, sent now
    uploaded_bytes: int
    present: int  # of them, already at the origin
    latest_before: int | None  # the origin's latest seq before this sync

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


async def head_ids(
    content: Content, store: Store, registry: VolumeRegistry, volume: str
) -> tuple[Snapshot, bytes, dict[bytes, int]]:
    """The head snapshot, its id, and every stored id it reaches with its size (objects
    of unknown size: 0)."""
    record = registry.get(volume)
    head = await trio.to_thread.run_sync(registry.load_head, store, record)
    if head is None or record.head is None:
        raise P2pfsError(f"volume {volume!r} has no snapshot yet: nothing to upload")
    if head.private:
        found = await collect_id_list(content, record.head, head)
    else:
        found = await collect(content, record.head, head, "/")
    ids = {oid: 0 for oid in found.objects if oid != record.head}
    ids.update(found.chunks)
    return head, record.head, ids


def read_latest(backend: Backend) -> Snapshot | None:
    """The snapshot the origin's ``latest`` holds (None: none yet); checked, as anything
    read from an origin."""
    try:
        fetched = backend.get(LATEST, MAX_SNAPSHOT_BYTES)
    except NotFound:
        return None
    assert fetched is not None
    try:
        return decode_snapshot(fetched.data)
    except (DecodeError, SignatureError) as e:
        raise OriginError(
            f"origin {backend.ref.url}: its latest is not a valid snapshot ({e})"
        ) from None


async def sync(
    backend: Backend,
    content: Content,
    store: Store,
    registry: VolumeRegistry,
    volume: str,
    *,
    threads: int = THREADS,
    progress: Callable[[int, int], None] | None = None,
) -> SyncReport:
    """Upload what ``backend`` lacks of the volume's head; ``progress(total, done)`` in
    bytes to upload."""
    if not backend.writable:
        raise OriginError(
            f"origin {backend.ref.url} is read only here: sync it from the directory its "
            "server publishes ('origin add ... --dir DIR') or another tool"
        )
    head, head_id, ids = await head_ids(content, store, registry, volume)
    run = functools.partial(trio.to_thread.run_sync, abandon_on_cancel=True)
    before = await run(read_latest, backend)
    if before is not None and before.volume_id != head.volume_id:
        raise OriginError(f"origin {backend.ref.url} holds another volume ({before.name!r})")
    if before is not None and before.seq > head.seq:
        raise OriginError(
            f"origin {backend.ref.url} holds snapshot {before.seq} of {volume!r}, newer than "
            f"this node's {head.seq}: another machine publishes it (see 'p2pfs volume restore')"
        )

    def present() -> set[bytes]:
        out = set()
        for key, _size in backend.list(OBJECTS):
            try:
                out.add(object_id_of(key))
            except DecodeError:
                log.warning("origin %s: ignoring %s", backend.ref.url, key)
        return out

    there = await run(present)
    missing = [oid for oid in ids if oid not in there]
    total = sum(ids[oid] for oid in missing)
    done = sent = 0
    absent: list[bytes] = []
    limiter = trio.CapacityLimiter(threads)

    async def upload(oid: bytes) -> None:
        nonlocal done, sent
        async with limiter:
            try:
                data = await content.load_stored(oid)
            except (MissingChunk, NotFound):
                absent.append(oid)
                return
            await trio.to_thread.run_sync(
                backend.put, object_key(oid), data, abandon_on_cancel=True
            )
        sent += 1
        done += ids[oid] or len(data)
        if progress is not None:
            progress(max(total, done), done)

    if progress is not None:
        progress(total, 0)
    async with trio.open_nursery() as nursery:
        for oid in missing:
            nursery.start_soon(upload, oid)
    if absent:
        raise P2pfsError(
            f"{len(absent)} objects of {volume!r} seq {head.seq} are neither in this node's "
            f"store nor at origin {backend.ref.url} (e.g. {absent[0].hex()}): nothing marked "
            "it complete; fetch them (p2pfs pin) and sync again"
        )
    data = await trio.to_thread.run_sync(store.get_object, head_id)
    if before is None or before.seq < head.seq:
        await run(backend.put, snapshot_key(head.seq), data)
        await run(backend.put, LATEST, data)
    log.info(
        "origin %s: %s seq %d: %d objects uploaded, %d already there",
        backend.ref.url,
        volume,
        head.seq,
        sent,
        len(ids) - len(missing),
    )
    return SyncReport(
        volume,
        backend.ref.url,
        head.seq,
        len(ids),
        sent,
        done,
        len(ids) - len(missing),
        None if before is None else before.seq,
    )
