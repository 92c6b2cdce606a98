"""Where the t10 tests write: the publisher's writable mount, or a plain directory.

By default a target is a real node: ``p2pfs init``, ``volume create tools``, an empty import,
``p2pfs mount`` (as root, so with allow_other), and the tests write under ``MNT/tools``. With
``P2PFS_WRITE_TARGET=native`` the same tests run on a directory of the machine's own
filesystem instead: that checks the tests themselves against the kernel's semantics, and the
p2pfs-only steps (``commit``, ``.snapshots``, restart) are played by copies.

Both kinds live under a fresh ``/tmp/p2pfs-t10-*`` directory of mode 0755 (pytest's tmp dirs
are 0700, which would hide the tree from the unprivileged user of the permission checks).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from harness import force_unmount, mounted, run_cli

VOLUME = "tools"
SNAPSHOTS = ".snapshots"


def target_kind() -> str:
    kind = os.environ.get("P2PFS_WRITE_TARGET", "p2pfs")
    if kind not in ("p2pfs", "native"):
        raise ValueError(f"P2PFS_WRITE_TARGET must be p2pfs or native, not {kind!r}")
    return kind


@dataclass(frozen=True)
class Commit:
    volume: str
    seq: int
    changed: bool


class Target:
    """One writable volume: ``base`` is its root directory."""

    def __init__(
        self, kind: str, home: Path, *, settle_s: float | None = None, keep_owners: bool = False
    ) -> None:
        self.kind = kind
        self.home = home
        self.top = Path(tempfile.mkdtemp(prefix="p2pfs-t10-"))
        os.chmod(self.top, 0o755)
        self.mnt = self.top / "mnt"
        self._mount: contextlib.ExitStack | None = None
        self._native_seq = 0
        if kind == "native":
            self.base = self.top / VOLUME
            self.base.mkdir()
            self._native_snaps = self.top / "native-snapshots"
            self._native_snaps.mkdir()
            return
        self.base = self.mnt / VOLUME
        run_cli(home, "init", check=True)
        if settle_s is not None:
            (home / "config.toml").write_text(f"[publish]\nsettle_s = {settle_s}\n")
        run_cli(home, "volume", "create", VOLUME, *["--keep-owners"] * keep_owners, check=True)
        empty = home.parent / "empty-import"
        empty.mkdir(exist_ok=True)
        run_cli(home, "import", str(empty), VOLUME, check=True)
        self._start()

    @property
    def is_p2pfs(self) -> bool:
        return self.kind == "p2pfs"

    def _start(self) -> None:
        stack = contextlib.ExitStack()
        stack.enter_context(mounted(self.home, self.mnt))
        self._mount = stack
        assert self.base.is_dir(), f"{self.base} is missing after mount"

    def _stop(self) -> None:
        if self._mount is not None:
            mount, self._mount = self._mount, None
            mount.close()

    def restart(self) -> None:
        """Stop the daemon (umount) and mount again; a no-op for a native directory."""
        if self.is_p2pfs:
            self._stop()
            self._start()

    def close(self) -> None:
        try:
            self._stop()
        finally:
            if self.is_p2pfs:
                force_unmount(self.mnt, self.home)
            if not os.path.ismount(self.mnt):
                shutil.rmtree(self.top, ignore_errors=True)

    def fresh(self, name: str) -> Path:
        """An empty directory of the volume for one test."""
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:200]
        d = self.base / safe
        if os.path.lexists(d):
            remove_tree(d)
        d.mkdir()
        return d

    def commit(self) -> Commit:
        """``p2pfs commit tools --json``; a native target copies its tree instead."""
        if self.is_p2pfs:
            proc = run_cli(self.home, "commit", VOLUME, "--json", check=True, timeout=300)
            report = json.loads(proc.stdout)
            assert report["volume"] == VOLUME, report
            assert isinstance(report["seq"], int) and isinstance(report["changed"], bool), report
            return Commit(report["volume"], report["seq"], report["changed"])
        previous = self._native_snaps / str(self._native_seq)
        changed = not previous.exists() or walk(previous, mtime=True) != walk(self.base, mtime=True)
        if changed:
            self._native_seq += 1
            shutil.copytree(self.base, self._native_snaps / str(self._native_seq), symlinks=True)
        return Commit(VOLUME, self._native_seq, changed)

    def snapshot_dir(self, seq: int) -> Path:
        if self.is_p2pfs:
            return self.base / SNAPSHOTS / str(seq)
        return self._native_snaps / str(seq)

    def log(self) -> list[int]:
        """The sequence numbers ``p2pfs log tools --json`` lists."""
        if not self.is_p2pfs:
            return sorted((int(p.name) for p in self._native_snaps.iterdir()), reverse=True)
        proc = run_cli(self.home, "log", VOLUME, "--json", check=True)
        return [s["seq"] for s in json.loads(proc.stdout)]


@contextlib.contextmanager
def write_target(
    home: Path, *, settle_s: float | None = None, keep_owners: bool = False
) -> Iterator[Target]:
    target = Target(target_kind(), home, settle_s=settle_s, keep_owners=keep_owners)
    try:
        yield target
    finally:
        target.close()


def remove_tree(path: Path) -> None:
    """rm -rf of a file, symlink or directory (the suite runs as root: modes do not stop it)."""
    if os.path.islink(path) or not os.path.isdir(path):
        os.unlink(path)
    else:
        shutil.rmtree(path)


def file_digest(path: Path | str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


Entry = tuple[object, ...]


def walk(
    root: Path, *, mtime: bool = False, nlink: bool = False, skip: frozenset[str] = frozenset()
) -> dict[str, Entry]:
    """Everything a snapshot keeps, by relative path: kind, mode bits (0o7777), and a file's
    size and sha256 or a symlink's target; a file's mtime_ns and nlink only when asked.
    Ownership, atime, directory sizes and nlink are left out. Names in ``skip`` are left out
    at the top (``.snapshots``)."""
    out: dict[str, Entry] = {}

    def visit(d: Path, rel: str) -> None:
        names = os.listdir(d)
        assert len(names) == len(set(names)), f"duplicate names listed in {d}"
        for name in sorted(names):
            if not rel and name in skip:
                continue
            p = d / name
            r = f"{rel}/{name}" if rel else name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                out[r] = ("link", os.readlink(p))
            elif stat.S_ISDIR(st.st_mode):
                out[r] = ("dir", oct(stat.S_IMODE(st.st_mode)))
                visit(p, r)
            elif stat.S_ISREG(st.st_mode):
                entry: Entry = ("file", oct(stat.S_IMODE(st.st_mode)), st.st_size, file_digest(p))
                if mtime:
                    entry += (st.st_mtime_ns,)
                if nlink:
                    entry += (st.st_nlink,)
                out[r] = entry
            else:
                out[r] = ("other", stat.S_IFMT(st.st_mode))

    visit(root, "")
    return out


def diff_walks(a: dict[str, Entry], b: dict[str, Entry], limit: int = 20) -> str:
    """A short, readable difference for assertion messages."""
    lines = []
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            lines.append(f"  {key}: {a.get(key)!r} != {b.get(key)!r}")
    more = f"\n  ... {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more
