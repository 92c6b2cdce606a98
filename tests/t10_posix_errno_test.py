"""POSIX answers Linux filesystems give and the mounts must too (issue posix12): a name over
255 bytes is ENAMETOOLONG for every operation naming it, a directory's st_nlink is 2 + its
subdirectories, and a sparse file's st_blocks counts what is allocated, not its size.

Every check runs the same operations on a plain directory of this machine first (the
reference: what ext4 or tmpfs answers) and then on the publisher's writable mount, its
read-only ``.snapshots/`` and a read-only mount of an imported tree.
"""

from __future__ import annotations

import ctypes
import errno
import os
import random
import stat
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from harness import mounted, run_cli
from writable import SNAPSHOTS, VOLUME, Target, write_target

pytestmark = [pytest.mark.mount, pytest.mark.fuse, pytest.mark.timeout(600)]

MIB = 1024 * 1024
LONG = "n" * 256  # one byte over NAME_MAX


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with write_target(tmp_path_factory.mktemp("t10errno") / "home") as t:
        yield t


@pytest.fixture
def work(target: Target, request: pytest.FixtureRequest) -> Path:
    return target.fresh(request.node.name)


@pytest.fixture
def reference() -> Iterator[Path]:
    """A plain directory on this machine's own filesystem."""
    with tempfile.TemporaryDirectory(prefix="p2pfs-t10-ref-") as d:
        yield Path(d)


def make_dirs(root: Path) -> None:
    """Directories with 0, 1 and 3 subdirectories, files beside them, and a symlink to one."""
    for rel in ["a", "a/b", "a/b/c", "a/d", "a/e", "f"]:
        (root / rel).mkdir()
    for rel in ["a/file", "a/b/file", "top-file"]:
        (root / rel).write_bytes(b"x")
    os.symlink("a", root / "link-to-a")


def dir_nlinks(root: Path) -> dict[str, int]:
    """st_nlink of every directory under ``root`` (included as "."), by relative path."""
    out = {".": os.lstat(root).st_nlink}
    for dirpath, dirnames, _files in os.walk(root):
        for name in dirnames:
            p = Path(dirpath) / name
            out[str(p.relative_to(root))] = os.lstat(p).st_nlink
    return out


def renameat2(src: Path, dst: Path, flags: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("this libc has no renameat2")
    at_fdcwd = -100
    if libc.renameat2(at_fdcwd, bytes(src), at_fdcwd, bytes(dst), flags) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))


RENAME_EXCHANGE = 2


# --- ENAMETOOLONG -----------------------------------------------------------------


def _errno(call: Callable[[], object]) -> int | None:
    try:
        call()
    except OSError as e:
        return e.errno
    return None


def long_name_errnos(d: Path) -> dict[str, int | None]:
    """The errno of each operation naming a 256-byte entry in ``d``, which holds a file
    ``f`` and a directory ``sub`` (both may be missing: the name is refused first)."""
    long = d / LONG
    f, sub = d / "f", d / "sub"
    return {
        "stat": _errno(lambda: os.stat(long)),
        "lstat": _errno(lambda: os.lstat(long)),
        "open O_CREAT": _errno(lambda: os.close(os.open(long, os.O_CREAT | os.O_WRONLY, 0o644))),
        "open": _errno(lambda: os.close(os.open(long, os.O_RDONLY))),
        "mkdir": _errno(lambda: os.mkdir(long)),
        "rename to": _errno(lambda: os.rename(f, long)),
        "rename from": _errno(lambda: os.rename(long, d / "g")),
        "rename dir to": _errno(lambda: os.rename(sub, long)),
        "unlink": _errno(lambda: os.unlink(long)),
        "rmdir": _errno(lambda: os.rmdir(long)),
        "link": _errno(lambda: os.link(f, long)),
        "symlink": _errno(lambda: os.symlink("f", long)),
        "chmod": _errno(lambda: os.chmod(long, 0o600)),
        "chown": _errno(lambda: os.chown(long, 0, 0)),
        "truncate": _errno(lambda: os.truncate(long, 0)),
        "readlink": _errno(lambda: os.readlink(long)),
        "listxattr": _errno(lambda: os.listxattr(long)),
        "in a path": _errno(lambda: os.stat(long / "f")),
    }


