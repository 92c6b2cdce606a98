"""The object model: blobs, trees and snapshots, their canonical encodings and checks.

Every object is a canonical msgpack map ``{"v": FORMAT_VERSION, "t": TYPE, ...}``
and its id is the BLAKE3-256 of those bytes (``object_id``). docs/objects.md is
the specification. Decoding takes hostile bytes: sizes, counts and nesting are
bounded, every field is type- and range-checked, non-canonical encodings are
refused, and any violation raises ``DecodeError`` naming what is wrong. A decoded
snapshot's signature has always been verified.

The dataclasses check their own fields on construction (``DecodeError`` too), so
an object that exists is a valid one and ``encode()`` cannot produce bytes that
``decode_*`` would refuse.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, field
from typing import Any

from p2pfs.errors import DecodeError
from p2pfs.ids import ID_SIZE, content_id
from p2pfs.keys import SIGNATURE_SIZE, SigningKey, verify
from p2pfs.names import name_problem

from . import codec
from .origins import OriginRef, decode_origins

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

MAX_BLOB_REFS = 4096
MAX_BLOB_LEVEL = 8  # 4096**8 chunks: far beyond any file
MAX_CHUNK_LENGTH = 64 * 1024 * 1024  # the chunker's largest max size
MAX_TREE_ENTRIES = 1_000_000
MAX_NAME = 255
MAX_SYMLINK_TARGET = 4096
MAX_PARAM_VALUE = 1 << 40
MAX_ALGORITHM_NAME = 64

MAX_BLOB_BYTES = 256 * 1024  # 4096 refs take about 160 KiB
MAX_TREE_BYTES = 64 * 1024 * 1024
MAX_SNAPSHOT_BYTES = 16 * 1024  # with MAX_ORIGINS origins of the longest URLs
MAX_ID_LIST = 32768  # ids in one list object of a private snapshot's id list (1 MiB)
MAX_ID_LIST_BYTES = MAX_ID_LIST * (ID_SIZE + 2 + 9) + 128
MAX_SEALED_KEY = 128

# A private volume's blobs and trees refer to sealed objects by a sealed ref: the
# object's id and then its key (p2pfs/seal.py); public ones by the id alone.
SEALED_REF_SIZE = 2 * ID_SIZE

SNAPSHOT_DOMAIN = b"p2pfs-snapshot-v1\0"

_U63 = (1 << 63) - 1
_I64_MIN = -(1 << 63)


class Kind(enum.IntEnum):
    FILE = 1
    DIR = 2
    SYMLINK = 3
    FIFO = 4
    SOCKET = 5
    CHR = 6  # character device
    BLK = 7  # block device


# Kinds with no content: no id, no target, size 0 (a device's rdev says which device).
SPECIAL_KINDS = frozenset({Kind.FIFO, Kind.SOCKET, Kind.CHR, Kind.BLK})
DEVICE_KINDS = frozenset({Kind.CHR, Kind.BLK})

# Extended attributes an entry may carry: the user.* namespace only, within Linux's own
# limits for one attribute (XATTR_NAME_MAX, XATTR_SIZE_MAX) and a bound on all of them.
XATTR_PREFIX = b"user."
# The filesystem's own synthetic attributes (fs/vfs.py: an entry's id, its snapshot).
RESERVED_XATTR_PREFIX = b"user.p2pfs."
MAX_XATTR_NAME = 255
MAX_XATTR_VALUE = 64 * 1024
MAX_XATTRS_BYTES = 128 * 1024  # names and values of one entry together
MAX_ID_NUMBER = (1 << 32) - 2  # a uid or gid (2**32 - 1 is "no change" to chown)
MAX_DEV_PART = (1 << 32) - 1  # a device's major or minor number


# An object's (or chunk's) id: BLAKE3-256 of its bytes.
object_id = content_id


# -- field checks (all raise DecodeError naming the field) -----------------------


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise DecodeError(f"{what} must be an integer, not {type(value).__name__}")
    if not lo <= value <= hi:
        raise DecodeError(f"{what} {value} is out of range {lo}..{hi}")
    return value


def _id(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or len(value) != ID_SIZE:
        raise DecodeError(f"{what} must be {ID_SIZE} bytes")
    return value


def _ref(value: object, what: str) -> bytes:
    """An id, or a sealed ref (id and key) in a private volume's objects."""
    if not isinstance(value, bytes) or len(value) not in (ID_SIZE, SEALED_REF_SIZE):
        raise DecodeError(f"{what} must be {ID_SIZE} bytes (or {SEALED_REF_SIZE}: sealed)")
    return value


