"""Import a directory tree into a volume: chunk, deduplicate, store, sign a snapshot.

Unchanged files are skipped by their stat, as borg's files cache does: a file whose
size, mtime, ctime and inode match the last import reuses its blob without being
read. Devices, sockets and fifos become entries of their kind (a device with its
number), every entry carries its ``user.*`` extended attributes, and its uid and gid
when the volume keeps owners (``volume create --keep-owners``); unreadable files and
directories are reported and left out, never fatal.

A private volume's import seals every chunk, blob and tree (``p2pfs/seal.py``) in
the volume's current key epoch, so the store never holds its plaintext; the snapshot
carries the sealed root key and the id list of everything it reaches.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from p2pfs.chunking.chunker import iter_chunks
from p2pfs.chunking.params import ChunkParams
from p2pfs.errors import IntegrityError, NotFound, P2pfsError
from p2pfs.ids import keyed
from p2pfs.objects.id_list import IdList
from p2pfs.objects.model import (
    DEVICE_KINDS,
    MAX_BLOB_REFS,
    MAX_ID_LIST,
    MAX_XATTR_VALUE,
    MAX_XATTRS_BYTES,
    Blob,
    ChunkRef,
    Entry,
    Kind,
    Snapshot,
    Tree,
    decode_blob,
    object_id,
    xattr_name_problem,
)
from p2pfs.seal import (
    TAG_SIZE,
    EpochSecret,
    epoch_key,
    is_sealed,
    open_small,
    seal,
    seal_root,
    seal_small,
    stored_id,
    unseal,
)
from p2pfs.store.cas import Store
from p2pfs.store.files_cache import CachedFile

from .registry import VolumeRecord, VolumeRegistry

log = logging.getLogger(__name__)

# Chunks are written in batches so one durability barrier covers many of them.
BATCH_BYTES = 32 * 1024 * 1024
BATCH_COUNT = 512
# A file modified this close to the import's start may change again within the
# same mtime tick: don't let the files cache vouch for it next time.
CACHE_GRACE_NS = 2_000_000_000
MAX_SYMLINK_TARGET = 4096

Progress = Callable[[int, int], None]  # (files done, bytes done)


@dataclass
class ImportReport:
    volume: str
    snapshot_id: bytes = b""
    seq: int = 0
    files: int = 0
    dirs: int = 0
    symlinks: int = 0
    specials: int = 0  # fifos, sockets, devices
    bytes: int = 0
    reused_files: int = 0
    new_chunks: int = 0
    new_bytes: int = 0
    unique_bytes: int = 0
    warnings: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def dedup_ratio(self) -> float:
        return self.bytes / self.unique_bytes if self.unique_bytes else 1.0

    def as_dict(self) -> dict[str, object]:
        return {
            "volume": self.volume,
            "snapshot": self.snapshot_id.hex(),
            "seq": self.seq,
            "files": self.files,
            "dirs": self.dirs,
            "symlinks": self.symlinks,
            "specials": self.specials,
            "bytes": self.bytes,
            "reused_files": self.reused_files,
            "new_chunks": self.new_chunks,
            "new_bytes": self.new_bytes,
            "dedup_ratio": round(self.dedup_ratio, 3),
            "warnings": self.warnings,
            "errors": self.errors,
        }


@dataclass
class _Scanned:
    """One entry found by the walk, before its content is stored."""

    name: bytes
    rel: bytes
    st: os.stat_result
    children: list[_Scanned] | None = None  # directories only


class ChunkWriter:
    """Collects new chunks and writes them to the store in batches; seals them first
    when the volume is private (``sealing``): then refs are sealed refs."""

    def __init__(
        self, store: Store, report: ImportReport, sealing: EpochSecret | None = None
    ) -> None:
        self.store = store
        self.report = report
        self.sealing = sealing
        # Every stored id a private snapshot reaches and its stored size, for its id list.
        self.reached: dict[bytes, int] = {}
        self._sealed: dict[bytes, bytes] = {}  # plaintext id -> sealed ref
        self.pending: dict[bytes, bytes] = {}
        self.pending_bytes = 0
        self.seen: dict[bytes, int] = {}  # chunk ids of this snapshot -> length
        # Blob and tree objects ride in the same batches: one fsync per small file's
        # blob made imports of many small files fsync-bound (3.3 of 12 s for 10,000).
        self.objects: dict[bytes, bytes] = {}
        self.objects_bytes = 0

    def add(self, cid: bytes, data: memoryview) -> bytes:
        """Store a chunk whose plaintext id is ``cid``; returns its ref."""
        stored: bytes | memoryview
        if self.sealing is None:
            ref, stored = cid, data
        else:
            if cid in self._sealed:  # the same plaintext again: the same ciphertext
                return self._sealed[cid]
            stored, ref = seal(self.sealing.secret, data, cid)
            self._sealed[cid] = ref
            self.reached[stored_id(ref)] = len(stored)
        if ref not in self.seen:
            self.seen[ref] = len(data)
            self.report.unique_bytes += len(data)
            sid = stored_id(ref)
            if not self.store.has(sid):
                self.pending[sid] = stored if isinstance(stored, bytes) else bytes(stored)
                self.pending_bytes += len(stored)
                if self.pending_bytes >= BATCH_BYTES or len(self.pending) >= BATCH_COUNT:
                    self.flush()
        return ref

    def note_existing(self, refs: list[ChunkRef]) -> None:
        for ref in refs:
            if self.sealing is not None:
                self.reached[stored_id(ref.id)] = ref.length + TAG_SIZE
            if ref.id not in self.seen:
                self.seen[ref.id] = ref.length
                self.report.unique_bytes += ref.length

    def put_object(self, data: bytes) -> bytes:
        """Store a blob or tree; returns its ref (a sealed ref in a private volume)."""
        oid: bytes
        ref: bytes
        if self.sealing is None:
            oid = ref = object_id(data)
        else:
            data, ref = seal(self.sealing.secret, data)
            oid = stored_id(ref)
            self.reached[oid] = len(data)
        if oid not in self.objects and not self.store.has(oid):
            self.objects[oid] = data
            self.objects_bytes += len(data)
            if self.objects_bytes >= BATCH_BYTES or len(self.objects) >= BATCH_COUNT:
                self.flush()
        return ref

    def flush(self) -> None:
        if self.objects:
            self.store.put_many(self.objects.items(), source="object")
            self.objects.clear()
            self.objects_bytes = 0
        if self.pending:
            new = self.store.put_many(self.pending.items(), source="import")
            self.report.new_chunks += new
            if new:
                self.report.new_bytes += self.pending_bytes
            self.pending.clear()
            self.pending_bytes = 0


def read_object(store: Store, ref: bytes) -> bytes:
    """A stored blob's or tree's plaintext by its ref (opened if sealed)."""
    if is_sealed(ref):
        return unseal(ref, store.get_object(stored_id(ref)))
    return store.get_object(ref)


def leaf_refs(
    store: Store, blob_ref: bytes, visit: Callable[[bytes, int], object] | None = None
) -> list[ChunkRef]:
    """The chunk refs of a stored blob, descending its index levels; ``visit`` sees the
    stored id and size of every blob object on the way."""
    data = store.get_object(stored_id(blob_ref))
    if visit is not None:
        visit(stored_id(blob_ref), len(data))
    blob = decode_blob(unseal(blob_ref, data) if is_sealed(blob_ref) else data)
    if blob.level == 0:
        return list(blob.refs)
    out: list[ChunkRef] = []
    for ref in blob.refs:
        out.extend(leaf_refs(store, ref.id, visit))
    return out


def store_id_list(put: Callable[[bytes], bytes], reached: dict[bytes, int]) -> bytes:
    """Store a private snapshot's id list as a chain of parts; returns the first's id."""
    ids, sizes = list(reached), list(reached.values())
    following: bytes | None = None
    starts = list(range(0, len(ids), MAX_ID_LIST)) or [0]
    for start in reversed(starts):
        end = start + MAX_ID_LIST
        following = put(IdList(tuple(ids[start:end]), tuple(sizes[start:end]), following).encode())
    assert following is not None
    return following


def commit_snapshot(
    store: Store,
    registry: VolumeRegistry,
    record: VolumeRecord,
    root: bytes,
    params: dict[str, int | str],
    writer: ChunkWriter,
) -> tuple[VolumeRecord, Snapshot, bytes]:
    """Sign and store the next snapshot of ``record`` with root ``root`` (a ref); for a
    private volume with its sealed root key and id list, every id tagged as its own."""
    seq = record.seq + 1
    extra: dict[str, object] = {}
    if writer.sealing is not None:
        parts: list[bytes] = []

        def put_part(data: bytes) -> bytes:
            oid = store.put_object(data)
            parts.append(oid)
            return oid

        reached = list(writer.reached)
        ids_head = store_id_list(put_part, writer.reached)
        extra = {
            "epoch": writer.sealing.epoch,
            "root_key": seal_root(writer.sealing.secret, record.id, seq, root),
            "ids": ids_head,
        }
        # Tagged before the head moves: no moment in which a peer could be served
        # these ids as if they were public.
        store.tag(record.id, [*reached, *parts])
    snapshot = Snapshot.create(
        registry.publisher_key(record.name),
        name=record.name,
        seq=seq,
        parent=record.head,
        root=stored_id(root),
        time_ns=time.time_ns(),
        params=params,
        # The origins the head announced stay announced (p2pfs origin add/remove).
        origins=head.origins if (head := registry.load_head(store, record)) else (),
        **extra,  # type: ignore[arg-type]
    )
    data = snapshot.encode()
    if writer.sealing is not None:
        store.tag(record.id, [object_id(data)])
    sid = store.put_object(data)
    return registry.advance(record, snapshot, sid), snapshot, sid


def store_blob(put: Callable[[bytes], bytes], size: int, refs: list[ChunkRef]) -> bytes:
    """Store a file's chunk list as a blob, as a tree of index nodes when it is long."""
    level = 0
    while len(refs) > MAX_BLOB_REFS:
        parents: list[ChunkRef] = []
        for i in range(0, len(refs), MAX_BLOB_REFS):
            group = tuple(refs[i : i + MAX_BLOB_REFS])
            covered = sum(r.length for r in group)
            oid = put(Blob(size=covered, level=level, refs=group).encode())
            parents.append(ChunkRef(oid, covered))
        refs = parents
        level += 1
    return put(Blob(size=size, level=level, refs=tuple(refs)).encode())