def test_name_too_long_on_the_writable_mount(work: Path, reference: Path) -> None:
    for d in (reference, work):
        (d / "f").write_bytes(b"f")
        (d / "sub").mkdir()
    want = long_name_errnos(reference)
    assert set(want.values()) == {errno.ENAMETOOLONG}, want
    assert long_name_errnos(work) == want
    # Nothing was made or moved by the refused calls.
    assert sorted(os.listdir(work)) == ["f", "sub"]


def test_name_too_long_in_the_snapshots(target: Target, work: Path, reference: Path) -> None:
    """.snapshots/ of a writable mount: the mount is not read-only, so every call reaches
    the filesystem, which must answer ENAMETOOLONG before EROFS, as for a plain directory."""
    for d in (reference, work):
        (d / "f").write_bytes(b"f")
        (d / "sub").mkdir()
    want = long_name_errnos(reference)
    commit = target.commit()
    snap = target.snapshot_dir(commit.seq) / work.name
    assert long_name_errnos(snap) == want
    assert _errno(lambda: os.mkdir(snap / "short")) == errno.EROFS


@pytest.fixture
def read_only_reference(reference: Path) -> Iterator[Path]:
    """A plain directory holding ``f`` and ``sub``, bind-mounted read-only: on a read-only
    mount the kernel itself answers EROFS before the lookup for some calls (unlink, rmdir,
    rename), ENAMETOOLONG from the filesystem's lookup for the others."""
    src, ro = reference / "src", reference / "ro"
    src.mkdir()
    ro.mkdir()
    (src / "f").write_bytes(b"f")
    (src / "sub").mkdir()
    subprocess.run(["mount", "--bind", str(src), str(ro)], check=True)
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        yield ro
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_name_too_long_on_a_read_only_mount(
    read_only_mount: Path, read_only_reference: Path
) -> None:
    want = long_name_errnos(read_only_reference)
    assert want["stat"] == want["mkdir"] == want["link"] == errno.ENAMETOOLONG, want
    assert long_name_errnos(read_only_mount) == want


# --- st_nlink of directories ----------------------------------------------------------


def nlink_story(root: Path) -> list[dict[str, int]]:
    """Directory counts after each step of mkdir, rmdir and renames across parents."""
    steps = []
    make_dirs(root)
    steps.append(dir_nlinks(root))
    (root / "a" / "e").rmdir()  # a: 3 -> 2 subdirectories
    steps.append(dir_nlinks(root))
    os.rename(root / "a" / "b", root / "f" / "b")  # a subtree moves to another parent
    steps.append(dir_nlinks(root))
    (root / "a" / "x").mkdir()
    os.rename(root / "a" / "x", root / "f" / "x")  # to a new name in another parent
    (root / "a" / "y").mkdir()
    os.rename(root / "f" / "x", root / "a" / "y")  # back, replacing an empty directory
    steps.append(dir_nlinks(root))
    os.rename(root / "a" / "file", root / "f" / "moved-file")  # a file: no count changes
    # A directory and a file trade places across parents: f loses b, the root gains it.
    renameat2(root / "f" / "b", root / "top-file", RENAME_EXCHANGE)
    steps.append(dir_nlinks(root))
    os.rename(root / "f", root / "renamed-f")  # a rename within one parent
    steps.append(dir_nlinks(root))
    return steps


def test_directory_nlink_on_the_writable_mount(target: Target, work: Path, reference: Path) -> None:
    (reference / "w").mkdir()  # the same depth as work/ (nlink of "." is compared)
    want = nlink_story(reference / "w")
    assert want[0]["."] == 4 and want[0]["a"] == 5 and want[0]["a/b/c"] == 2, want[0]
    assert nlink_story(work) == want
    # The counts of the work tree's directories survive a restart (rows loaded back)...
    target.restart()
    assert dir_nlinks(work) == want[-1]
    # ...and a commit shows them in the snapshot (the read-only view counts its trees).
    commit = target.commit()
    assert dir_nlinks(target.snapshot_dir(commit.seq) / work.name) == want[-1]
    # find(1) trusts nlink to skip stat-ing leaves: it must find every directory.
    for root in (reference / "w", work):
        found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_dir())
        assert found == sorted(k for k in want[-1] if k != "."), root