def _opt_id(value: object, what: str) -> bytes | None:
    return None if value is None else _id(value, what)


def validate_name(name: bytes) -> None:
    """A directory entry's name: 1..255 bytes, not . or .., no / or NUL."""
    if not isinstance(name, bytes):
        raise DecodeError(f"entry name must be bytes, not {type(name).__name__}")
    if not name:
        raise DecodeError("entry name is empty")
    if len(name) > MAX_NAME:
        raise DecodeError(f"entry name is {len(name)} bytes, more than {MAX_NAME}")
    if name in (b".", b".."):
        raise DecodeError(f"entry name {name!r} is not allowed")
    if b"/" in name or b"\0" in name:
        raise DecodeError(f"entry name {name!r} contains '/' or NUL")


def validate_volume_name(name: str) -> None:
    """A volume name by the one rule (names.py); DecodeError if it breaks it."""
    if (problem := name_problem(name)) is not None:
        raise DecodeError(f"volume name: {problem}")


def validate_params(params: object) -> dict[str, int | str]:
    """The structure of chunking parameters (their meaning is the chunker's)."""
    if not isinstance(params, dict):
        raise DecodeError(f"chunk parameters must be a map, not {type(params).__name__}")
    if set(params) != {"algorithm", "min", "avg", "max"}:
        keys = sorted(str(k)[:32] for k in params)[:8]
        raise DecodeError(f"chunk parameters must have keys algorithm, min, avg, max; got {keys}")
    algorithm = params["algorithm"]
    if not isinstance(algorithm, str) or not 0 < len(algorithm) <= MAX_ALGORITHM_NAME:
        raise DecodeError(f"chunk algorithm must be a string of 1..{MAX_ALGORITHM_NAME} characters")
    mn = _int(params["min"], "chunk parameter min", 1, MAX_PARAM_VALUE)
    avg = _int(params["avg"], "chunk parameter avg", 1, MAX_PARAM_VALUE)
    mx = _int(params["max"], "chunk parameter max", 1, MAX_PARAM_VALUE)
    if not mn <= avg <= mx:
        raise DecodeError(f"chunk parameters need min <= avg <= max; got {mn}, {avg}, {mx}")
    return {"algorithm": algorithm, "min": mn, "avg": avg, "max": mx}


def _header(obj: object, kind: str, keys: set[str]) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DecodeError(f"{kind} must be a msgpack map, not {type(obj).__name__}")
    v = obj.get("v")
    if v != FORMAT_VERSION or isinstance(v, bool):
        raise DecodeError(
            f"{kind} has unknown format version {v!r} (this version reads {FORMAT_VERSION})"
        )
    if obj.get("t") != kind:
        raise DecodeError(f"object is a {obj.get('t')!r}, not a {kind}")
    if set(obj) != keys:
        missing = sorted(keys - set(obj))
        extra = sorted(str(k)[:32] for k in set(obj) - keys)[:8]
        raise DecodeError(f"{kind} fields wrong: missing {missing}, unknown {extra}")
    return obj


def _unpack(data: bytes, kind: str, max_size: int, max_depth: int = 4) -> object:
    if not isinstance(data, bytes | bytearray | memoryview):
        raise DecodeError(f"{kind} data must be bytes, not {type(data).__name__}")
    try:
        return codec.unpack(data, max_size=max_size, canonical=True, max_depth=max_depth)
    except DecodeError as e:
        raise DecodeError(f"{kind}: {e}") from None


def _list(value: object, what: str, max_len: int) -> list[Any]:
    if not isinstance(value, list):
        raise DecodeError(f"{what} must be an array, not {type(value).__name__}")
    if len(value) > max_len:
        raise DecodeError(f"{what} has {len(value)} items, more than {max_len}")
    return value


# -- blob -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ChunkRef:
    """A chunk (level 0) or child blob (level > 0) and the bytes it covers."""

    id: bytes
    length: int


