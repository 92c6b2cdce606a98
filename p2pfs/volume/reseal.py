"""Sealing a private volume's head snapshot again under a new key epoch (``rekey --full``).

A revocation starts a new epoch for what is published next; content that did not
change keeps the keys it had, which every node that once read it may still hold.
``reseal`` reads the whole head tree from the local store with its current keys and
seals every tree, blob and chunk again under the new epoch, then signs the result as
the next snapshot: from then on no key a former reader held opens anything the head
reaches. Older snapshots stay as they were (the history is signed and immutable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from p2pfs.errors import MissingChunk, P2pfsError
from p2pfs.ids import content_id
from p2pfs.objects.model import ChunkRef, Kind, Snapshot, Tree, decode_tree
from p2pfs.seal import EpochSecret
from p2pfs.store.cas import Store

from .importer import (
    ChunkWriter,
    ImportReport,
    commit_snapshot,
    leaf_refs,
    read_object,
    store_blob,
)
from .registry import VolumeRegistry


def reseal(
    store: Store,
    registry: VolumeRegistry,
    volume: str,
    sealing: EpochSecret,
    root_of: Callable[[Snapshot], bytes],
) -> ImportReport:
    """Seal volume ``volume``'s head again in ``sealing``'s epoch as its next snapshot."""
    record = registry.get(volume)
    if not registry.is_publisher(volume):
        raise P2pfsError(f"volume {volume!r} is published by another node: reseal it there")
    head = registry.load_head(store, record)
    if head is None:
        raise P2pfsError(f"volume {volume!r} has no snapshot to seal again")
    if head.epoch == sealing.epoch:
        raise P2pfsError(f"the head of {volume!r} is already sealed in epoch {sealing.epoch}")
    report = ImportReport(volume)
    writer = ChunkWriter(store, report, sealing)

    def chunk(ref: bytes) -> bytes:
        try:
            return read_object(store, ref)
        except MissingChunk:
            raise P2pfsError(
                f"volume {volume!r}: a chunk of the head is not stored here ({ref[:32].hex()}); "
                "pin the volume on this node first"
            ) from None

    def blob(ref: bytes) -> bytes:
        refs = [
            ChunkRef(writer.add(content_id(plain), memoryview(plain)), r.length)
            for r in leaf_refs(store, ref)
            for plain in (chunk(r.id),)
        ]
        size = sum(r.length for r in refs)
        report.files += 1
        report.bytes += size
        return store_blob(writer.put_object, size, refs)

    def tree(ref: bytes) -> bytes:
        entries = []
        for e in decode_tree(chunk(ref)).entries:
            if e.kind is Kind.DIR and e.id is not None:
                report.dirs += 1
                entries.append(dataclasses.replace(e, id=tree(e.id)))
            elif e.kind is Kind.FILE and e.id is not None:
                entries.append(dataclasses.replace(e, id=blob(e.id)))
            else:
                report.symlinks += e.kind is Kind.SYMLINK
                entries.append(e)
        return writer.put_object(Tree(tuple(entries)).encode())

    root = tree(root_of(head))
    writer.flush()
    record, snapshot, sid = commit_snapshot(
        store, registry, record, root, dict(head.params), writer
    )
    report.snapshot_id = sid
    report.seq = snapshot.seq
    return report