def test_volume_roots_and_snapshots_nlink(target: Target) -> None:
    """The mount's top holds the volumes, a volume's root also the hidden .snapshots/, and
    .snapshots/ one directory per snapshot: each counts as a subdirectory."""
    target.commit()
    top = target.mnt
    assert os.lstat(top).st_nlink == 2 + len(os.listdir(top))
    base = target.base
    subdirs = sum(1 for p in base.iterdir() if p.is_dir() and not p.is_symlink())
    assert os.lstat(base).st_nlink == 2 + subdirs + 1  # + .snapshots/
    snaps = base / SNAPSHOTS
    assert os.lstat(snaps).st_nlink == 2 + len(os.listdir(snaps))


def test_directory_nlink_on_a_read_only_mount(read_only_mount: Path, source_tree: Path) -> None:
    want = dir_nlinks(source_tree)
    got = dir_nlinks(read_only_mount)
    want["."] += 1  # the volume's root also holds the hidden .snapshots/
    assert got == want
    assert os.lstat(read_only_mount.parent).st_nlink == 2 + 1  # one volume
    snaps = read_only_mount / SNAPSHOTS
    assert os.lstat(snaps).st_nlink == 2 + len(os.listdir(snaps))
    assert dir_nlinks(snaps / os.listdir(snaps)[0]) == dir_nlinks(source_tree)


# --- st_blocks of sparse files ------------------------------------------------------


def write_sparse(path: Path) -> int:
    """A file with a 100 MiB hole and 4 KiB of data after it; returns an open fd."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    os.pwrite(fd, random.Random(7).randbytes(4096), 100 * MIB)
    return fd


def test_sparse_file_blocks_on_the_writable_mount(
    target: Target, work: Path, reference: Path
) -> None:
    size = 100 * MIB + 4096
    apparent = (size + 511) // 512
    ref_fd = write_sparse(reference / "sparse")
    try:
        ref = os.fstat(ref_fd)
    finally:
        os.close(ref_fd)
    assert ref.st_size == size and ref.st_blocks < apparent // 100, ref
    fd = write_sparse(work / "sparse")
    try:
        # While a writer holds it the file stays staged: its blocks are the staging file's.
        by_fd, by_path = os.fstat(fd), os.stat(work / "sparse")
        for st in (by_fd, by_path):
            assert st.st_size == size
            assert 0 < st.st_blocks < apparent // 100, st.st_blocks
    finally:
        os.close(fd)
    # Committed, the content lives in the store's chunks, which do not say what was a hole:
    # the apparent size, a documented departure (docs/live.md). The work tree shows that
    # once the file is absorbed (its staging file deleted); until then the staging file's.
    commit = target.commit()
    assert (target.snapshot_dir(commit.seq) / work.name / "sparse").stat().st_blocks == apparent
    blocks = (work / "sparse").stat().st_blocks
    assert blocks == apparent or 0 < blocks < apparent // 100, blocks


# --- the read-only mount ----------------------------------------------------------------


@pytest.fixture(scope="module")
def source_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("t10errno-src") / "src"
    src.mkdir()
    make_dirs(src)
    (src / "f" / "deep").mkdir()
    (src / "f" / "deep" / "er").mkdir()
    (src / "f" / "sub").mkdir()
    (src / "f" / "deep" / "file").write_bytes(b"deep")
    return src


@pytest.fixture(scope="module")
def read_only_mount(tmp_path_factory: pytest.TempPathFactory, source_tree: Path) -> Iterator[Path]:
    """An imported volume on a read-only mount (every view there is a snapshot)."""
    top = Path(tempfile.mkdtemp(prefix="p2pfs-t10-ro-"))
    home = tmp_path_factory.mktemp("t10errno-ro") / "home"
    run_cli(home, "init", check=True)
    run_cli(home, "volume", "create", VOLUME, check=True)
    run_cli(home, "import", str(source_tree), VOLUME, check=True)
    with mounted(home, top / "mnt", read_only=True) as mp:
        assert stat.S_ISDIR(os.stat(mp / VOLUME).st_mode)
        yield mp / VOLUME
    os.rmdir(top / "mnt")
    os.rmdir(top)