@dataclass(frozen=True)
class Blob:
    """A file's content: ``refs`` cover ``size`` bytes in order.

    Level 0 refs are chunks; level n > 0 refs are blobs of level n - 1 and their
    length is the size of that blob.
    """

    size: int
    level: int
    refs: tuple[ChunkRef, ...]

    def __post_init__(self) -> None:
        _int(self.size, "blob size", 0, _U63)
        _int(self.level, "blob level", 0, MAX_BLOB_LEVEL)
        if not isinstance(self.refs, tuple):
            raise DecodeError("blob refs must be a tuple")
        if len(self.refs) > MAX_BLOB_REFS:
            raise DecodeError(f"blob has {len(self.refs)} refs, more than {MAX_BLOB_REFS}")
        max_len = MAX_CHUNK_LENGTH if self.level == 0 else _U63
        total = 0
        for i, ref in enumerate(self.refs):
            if not isinstance(ref, ChunkRef):
                raise DecodeError(f"blob ref {i} is not a ChunkRef")
            _ref(ref.id, f"blob ref {i} id")
            total += _int(ref.length, f"blob ref {i} length", 1, max_len)
        if total != self.size:
            raise DecodeError(f"blob refs cover {total} bytes but its size is {self.size}")
        if self.level > 0 and not self.refs:
            raise DecodeError(f"blob of level {self.level} has no refs")

    def encode(self) -> bytes:
        return codec.pack(
            {  # keys in canonical order: pack need not copy to sort them
                "l": self.level,
                "r": [[r.id, r.length] for r in self.refs],
                "s": self.size,
                "t": "blob",
                "v": FORMAT_VERSION,
            }
        )


def decode_blob(data: bytes) -> Blob:
    obj = _header(_unpack(data, "blob", MAX_BLOB_BYTES), "blob", {"v", "t", "s", "l", "r"})
    refs = []
    for i, item in enumerate(_list(obj["r"], "blob refs", MAX_BLOB_REFS)):
        pair = _list(item, f"blob ref {i}", 2)
        if len(pair) != 2:
            raise DecodeError(f"blob ref {i} must be [id, length]")
        refs.append(ChunkRef(pair[0], pair[1]))
    return Blob(size=obj["s"], level=obj["l"], refs=tuple(refs))


# -- tree -----------------------------------------------------------------------


def validate_xattrs(xattrs: object, what: str) -> tuple[tuple[bytes, bytes], ...]:
    """An entry's extended attributes: (name, value) pairs sorted by name, names unique,
    every name ``user.`` and more, within the limits above."""
    if not isinstance(xattrs, tuple):
        raise DecodeError(f"{what} xattrs must be a tuple")
    total = 0
    prev: bytes | None = None
    for item in xattrs:
        if not isinstance(item, tuple) or len(item) != 2:
            raise DecodeError(f"{what} xattrs must be (name, value) pairs")
        name, value = item
        if not isinstance(name, bytes) or not isinstance(value, bytes):
            raise DecodeError(f"{what} xattr names and values must be bytes")
        problem = xattr_name_problem(name)
        if problem is not None:
            raise DecodeError(f"{what} xattr {name[:64]!r}: {problem}")
        if len(value) > MAX_XATTR_VALUE:
            raise DecodeError(f"{what} xattr {name!r} value is more than {MAX_XATTR_VALUE} bytes")
        if prev is not None and name <= prev:
            raise DecodeError(f"{what} xattr {name!r} is duplicate or unsorted")
        prev = name
        total += len(name) + len(value)
    if total > MAX_XATTRS_BYTES:
        raise DecodeError(f"{what} xattrs take {total} bytes, more than {MAX_XATTRS_BYTES}")
    return xattrs


def xattr_name_problem(name: bytes) -> str | None:
    """What is wrong with an extended attribute's name for an entry (None: nothing)."""
    if not name.startswith(XATTR_PREFIX) or len(name) == len(XATTR_PREFIX):
        return "only user.* names are kept"
    if name.startswith(RESERVED_XATTR_PREFIX):
        return "user.p2pfs.* names are the filesystem's own"
    if len(name) > MAX_XATTR_NAME:
        return f"name is more than {MAX_XATTR_NAME} bytes"
    if b"\0" in name:
        return "name contains NUL"
    return None