class Importer:
    def __init__(
        self,
        store: Store,
        registry: VolumeRegistry,
        volume: str,
        *,
        progress: Progress | None = None,
        sealing: EpochSecret | None = None,
    ) -> None:
        self.store = store
        self.registry = registry
        self.record: VolumeRecord = registry.get(volume)
        self.params: ChunkParams = self.record.params
        self.report = ImportReport(volume)
        self.progress = progress
        self.writer = ChunkWriter(store, self.report, sealing)
        # A private volume's files cache is per epoch: a new epoch seals every file anew.
        self.cache_key = volume if sealing is None else f"{volume}/epoch-{sealing.epoch}"
        # ...and holds neither names nor keys in the clear: paths as keyed hashes, blob
        # refs sealed (the index is a store file: a private volume leaves no plaintext).
        self._cache_secret = None if sealing is None else epoch_key(sealing.secret, b"files")
        self.cache = store.files_cache
        self.new_cache: list[tuple[bytes, CachedFile]] = []
        self.started_ns = time.time_ns()
        self.total_bytes = 0

    # -- walk -------------------------------------------------------------

    def scan(self, source: Path) -> _Scanned:
        try:
            st = os.stat(source)
        except FileNotFoundError:
            raise NotFound(f"cannot import {source}: no such directory") from None
        except OSError as e:
            raise P2pfsError(f"cannot import {source}: {e.strerror}") from None
        if not stat.S_ISDIR(st.st_mode):
            raise P2pfsError(f"cannot import {source}: not a directory")
        root = _Scanned(b"", b"", st)
        root.children = self._scan_dir(os.fsencode(source), b"")
        if root.children is None:
            raise P2pfsError(f"cannot import {source}: directory is not readable")
        return root

    def _scan_dir(self, path: bytes, rel: bytes) -> list[_Scanned] | None:
        try:
            with os.scandir(path) as it:
                found = sorted(it, key=lambda d: d.name)
        except OSError as e:
            self._error(rel or b".", e)
            return None
        out: list[_Scanned] = []
        for d in found:
            child_rel = rel + b"/" + d.name if rel else d.name
            try:
                st = d.stat(follow_symlinks=False)
            except OSError as e:
                self._error(child_rel, e)
                continue
            item = _Scanned(d.name, child_rel, st)
            if stat.S_ISDIR(st.st_mode):
                item.children = self._scan_dir(d.path, child_rel)
                if item.children is None:
                    continue
            elif stat.S_ISREG(st.st_mode):
                self.total_bytes += st.st_size
            elif not stat.S_ISLNK(st.st_mode) and _special_kind(st.st_mode) is None:
                msg = f"skipped {child_rel.decode(errors='replace')}: unsupported file type"
                self.report.warnings.append(msg)
                log.warning("%s", msg)
                continue
            out.append(item)
        return out

    def _error(self, rel: bytes, e: OSError) -> None:
        msg = f"cannot read {rel.decode(errors='replace')}: {e.strerror or e}"
        self.report.errors.append(msg)
        log.warning("%s", msg)

    # -- store ------------------------------------------------------------

    def run(self, source: Path) -> ImportReport:
        root = self.scan(source)
        assert root.children is not None
        root_tree = self._store_dir(os.fsencode(source), root.children)
        self.writer.flush()
        self.record, snapshot, sid = commit_snapshot(
            self.store, self.registry, self.record, root_tree, self.params.to_dict(), self.writer
        )
        # Only a complete import may vouch for files next time.
        self.cache.replace(self.cache_key, self.new_cache)
        self.report.snapshot_id = sid
        self.report.seq = snapshot.seq
        return self.report

    def _store_dir(self, path: bytes, children: list[_Scanned]) -> bytes:
        entries: list[Entry] = []
        for item in children:
            child_path = path + b"/" + item.name
            st = item.st
            mode = stat.S_IMODE(st.st_mode)
            special = _special_kind(st.st_mode)
            entry: Entry
            if item.children is not None:
                tid = self._store_dir(child_path, item.children)
                entry = Entry(item.name, Kind.DIR, mode, st.st_mtime_ns, 0, tid, None)
                self.report.dirs += 1
            elif stat.S_ISLNK(st.st_mode):
                try:
                    target = os.readlink(child_path)
                except OSError as e:
                    self._error(item.rel, e)
                    continue
                if not 0 < len(target) <= MAX_SYMLINK_TARGET:
                    self._error(item.rel, OSError(errno.ENAMETOOLONG, "link target too long"))
                    continue
                entry = Entry(
                    item.name, Kind.SYMLINK, mode, st.st_mtime_ns, len(target), None, target
                )
                self.report.symlinks += 1
            elif special is not None:
                rdev = st.st_rdev if special in DEVICE_KINDS else 0
                entry = Entry(item.name, special, mode, st.st_mtime_ns, 0, None, None, rdev=rdev)
                self.report.specials += 1
            else:
                stored = self._store_file(child_path, item)
                if stored is None:
                    continue
                blob_id, size = stored
                entry = Entry(item.name, Kind.FILE, mode, st.st_mtime_ns, size, blob_id, None)
            owner = (st.st_uid, st.st_gid) if self.record.keep_owners else None
            xattrs = self._xattrs(child_path, item.rel)
            if owner is not None or xattrs:
                entry = dataclasses.replace(entry, owner=owner, xattrs=xattrs)
            entries.append(entry)
        return self.writer.put_object(Tree(tuple(entries)).encode())

    def _xattrs(self, path: bytes, rel: bytes) -> tuple[tuple[bytes, bytes], ...]:
        """An entry's user.* extended attributes as a tree keeps them; the others, and
        what does not fit the tree's limits, are left out (with a warning)."""
        try:
            names = os.listxattr(path, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.ENODATA):
                self._warn(rel, f"extended attributes not read: {e.strerror}")
            return ()
        out: list[tuple[bytes, bytes]] = []
        total = 0
        for name in sorted(os.fsencode(n) for n in names):
            if not name.startswith(b"user."):
                continue  # other namespaces are not carried (docs/live.md)
            problem = xattr_name_problem(name)
            try:
                value = b"" if problem else os.getxattr(path, name, follow_symlinks=False)
            except OSError as e:
                if e.errno != errno.ENODATA:  # removed meanwhile
                    self._warn(rel, f"extended attribute {name!r} not read: {e.strerror}")
                continue
            if problem is None and len(value) > MAX_XATTR_VALUE:
                problem = f"value is more than {MAX_XATTR_VALUE} bytes"
            if problem is None and total + len(name) + len(value) > MAX_XATTRS_BYTES:
                problem = f"all of them take more than {MAX_XATTRS_BYTES} bytes"
            if problem is not None:
                self._warn(rel, f"extended attribute {name!r} left out: {problem}")
                continue
            total += len(name) + len(value)
            out.append((name, value))
        return tuple(out)

    def _warn(self, rel: bytes, what: str) -> None:
        msg = f"{rel.decode(errors='replace')}: {what}"
        self.report.warnings.append(msg)
        log.warning("%s", msg)

    def _cache_path(self, rel: bytes) -> bytes:
        return rel if self._cache_secret is None else keyed(self._cache_secret, rel)

    def _cache_ref(self, ref: bytes) -> bytes:
        if self._cache_secret is None:
            return ref
        return seal_small(self._cache_secret, ref, b"p2pfs-files-cache-v1\0")

    def _cached(self, rel: bytes) -> CachedFile | None:
        cached = self.cache.lookup(self.cache_key, self._cache_path(rel))
        if cached is None or self._cache_secret is None:
            return cached
        try:
            ref = open_small(self._cache_secret, cached.blob_id, b"p2pfs-files-cache-v1\0")
        except IntegrityError:
            return None
        return dataclasses.replace(cached, blob_id=ref)

    def _store_file(self, path: bytes, item: _Scanned) -> tuple[bytes, int] | None:
        st = item.st
        cached = self._cached(item.rel)
        if (
            cached is not None
            and cached.size == st.st_size
            and cached.mtime_ns == st.st_mtime_ns
            and cached.ctime_ns == st.st_ctime_ns
            and cached.ino == st.st_ino
            and self.store.has(stored_id(cached.blob_id))
        ):
            visit = None if self.writer.sealing is None else self.writer.reached.setdefault
            try:
                refs = leaf_refs(self.store, cached.blob_id, visit)
            except Exception as e:  # a damaged cached blob: fall back to reading
                log.warning("files cache entry of %r unusable: %s", item.rel, e)
            else:
                self.writer.note_existing(refs)
                self._done_file(item, cached.blob_id, st.st_size, reused=True)
                return cached.blob_id, st.st_size
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as e:
            self._error(item.rel, e)
            return None
        try:
            refs = []
            size = 0
            for record, data in iter_chunks(fd, self.params, size_hint=st.st_size):
                refs.append(ChunkRef(self.writer.add(record.id, data), record.length))
                size += record.length
                if self.progress:
                    self.progress(0, record.length)
            opened = os.fstat(fd)
        except OSError as e:
            self._error(item.rel, e)
            return None
        finally:
            os.close(fd)
        blob_id = store_blob(self.writer.put_object, size, refs)
        # A file that changed while it was read is stored as read, but not cached.
        changed = opened.st_mtime_ns != st.st_mtime_ns or opened.st_size != size
        self._done_file(item, blob_id, size, reused=False, cacheable=not changed)
        return blob_id, size

    def _done_file(
        self, item: _Scanned, blob_id: bytes, size: int, *, reused: bool, cacheable: bool = True
    ) -> None:
        st = item.st
        self.report.files += 1
        self.report.bytes += size
        if reused:
            self.report.reused_files += 1
            if self.progress:
                self.progress(1, size)
        elif self.progress:
            self.progress(1, 0)
        if cacheable and st.st_mtime_ns < self.started_ns - CACHE_GRACE_NS:
            self.new_cache.append(
                (
                    self._cache_path(item.rel),
                    CachedFile(
                        size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, self._cache_ref(blob_id)
                    ),
                )
            )


def _special_kind(mode: int) -> Kind | None:
    """The kind of a fifo, socket or device (None for anything else)."""
    if stat.S_ISCHR(mode):
        return Kind.CHR
    if stat.S_ISBLK(mode):
        return Kind.BLK
    if stat.S_ISSOCK(mode):
        return Kind.SOCKET
    if stat.S_ISFIFO(mode):
        return Kind.FIFO
    return None
