"""The work tree's nodes: one ``WNode`` per inode, and the records a commit plans with."""

from __future__ import annotations

from dataclasses import dataclass

from p2pfs.errors import ErrnoError
from p2pfs.objects.model import Entry, Kind

ROOT = 1

# rename(2) flags, as FUSE passes them.
RENAME_NOREPLACE = 1

RENAME_EXCHANGE = 2


class TreeError(ErrnoError):
    """A refused change: ``errno`` is what the caller answers."""


@dataclass
class Chunked:
    """A staged file's content as last chunked into the store."""

    blob: bytes
    size: int
    gen: int  # the node's write generation it was read at


class WNode:
    __slots__ = (
        "atime_ns",
        "blob",
        "changed",
        "children",
        "chunked",
        "ctime_ns",
        "gen",
        "gid",
        "ino",
        "kind",
        "links",
        "lookups",
        "mode",
        "mtime_ns",
        "nlink",
        "opens",
        "rdev",
        "size",
        "staged",
        "subdirs",
        "target",
        "tree",
        "tree_clock",
        "uid",
        "writers",
        "xattrs",
    )

    def __init__(self, ino: int, kind: Kind, mode: int, uid: int, gid: int) -> None:
        self.ino = ino
        self.kind = kind
        self.mode = mode  # permission bits only (0o7777)
        self.uid = uid
        self.gid = gid
        self.size = 0
        self.mtime_ns = self.ctime_ns = self.atime_ns = 0  # atime: set, never moved by reads
        self.nlink = 1
        self.blob: bytes | None = None  # clean files
        self.target: bytes | None = None  # symlinks
        self.rdev = 0  # devices
        self.xattrs: dict[bytes, bytes] = {}  # user.* only
        self.tree: bytes | None = None  # dirs: tree id, valid while tree_clock >= changed
        self.tree_clock = -1
        self.children: dict[bytes, int] | None = None  # dirs, once loaded
        # Dirs: how many children are directories (st_nlink is 2 + this). Kept exact by
        # every name added or removed once loaded; None: not counted yet (an unloaded
        # directory, counted from its tree object by whoever needs it).
        self.subdirs: int | None = None
        self.links: set[tuple[int, bytes]] = set()  # (parent, name) of every name
        self.staged = False
        self.chunked: Chunked | None = None
        self.gen = 0  # bumped by every change of a staged file's content
        self.changed = 0  # clock of the last change at or below this node
        self.lookups = 0  # the kernel's references
        self.opens = 0
        self.writers = 0

    @property
    def loaded(self) -> bool:
        return self.children is not None

    @property
    def parent(self) -> int:
        """Some parent (a directory has exactly one)."""
        return next(iter(self.links))[0] if self.links else ROOT


def entry_of(
    name: bytes,
    n: WNode,
    *,
    size: int,
    id: bytes | None,
    target: bytes | None = None,
    keep_owners: bool,
) -> Entry:
    """The tree entry of ``n`` named ``name``: its kind and attributes, a device's number,
    its xattrs, and its owner when the volume keeps owners."""
    return Entry(
        name,
        n.kind,
        n.mode,
        n.mtime_ns,
        size,
        id,
        target,
        rdev=n.rdev,
        xattrs=tuple(sorted(n.xattrs.items())),
        owner=(n.uid, n.gid) if keep_owners else None,
    )


@dataclass(frozen=True)
class DirPlan:
    """A directory whose tree object must be made again, captured at one instant.

    ``entries`` hold final ids for files and symlinks; a subdirectory's id is
    resolved from ``subdirs`` (its ino) when it is itself in the plan.
    """

    ino: int
    entries: list[Entry]
    subdirs: dict[bytes, int]  # name -> ino of a subdirectory whose tree is planned too