@dataclass(frozen=True, slots=True)
class Entry:
    """One name in a directory.

    ``id`` is the blob id of a FILE and the tree id of a DIR; ``target`` is the
    link target of a SYMLINK (whose ``size`` is the target's length). FIFO, SOCKET,
    CHR and BLK have neither, and size 0; ``rdev`` is a device's number (dev_t, 0 for
    every other kind). ``xattrs`` are its ``user.*`` extended attributes, ``owner`` its
    (uid, gid) when the volume keeps owners.
    """

    name: bytes
    kind: Kind
    mode: int
    mtime_ns: int
    size: int
    id: bytes | None
    target: bytes | None
    rdev: int = 0
    xattrs: tuple[tuple[bytes, bytes], ...] = ()
    owner: tuple[int, int] | None = None

    def __post_init__(self) -> None:
        validate_name(self.name)
        if not isinstance(self.kind, Kind):
            try:
                object.__setattr__(self, "kind", Kind(_int(self.kind, "entry kind", 1, 7)))
            except ValueError:
                raise DecodeError(f"entry kind {self.kind!r} is unknown") from None
        _int(self.mode, "entry mode", 0, 0o7777)
        _int(self.mtime_ns, "entry mtime_ns", _I64_MIN, _U63)
        _int(self.size, "entry size", 0, _U63)
        what = f"{self.kind.name.lower()} {self.name!r}"
        if self.kind is Kind.SYMLINK:
            if self.id is not None:
                raise DecodeError(f"symlink {self.name!r} must not have an object id")
            t = self.target
            if not isinstance(t, bytes) or not 0 < len(t) <= MAX_SYMLINK_TARGET:
                raise DecodeError(
                    f"symlink {self.name!r} target must be 1..{MAX_SYMLINK_TARGET} bytes"
                )
            if b"\0" in t:
                raise DecodeError(f"symlink {self.name!r} target contains NUL")
            if self.size != len(t):
                raise DecodeError(f"symlink {self.name!r} size must be its target's length")
        elif self.kind in SPECIAL_KINDS:
            if self.id is not None or self.target is not None or self.size != 0:
                raise DecodeError(f"{what} has no object id, no target and size 0")
        else:
            _ref(self.id, f"{what} id")
            if self.target is not None:
                raise DecodeError(f"{what} must not have a target")
        _int(self.rdev, f"{what} rdev", 0, (1 << 64) - 1)
        if self.rdev and self.kind not in DEVICE_KINDS:
            raise DecodeError(f"{what} is not a device: it has no rdev")
        validate_xattrs(self.xattrs, what)
        if self.owner is not None:
            if not isinstance(self.owner, tuple) or len(self.owner) != 2:
                raise DecodeError(f"{what} owner must be (uid, gid)")
            _int(self.owner[0], f"{what} uid", 0, MAX_ID_NUMBER)
            _int(self.owner[1], f"{what} gid", 0, MAX_ID_NUMBER)

    def row(self) -> list[object]:
        """The entry as a tree holds it: the 7 fields, and a map of the optional ones only
        when one is set (so entries without them encode as before: same bytes, same ids)."""
        row: list[object] = [self.name, int(self.kind), self.mode, self.mtime_ns, self.size]
        row += [self.id, self.target]
        if self.rdev or self.xattrs or self.owner is not None:
            extra: dict[str, object] = {}
            if self.owner is not None:
                extra["o"] = list(self.owner)
            if self.rdev:
                extra["r"] = _dev_parts(self.rdev)
            if self.xattrs:
                extra["x"] = dict(self.xattrs)
            row.append(extra)
        return row


# glibc's dev_t layout (sys/sysmacros.h): 32-bit major and minor numbers in 64 bits. Kept
# here (not os.major) so an entry's encoding is the same on every machine.
def _dev_parts(dev: int) -> list[int]:
    return [
        ((dev >> 32) & 0xFFFFF000) | ((dev >> 8) & 0xFFF),
        ((dev >> 12) & 0xFFFFFF00) | (dev & 0xFF),
    ]


def make_dev(major: int, minor: int) -> int:
    """A dev_t from its major and minor numbers (glibc's makedev)."""
    return (
        ((major & 0xFFFFF000) << 32)
        | ((major & 0xFFF) << 8)
        | ((minor & 0xFFFFFF00) << 12)
        | (minor & 0xFF)
    )


_EXTRA_KEYS = frozenset({"o", "r", "x"})


def _entry_extra(value: object, i: int) -> dict[str, Any]:
    """The optional fields of tree entry ``i``: rdev, xattrs and owner, as keywords."""
    what = f"tree entry {i}"
    if not isinstance(value, dict) or not value:
        raise DecodeError(f"{what}'s optional fields must be a non-empty map")
    if not set(value) <= _EXTRA_KEYS:
        extra = sorted(str(k)[:32] for k in set(value) - _EXTRA_KEYS)[:8]
        raise DecodeError(f"{what} has unknown optional fields {extra}")
    out: dict[str, Any] = {}
    if "o" in value:
        owner = _list(value["o"], f"{what} owner", 2)
        if len(owner) != 2:
            raise DecodeError(f"{what} owner must be [uid, gid]")
        out["owner"] = (owner[0], owner[1])
    if "r" in value:
        dev = _list(value["r"], f"{what} rdev", 2)
        if len(dev) != 2:
            raise DecodeError(f"{what} rdev must be [major, minor]")
        major = _int(dev[0], f"{what} rdev major", 0, MAX_DEV_PART)
        minor = _int(dev[1], f"{what} rdev minor", 0, MAX_DEV_PART)
        if not major and not minor:
            raise DecodeError(f"{what} rdev 0 is written by leaving the field out")
        out["rdev"] = make_dev(major, minor)
    if "x" in value:
        xattrs = value["x"]
        if not isinstance(xattrs, dict) or not xattrs:
            raise DecodeError(f"{what} xattrs must be a non-empty map")
        # Canonical order (checked by the codec) sorts bytes keys by their bytes: the
        # tuple comes out sorted, as validate_xattrs requires.
        out["xattrs"] = tuple(xattrs.items())
    return out


@dataclass(frozen=True)
class Tree:
    """A directory: entries sorted by name bytes, names unique."""

    entries: tuple[Entry, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.entries, tuple):
            raise DecodeError("tree entries must be a tuple")
        if len(self.entries) > MAX_TREE_ENTRIES:
            raise DecodeError(f"tree has {len(self.entries)} entries, more than {MAX_TREE_ENTRIES}")
        prev: bytes | None = None
        for e in self.entries:
            if not isinstance(e, Entry):
                raise DecodeError("tree entries must be Entry objects")
            if prev is not None and e.name <= prev:
                what = "duplicate" if e.name == prev else "unsorted"
                raise DecodeError(f"tree entry {e.name!r} is {what} (after {prev!r})")
            prev = e.name

    def encode(self) -> bytes:
        return codec.pack(
            {  # keys in canonical order
                "e": [e.row() for e in self.entries],
                "t": "tree",
                "v": FORMAT_VERSION,
            }
        )


def decode_tree(data: bytes) -> Tree:
    # Depth 5: tree map, entries, entry, its optional fields, their xattrs or owner.
    raw = _unpack(data, "tree", MAX_TREE_BYTES, max_depth=5)
    obj = _header(raw, "tree", {"v", "t", "e"})
    entries = []
    for i, item in enumerate(_list(obj["e"], "tree entries", MAX_TREE_ENTRIES)):
        row = _list(item, f"tree entry {i}", 8)
        if len(row) == 8:
            entries.append(Entry(*row[:7], **_entry_extra(row[7], i)))
        elif len(row) == 7:
            entries.append(Entry(*row))
        else:
            raise DecodeError(
                f"tree entry {i} must be [name, kind, mode, mtime_ns, size, id, target]"
                " and optionally a map of rdev, xattrs and owner"
            )
    return Tree(tuple(entries))


# -- snapshot -------------------------------------------------------------------


@dataclass(frozen=True)
class Snapshot:
    """A signed version of a volume. ``volume_id`` is the publisher's public key.

    A private volume's snapshot also carries the key ``epoch`` its objects are sealed
    in, the root tree's key sealed under that epoch's secret (``root_key``), and the
    id of its id list (``ids``: every object id the snapshot reaches, so a node that
    may only cache the volume can fetch, pin and serve it without reading it).
    """

    volume_id: bytes
    name: str
    seq: int
    parent: bytes | None
    root: bytes
    time_ns: int
    params: dict[str, int | str] = field(hash=False)
    signature: bytes
    epoch: int = 0  # 0: a public volume
    root_key: bytes | None = None
    ids: bytes | None = None
    origins: tuple[OriginRef, ...] = ()  # where its objects are kept (objects/origins.py)

    @property
    def private(self) -> bool:
        return self.epoch > 0

    def __post_init__(self) -> None:
        _id(self.volume_id, "snapshot volume id")
        validate_volume_name(self.name)
        _int(self.seq, "snapshot seq", 1, _U63)
        _opt_id(self.parent, "snapshot parent")
        if (self.seq == 1) != (self.parent is None):
            raise DecodeError("a snapshot has a parent exactly when its seq is above 1")
        _id(self.root, "snapshot root")
        _int(self.time_ns, "snapshot time_ns", 0, _U63)
        object.__setattr__(self, "params", validate_params(self.params))
        if not isinstance(self.signature, bytes) or len(self.signature) != SIGNATURE_SIZE:
            raise DecodeError(f"snapshot signature must be {SIGNATURE_SIZE} bytes")
        _int(self.epoch, "snapshot epoch", 0, _U63)
        if self.epoch:
            k = self.root_key
            if not isinstance(k, bytes) or not 0 < len(k) <= MAX_SEALED_KEY:
                raise DecodeError(
                    f"a private snapshot's root key must be 1..{MAX_SEALED_KEY} bytes"
                )
            _id(self.ids, "snapshot id list")
        elif self.root_key is not None or self.ids is not None:
            raise DecodeError("a public snapshot has no root key or id list")
        if self.origins:
            decode_origins([o.to_wire() for o in self.origins])

    @classmethod
    def create(
        cls,
        key: SigningKey,
        *,
        name: str,
        seq: int,
        parent: bytes | None,
        root: bytes,
        time_ns: int,
        params: dict[str, int | str],
        epoch: int = 0,
        root_key: bytes | None = None,
        ids: bytes | None = None,
        origins: tuple[OriginRef, ...] = (),
    ) -> Snapshot:
        """A new snapshot of the volume whose publisher key is ``key``, signed."""
        fields = (key.public_bytes(), name, seq, parent, root, time_ns, params)
        unsigned = cls(*fields, bytes(SIGNATURE_SIZE), epoch, root_key, ids, origins)
        signature = key.sign(SNAPSHOT_DOMAIN + unsigned._body())
        return cls(*fields, signature, epoch, root_key, ids, origins)

    def _fields(self) -> dict[str, object]:
        return {
            "v": FORMAT_VERSION,
            "t": "snapshot",
            "vol": self.volume_id,
            "name": self.name,
            "seq": self.seq,
            "parent": self.parent,
            "root": self.root,
            "time": self.time_ns,
            "params": dict(self.params),
        } | (
            ({"epoch": self.epoch, "rkey": self.root_key, "ids": self.ids} if self.epoch else {})
            # Absent when none: the snapshots of the first releases keep their ids.
            | ({"orig": [o.to_wire() for o in self.origins]} if self.origins else {})
        )

    def _body(self) -> bytes:
        """The canonical bytes the signature covers: every field but the signature."""
        return codec.pack(self._fields())

    def verify(self) -> None:
        """SignatureError unless ``signature`` is the volume key's over the body."""
        verify(self.volume_id, self.signature, SNAPSHOT_DOMAIN + self._body())

    def encode(self) -> bytes:
        return codec.pack({**self._fields(), "sig": self.signature})


_SNAPSHOT_KEYS = {"v", "t", "vol", "name", "seq", "parent", "root", "time", "params", "sig"}
_PRIVATE_KEYS = _SNAPSHOT_KEYS | {"epoch", "rkey", "ids"}


def decode_snapshot(data: bytes) -> Snapshot:
    """Decode and validate a snapshot and verify its signature (SignatureError)."""
    raw = _unpack(data, "snapshot", MAX_SNAPSHOT_BYTES)
    private = isinstance(raw, dict) and "epoch" in raw
    keys = _PRIVATE_KEYS if private else _SNAPSHOT_KEYS
    obj = _header(
        raw, "snapshot", keys | {"orig"} if isinstance(raw, dict) and "orig" in raw else keys
    )
    snap = Snapshot(
        volume_id=obj["vol"],
        name=obj["name"],
        seq=obj["seq"],
        parent=obj["parent"],
        root=obj["root"],
        time_ns=obj["time"],
        params=obj["params"],
        signature=obj["sig"],
        epoch=obj.get("epoch", 0),
        root_key=obj.get("rkey"),
        ids=obj.get("ids"),
        origins=decode_origins(obj["orig"]) if "orig" in obj else (),
    )
    if private and snap.epoch == 0:
        raise DecodeError("snapshot epoch 0 is written by leaving the field out")
    snap.verify()
    return snap
