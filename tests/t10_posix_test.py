"""POSIX on the publisher's writable mount (issue 5): what editors, cp, tar, git and SQLite do.

One node and one mount serve the module; each test works in its own directory of the volume.
``P2PFS_WRITE_TARGET=native`` runs the same battery on a plain directory (see writable.py).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import mmap
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from writable import Target, diff_walks, file_digest, remove_tree, walk, write_target

pytestmark = [pytest.mark.mount, pytest.mark.fuse, pytest.mark.timeout(900)]

KIB, MIB, GIB = 1024, 1024 * 1024, 1024 * 1024 * 1024
NOBODY = 65534


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    with write_target(tmp_path_factory.mktemp("t10posix") / "home") as t:
        yield t


@pytest.fixture
def work(target: Target, request: pytest.FixtureRequest) -> Path:
    return target.fresh(request.node.name)


def errno_of(fn: object, *args: object, **kwargs: object) -> int:
    """The errno a call fails with (the test fails if it succeeds)."""
    assert callable(fn)
    with pytest.raises(OSError) as e:
        fn(*args, **kwargs)
    assert e.value.errno is not None
    return e.value.errno


def write_file(path: Path, data: bytes, mode: int = 0o644) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def make_tree(root: Path, rng: random.Random) -> None:
    """A small tree with the things a snapshot keeps: modes, mtimes, symlinks, empty files."""
    root.mkdir()
    dirs = [root]
    for i in range(5):
        d = rng.choice(dirs) / f"dir-{i}-ü"
        d.mkdir()
        dirs.append(d)
    for i, size in enumerate([0, 1, 100, 4095, 4096, 4097, 65536, 200_000, 1_100_000]):
        f = rng.choice(dirs) / f"file {i}.bin"
        f.write_bytes(rng.randbytes(size))
        os.chmod(f, rng.choice([0o644, 0o600, 0o755, 0o4755, 0o2750, 0o444]))
        t = rng.randint(1_000_000_000, 1_700_000_000) * 10**9 + rng.randint(0, 10**9 - 1)
        os.utime(f, ns=(t, t))
    os.symlink("file 0.bin", root / "rel-link")
    os.symlink("/etc/hostname", root / "abs-link")
    os.symlink("no/such/thing", root / "dangling")
    os.symlink("dir-0-ü", root / "dir-link")
    os.chmod(dirs[1], 0o750)
    os.chmod(dirs[2], 0o1777)


# --- plain files ---------------------------------------------------------------


def test_create_write_read_back(work: Path) -> None:
    rng = random.Random(1)
    sizes = [0, 1, 4095, 4096, 4097, 65535, 128 * KIB + 3, 3 * MIB + 1]
    for size in sizes:
        data = rng.randbytes(size)
        write_file(work / f"f{size}", data)
        assert (work / f"f{size}").stat().st_size == size
        assert (work / f"f{size}").read_bytes() == data
    assert sorted(os.listdir(work)) == sorted(f"f{s}" for s in sizes)
    st = (work / "f1").stat()
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o644
    # Overwrite in the middle, through a read-write fd, and read back through another.
    fd = os.open(work / f"f{3 * MIB + 1}", os.O_RDWR)
    try:
        assert os.pwrite(fd, b"MIDDLE", MIB + 7) == 6
        os.fsync(fd)
        assert os.pread(fd, 10, MIB + 5)[2:8] == b"MIDDLE"
    finally:
        os.close(fd)
    with open(work / f"f{3 * MIB + 1}", "rb") as f:
        f.seek(MIB + 7)
        assert f.read(6) == b"MIDDLE"
    # Names: the longest allowed, and one too long.
    long = work / ("n" * 255)
    long.write_bytes(b"long")
    assert long.read_bytes() == b"long"
    assert errno_of(os.open, work / ("n" * 256), os.O_CREAT | os.O_WRONLY) == errno.ENAMETOOLONG


def test_open_flags_excl_trunc_and_missing(work: Path) -> None:
    f = work / "f"
    fd = os.open(f, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
    os.write(fd, b"first")
    os.close(fd)
    assert stat.S_IMODE(f.stat().st_mode) == 0o640
    assert errno_of(os.open, f, os.O_CREAT | os.O_EXCL | os.O_WRONLY) == errno.EEXIST
    os.symlink("nowhere", work / "dangling")
    assert errno_of(os.open, work / "dangling", os.O_CREAT | os.O_EXCL | os.O_WRONLY) == (
        errno.EEXIST
    )
    assert not (work / "nowhere").exists()
    assert f.read_bytes() == b"first"
    fd = os.open(f, os.O_WRONLY | os.O_TRUNC)
    os.close(fd)
    assert f.stat().st_size == 0 and f.read_bytes() == b""
    assert errno_of(os.open, work / "missing", os.O_RDONLY) == errno.ENOENT
    assert errno_of(os.open, work / "missing" / "x", os.O_CREAT | os.O_WRONLY) == errno.ENOENT
    assert errno_of(os.open, f / "x", os.O_CREAT | os.O_WRONLY) == errno.ENOTDIR
    assert errno_of(os.open, work, os.O_WRONLY) == errno.EISDIR
    assert errno_of(os.mkdir, f) == errno.EEXIST
    assert errno_of(os.unlink, work / "missing") == errno.ENOENT
    assert errno_of(os.rmdir, f) == errno.ENOTDIR
    assert errno_of(os.unlink, work) == errno.EISDIR


def test_o_rdonly_o_trunc_truncates_as_on_linux(work: Path) -> None:
    """POSIX leaves O_RDONLY|O_TRUNC undefined; Linux filesystems truncate."""
    f = work / "f"
    f.write_bytes(b"x" * 65536)
    fd = os.open(f, os.O_RDONLY | os.O_TRUNC)
    try:
        assert os.fstat(fd).st_size == 0
    finally:
        os.close(fd)
    assert f.stat().st_size == 0


def test_o_append(work: Path) -> None:
    f = work / "log"
    f.write_bytes(b"start\n")
    app = os.open(f, os.O_WRONLY | os.O_APPEND)
    other = os.open(f, os.O_RDWR)
    try:
        os.write(app, b"one\n")
        os.lseek(app, 0, os.SEEK_SET)
        os.write(app, b"two\n")  # O_APPEND: the offset is ignored
        os.pwrite(other, b"EXTENDED BY ANOTHER FD\n", 12)  # grows the file behind app's back
        os.write(app, b"three\n")
    finally:
        os.close(app)
        os.close(other)
    assert f.read_bytes() == b"start\none\ntwEXTENDED BY ANOTHER FD\nthree\n"
    for i in range(5):
        subprocess.run(["sh", "-c", f'echo "shell {i}" >> "$0"', str(f)], check=True)
    assert f.read_bytes().endswith(b"".join(b"shell %d\n" % i for i in range(5)))
    with open(f, "a+b") as a:
        a.write(b"tail")
        a.seek(0)
        assert a.read(6) == b"start\n"


def test_truncate_up_and_down(work: Path) -> None:
    f = work / "t"
    data = random.Random(2).randbytes(300 * KIB)
    f.write_bytes(data)
    os.truncate(f, 100 * KIB)
    assert f.stat().st_size == 100 * KIB
    assert f.read_bytes() == data[: 100 * KIB]
    os.truncate(f, 500 * KIB)  # grows with zeros: never the bytes that were cut off
    assert f.stat().st_size == 500 * KIB
    assert f.read_bytes() == data[: 100 * KIB] + bytes(400 * KIB)
    fd = os.open(f, os.O_RDWR)
    try:
        os.ftruncate(fd, 7)
        assert os.fstat(fd).st_size == 7
        assert os.pread(fd, 100, 0) == data[:7]
        os.ftruncate(fd, 70_000)
        assert os.pread(fd, 70_000, 0) == data[:7] + bytes(70_000 - 7)
        os.pwrite(fd, b"x", 69_999)
        os.ftruncate(fd, 0)
        assert os.fstat(fd).st_size == 0 and os.pread(fd, 10, 0) == b""
        os.write(fd, b"after")  # the fd's offset is still 0
    finally:
        os.close(fd)
    assert f.read_bytes() == b"after"
    assert errno_of(os.truncate, work, 0) == errno.EISDIR


def test_sparse_writes(work: Path) -> None:
    f = work / "sparse"
    with open(f, "wb") as out:
        out.write(b"head")
        out.seek(10 * MIB + 5)
        out.write(b"tail")
    assert f.stat().st_size == 10 * MIB + 9
    with open(f, "rb") as inp:
        assert inp.read(4) == b"head"
        assert inp.read(MIB) == bytes(MIB)
        inp.seek(10 * MIB - 3)
        assert inp.read(100) == bytes(8) + b"tail"
    assert file_digest(f) == hashlib.sha256(b"head" + bytes(10 * MIB + 1) + b"tail").hexdigest()
    # Past 4 GiB: offsets must not wrap at 32 bits.
    big = work / "beyond-4g"
    fd = os.open(big, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        assert os.pwrite(fd, b"far away", 4 * GIB + 4321) == 8
        assert os.fstat(fd).st_size == 4 * GIB + 4329
        assert os.pread(fd, 20, 4 * GIB + 4311) == bytes(10) + b"far away"
        assert os.pread(fd, 16, 4321) == bytes(16)
        assert os.pread(fd, 10, 4 * GIB + 4329) == b""
    finally:
        os.close(fd)
    big.unlink()


def test_shared_mmap_writes_reach_the_file(work: Path) -> None:
    f = work / "mapped"
    f.write_bytes(bytes(3 * 4096))
    with open(f, "r+b") as out, mmap.mmap(out.fileno(), 0) as m:
        m[4096:4101] = b"hello"
        m[-3:] = b"end"
        m.flush()
        fd = os.open(f, os.O_RDONLY)
        try:
            assert os.pread(fd, 5, 4096) == b"hello"
        finally:
            os.close(fd)
    data = f.read_bytes()
    assert data[4096:4101] == b"hello" and data.endswith(b"end") and len(data) == 3 * 4096


def test_mtime_moves_on_write_and_utimens_round_trips(work: Path) -> None:
    f = work / "m"
    f.write_bytes(b"x")
    old = 1_000_000_000_123_456_789
    os.utime(f, ns=(old + 5, old))
    assert f.stat().st_mtime_ns == old
    with open(f, "r+b") as out:
        out.write(b"y")
    assert f.stat().st_mtime_ns != old
    os.utime(f, ns=(old, old))
    os.truncate(f, 0)
    assert f.stat().st_mtime_ns != old
    d = work / "d"
    d.mkdir()
    os.utime(d, ns=(old, old))
    assert d.stat().st_mtime_ns == old
    (d / "new").write_bytes(b"")
    assert d.stat().st_mtime_ns != old  # a directory's mtime moves when an entry is added
    os.symlink("target", work / "l")
    os.utime(work / "l", ns=(old, old + 1), follow_symlinks=False)
    assert os.lstat(work / "l").st_mtime_ns == old + 1


def test_utimens_sets_atime_too(work: Path) -> None:
    """Snapshots do not carry atime, but utimensat() then stat() on the mount should show the
    atime that was set, as POSIX has it (touch -a, cp -a, tar and rsync set it)."""
    f = work / "a"
    f.write_bytes(b"x")
    old = 1_000_000_000_123_456_789
    os.utime(f, ns=(old + 5, old))
    st = f.stat()
    assert (st.st_atime_ns, st.st_mtime_ns) == (old + 5, old)


def test_chmod_chown_round_trip(work: Path) -> None:
    f = work / "f"
    f.write_bytes(b"mode")
    for mode in (0o600, 0o755, 0o4755, 0o2750, 0o1777, 0o7777, 0o000, 0o644):
        os.chmod(f, mode)
        assert stat.S_IMODE(f.stat().st_mode) == mode, oct(mode)
    d = work / "d"
    d.mkdir(mode=0o700)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    os.chmod(d, 0o1777)
    assert stat.S_IMODE(d.stat().st_mode) == 0o1777
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fchmod(fd, 0o640)
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o640
    finally:
        os.close(fd)
    if os.geteuid() == 0:
        os.chown(f, 1234, 5678)
        st = f.stat()
        assert (st.st_uid, st.st_gid) == (1234, 5678)
        os.chown(f, 0, 0)


def test_statfs_fsync_fsyncdir_and_xattrs(target: Target, work: Path) -> None:
    st = os.statvfs(work)
    assert st.f_bsize > 0 and st.f_namemax >= 255
    f = work / "f"
    fd = os.open(f, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.write(fd, b"synced")
        os.fsync(fd)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    dfd = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    assert f.read_bytes() == b"synced"
    os.setxattr(f, "user.test", b"v")
    assert os.getxattr(f, "user.test") == b"v"
    assert "user.test" in os.listxattr(f)


# --- names: rename, unlink, rmdir ----------------------------------------------


def test_rename_over_keeps_the_old_files_open_fd(work: Path) -> None:
    """An editor's save: write a temporary, fsync, rename it over the original."""
    target = work / "config.txt"
    target.write_bytes(b"old content\n")
    os.chmod(target, 0o640)
    reader = os.open(target, os.O_RDONLY)
    try:
        tmp = work / ".config.txt.swp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        os.write(fd, b"new content, longer than the old\n")
        os.fsync(fd)
        os.close(fd)
        os.rename(tmp, target)
        assert target.read_bytes() == b"new content, longer than the old\n"
        assert stat.S_IMODE(target.stat().st_mode) == 0o644
        assert os.pread(reader, 100, 0) == b"old content\n"
        assert os.fstat(reader).st_nlink == 0
        assert sorted(os.listdir(work)) == ["config.txt"]
    finally:
        os.close(reader)
    # Rename onto itself and through a hard link to the same file: nothing happens.
    os.rename(target, target)
    os.link(target, work / "alias")
    os.rename(work / "alias", target)
    assert sorted(os.listdir(work)) == ["alias", "config.txt"]
    assert target.read_bytes() == b"new content, longer than the old\n"
    assert errno_of(os.rename, work / "missing", work / "x") == errno.ENOENT


def test_rename_noreplace_never_clobbers(work: Path) -> None:
    """renameat2(RENAME_NOREPLACE) (mv -n, systemd): EEXIST, or EINVAL when unsupported."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        pytest.skip("this libc has no renameat2")
    (work / "a").write_bytes(b"a")
    (work / "b").write_bytes(b"b")
    at_fdcwd, rename_noreplace = -100, 1
    rc = libc.renameat2(at_fdcwd, bytes(work / "a"), at_fdcwd, bytes(work / "b"), rename_noreplace)
    assert rc == -1 and ctypes.get_errno() in (errno.EEXIST, errno.EINVAL)
    assert (work / "b").read_bytes() == b"b" and (work / "a").read_bytes() == b"a"
    rc = libc.renameat2(at_fdcwd, bytes(work / "a"), at_fdcwd, bytes(work / "c"), rename_noreplace)
    if rc == 0:
        assert sorted(os.listdir(work)) == ["b", "c"]
    else:
        assert ctypes.get_errno() == errno.EINVAL


def test_rename_directories(work: Path) -> None:
    a = work / "a"
    (a / "sub").mkdir(parents=True)
    (a / "sub" / "f").write_bytes(b"deep")
    (a / "g").write_bytes(b"top")
    os.rename(a, work / "b")
    assert not a.exists()
    assert (work / "b" / "sub" / "f").read_bytes() == b"deep"
    (work / "c").mkdir()
    os.rename(work / "b", work / "c" / "b")  # into another directory
    assert (work / "c" / "b" / "g").read_bytes() == b"top"
    assert (work / "c" / "b" / "sub" / "f").read_bytes() == b"deep"
    assert sorted(os.listdir(work)) == ["c"]
    os.rename(work / "c" / "b" / "sub", work / "sub")  # and back up, out of it
    assert sorted(os.listdir(work / "c" / "b")) == ["g"]
    assert (work / "sub" / "f").read_bytes() == b"deep"
    # Onto an empty directory: it is replaced.
    (work / "empty").mkdir()
    os.rename(work / "sub", work / "empty")
    assert (work / "empty" / "f").read_bytes() == b"deep"
    assert not (work / "sub").exists()
    # Into itself, a file onto a directory, a directory onto a file.
    assert errno_of(os.rename, work / "c", work / "c" / "b" / "c") == errno.EINVAL
    assert errno_of(os.rename, work / "c" / "b" / "g", work / "empty") == errno.EISDIR
    assert errno_of(os.rename, work / "empty", work / "c" / "b" / "g") == errno.ENOTDIR
    # A file moved into a directory whose name is then reused.
    fd = os.open(work / "c" / "b" / "g", os.O_RDONLY)
    try:
        os.rename(work / "c", work / "c2")
        assert os.pread(fd, 10, 0) == b"top"
        (work / "c").mkdir()
        assert os.listdir(work / "c") == []
    finally:
        os.close(fd)


def test_rename_dir_onto_nonempty_dir_and_rmdir_nonempty(work: Path) -> None:
    (work / "src").mkdir()
    (work / "src" / "x").write_bytes(b"x")
    (work / "dst").mkdir()
    (work / "dst" / "y").write_bytes(b"y")
    assert errno_of(os.rename, work / "src", work / "dst") == errno.ENOTEMPTY
    assert (work / "src" / "x").read_bytes() == b"x"
    assert (work / "dst" / "y").read_bytes() == b"y"
    assert errno_of(os.rmdir, work / "dst") == errno.ENOTEMPTY
    (work / "dst" / "y").unlink()
    os.rmdir(work / "dst")
    assert sorted(os.listdir(work)) == ["src"]
    (work / "src" / "sub").mkdir()
    (work / "src" / "x").unlink()
    assert errno_of(os.rmdir, work / "src") == errno.ENOTEMPTY
    os.rmdir(work / "src" / "sub")
    os.rmdir(work / "src")
    assert os.listdir(work) == []


def test_unlink_while_open(work: Path) -> None:
    f = work / "doomed"
    f.write_bytes(b"0123456789")
    fd = os.open(f, os.O_RDWR)
    try:
        os.unlink(f)
        assert not f.exists()
        assert os.listdir(work) == []
        assert errno_of(os.stat, f) == errno.ENOENT
        assert os.pread(fd, 100, 0) == b"0123456789"
        assert os.pwrite(fd, b"ABC", 8) == 3
        os.pwrite(fd, b"z", 200_000)
        assert os.fstat(fd).st_size == 200_001
        assert os.fstat(fd).st_nlink == 0
        assert os.pread(fd, 13, 0) == b"01234567ABC" + bytes(2)
        os.ftruncate(fd, 5)
        assert os.pread(fd, 100, 0) == b"01234"
        os.fsync(fd)
        # A new file of the same name is another file.
        f.write_bytes(b"new")
        assert os.pread(fd, 100, 0) == b"01234"
        assert f.read_bytes() == b"new"
    finally:
        os.close(fd)
    assert f.read_bytes() == b"new"
    assert os.listdir(work) == ["doomed"]


def test_hard_links(work: Path) -> None:
    a = work / "a"
    a.write_bytes(b"shared")
    (work / "d").mkdir()
    os.link(a, work / "b")
    os.link(a, work / "d" / "c")
    sts = [p.stat() for p in (a, work / "b", work / "d" / "c")]
    assert [s.st_nlink for s in sts] == [3, 3, 3]
    assert len({s.st_ino for s in sts}) == 1
    with open(work / "b", "r+b") as f:
        f.seek(6)
        f.write(b" and changed")
    assert a.read_bytes() == b"shared and changed"
    assert (work / "d" / "c").read_bytes() == b"shared and changed"
    os.chmod(work / "d" / "c", 0o600)
    assert stat.S_IMODE(a.stat().st_mode) == 0o600
    os.unlink(a)
    assert (work / "b").stat().st_nlink == 2
    os.rename(work / "d" / "c", work / "c")
    assert (work / "c").read_bytes() == b"shared and changed"
    assert (work / "c").stat().st_nlink == 2
    os.truncate(work / "c", 6)
    assert (work / "b").read_bytes() == b"shared"
    assert errno_of(os.link, work / "d", work / "dlink") == errno.EPERM
    assert errno_of(os.link, work / "b", work / "c") == errno.EEXIST
    os.unlink(work / "c")
    assert (work / "b").stat().st_nlink == 1


def test_symlinks(work: Path) -> None:
    (work / "real").write_bytes(b"through the link")
    (work / "dir").mkdir()
    (work / "dir" / "inner").write_bytes(b"inner")
    targets = {
        "rel": "real",
        "abs": "/etc/hostname",
        "dangling": "no/such",
        "todir": "dir",
        "up": "../" + work.name + "/real",
        "long": "x/" * 1000 + "y",
    }
    for name, t in targets.items():
        os.symlink(t, work / name)
    for name, t in targets.items():
        assert os.readlink(work / name) == t
        st = os.lstat(work / name)
        assert stat.S_ISLNK(st.st_mode) and st.st_size == len(t.encode())
    assert (work / "rel").read_bytes() == b"through the link"
    assert (work / "up").read_bytes() == b"through the link"
    assert (work / "todir" / "inner").read_bytes() == b"inner"
    assert stat.S_ISREG(os.stat(work / "rel").st_mode)
    assert errno_of(os.stat, work / "dangling") == errno.ENOENT
    # Writing through a symlink writes its target; creating through a dangling one creates it.
    with open(work / "rel", "ab") as f:
        f.write(b"!")
    assert (work / "real").read_bytes() == b"through the link!"
    os.symlink("made-by-link", work / "maker")
    (work / "maker").write_bytes(b"made")
    assert (work / "made-by-link").read_bytes() == b"made"
    # Unlinking and renaming the link leaves the target alone.
    os.rename(work / "rel", work / "rel2")
    assert os.readlink(work / "rel2") == "real"
    os.unlink(work / "rel2")
    assert (work / "real").read_bytes() == b"through the link!"
    os.symlink("loop", work / "loop")
    assert errno_of(os.stat, work / "loop") == errno.ELOOP
    assert errno_of(os.symlink, "x", work / "real") == errno.EEXIST
    assert errno_of(os.readlink, work / "real") == errno.EINVAL


def test_permissions_for_another_user(target: Target, work: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to act as another user (setpriv)")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    if target.is_p2pfs and "allow_other" not in _mount_options(target.mnt):
        pytest.skip("the mount lacks allow_other: other users cannot reach it at all")
    os.chmod(work, 0o755)
    secret, public, private_dir = work / "secret", work / "public", work / "private"
    secret.write_bytes(b"root only")
    os.chmod(secret, 0o600)
    public.write_bytes(b"everyone")
    os.chmod(public, 0o644)
    private_dir.mkdir(mode=0o700)
    (private_dir / "inside").write_bytes(b"hidden")
    os.chmod(private_dir / "inside", 0o644)

    def as_nobody(*cmd: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd],
            capture_output=True,
            text=True,
            timeout=60,
        )

    assert as_nobody("cat", str(public)).stdout == "everyone"
    denied = as_nobody("cat", str(secret))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    denied = as_nobody("cat", str(private_dir / "inside"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    denied = as_nobody("sh", "-c", f'echo x >> "{public}"')
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    denied = as_nobody("touch", str(work / "new-by-nobody"))
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied
    assert public.read_bytes() == b"everyone"
    # Once the modes allow it, the same user can write.
    os.chmod(work, 0o777)
    os.chmod(public, 0o666)
    assert as_nobody("sh", "-c", f'echo more >> "{public}"').returncode == 0
    made = as_nobody("touch", str(work / "new-by-nobody"))
    assert made.returncode == 0, made.stderr
    assert public.read_bytes() == b"everyonemore\n"
    assert (work / "new-by-nobody").stat().st_uid == NOBODY


def _mount_options(mnt: Path) -> str:
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        if fields[4] == str(mnt):
            return " ".join(fields[5:])
    raise AssertionError(f"{mnt} is not in /proc/self/mountinfo")


# --- directories that change while listed -------------------------------------


def test_readdir_while_the_directory_changes(work: Path) -> None:
    stable = {f"stable-{i:04d}-" + "s" * 80 for i in range(1500)}
    for name in stable:
        (work / name).write_bytes(b"")
    # In one thread: each entry read is followed by a create and a delete.
    churn = 0
    seen: list[str] = []
    with os.scandir(work) as it:
        for entry in it:
            seen.append(entry.name)
            (work / f"churn-{churn:05d}").write_bytes(b"")
            if churn >= 3:
                (work / f"churn-{churn - 3:05d}").unlink()
            churn += 1
    assert len(seen) == len(set(seen)), "readdir returned a name twice"
    assert stable <= set(seen), f"{len(stable - set(seen))} unchanged names were not listed"
    # And from another thread, as fast as it goes, while this one lists.
    stop = threading.Event()
    errors: list[BaseException] = []

    def mutate() -> None:
        i = 0
        try:
            while not stop.is_set():
                p = work / f"bg-{i % 50}"
                if p.exists():
                    p.unlink()
                else:
                    p.write_bytes(b"")
                i += 1
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=mutate)
    t.start()
    try:
        for _ in range(15):
            names = os.listdir(work)
            assert len(names) == len(set(names)), "readdir returned a name twice"
            assert stable <= set(names)
    finally:
        stop.set()
        t.join()
    assert not errors, errors


# --- volume and workloads -----------------------------------------------------


def test_large_file(work: Path) -> None:
    rng = random.Random(3)
    f = work / "large.bin"
    written = hashlib.sha256()
    with open(f, "wb", buffering=0) as out:
        for _ in range(200):
            block = rng.randbytes(MIB)
            written.update(block)
            assert out.write(block) == MIB
    assert f.stat().st_size == 200 * MIB
    assert file_digest(f) == written.hexdigest()
    # Rewrite a range in the middle, unaligned, and read it back.
    patch = rng.randbytes(3 * MIB)
    with open(f, "r+b") as out:
        out.seek(77 * MIB + 12345)
        out.write(patch)
    with open(f, "rb") as inp:
        inp.seek(77 * MIB + 12345)
        assert inp.read(3 * MIB) == patch
    f.unlink()


def test_many_small_files(work: Path) -> None:
    expected = {}
    for i in range(2000):
        d = work / f"d{i % 20:02d}"
        d.mkdir(exist_ok=True)
        data = f"small file {i}\n".encode() * (i % 7)
        (d / f"f{i:04d}").write_bytes(data)
        expected[f"d{i % 20:02d}/f{i:04d}"] = data
    for d in range(20):
        assert len(os.listdir(work / f"d{d:02d}")) == 100
    for rel, data in expected.items():
        assert (work / rel).read_bytes() == data, rel
    for rel in list(expected)[::2]:
        (work / rel).unlink()
    assert sum(len(os.listdir(work / f"d{d:02d}")) for d in range(20)) == 1000


def test_cp_a_then_diff(work: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, random.Random(4))
    subprocess.run(["cp", "-a", str(src), str(work / "copy")], check=True)
    d = subprocess.run(
        ["diff", "-r", "--no-dereference", str(src), str(work / "copy")],
        capture_output=True,
        text=True,
    )
    assert d.returncode == 0, d.stdout + d.stderr
    a, b = walk(src, mtime=True), walk(work / "copy", mtime=True)
    assert a == b, diff_walks(a, b)
    # Within the volume too (cp may use copy_file_range between two files of the mount).
    subprocess.run(["cp", "-a", str(work / "copy"), str(work / "copy2")], check=True)
    c = walk(work / "copy2", mtime=True)
    assert a == c, diff_walks(a, c)


def test_tar_extract(work: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, random.Random(5))
    os.link(next(src.rglob("file 8.bin")), src / "hardlink-to-8")
    archive = tmp_path / "tree.tar"
    # GNU tar's pax format keeps nanosecond mtimes (Python's tarfile rounds them).
    subprocess.run(
        ["tar", "--format=posix", "-c", "-f", str(archive), "-C", str(tmp_path), "src"], check=True
    )
    subprocess.run(["tar", "-x", "-f", str(archive), "-C", str(work)], check=True)
    a, b = walk(src, mtime=True, nlink=True), walk(work / "src", mtime=True, nlink=True)
    assert a == b, diff_walks(a, b)
    # And back out of the volume: what tar reads is what was extracted.
    again = tmp_path / "again.tar"
    subprocess.run(
        ["tar", "--format=posix", "-c", "-f", str(again), "-C", str(work), "src"], check=True
    )
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run(["tar", "-x", "-f", str(again), "-C", str(out)], check=True)
    c = walk(out / "src", mtime=True, nlink=True)
    assert a == c, diff_walks(a, c)


def _git(*args: str, cwd: Path) -> str:
    proc = subprocess.run(
        ["git", "-c", "user.email=t10@example.invalid", "-c", "user.name=t10", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GIT_CONFIG_NOSYSTEM": "1", "HOME": str(cwd)},
    )
    assert proc.returncode == 0, f"git {' '.join(args)}: {proc.stdout}{proc.stderr}"
    return proc.stdout


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_clone_fsck_status_and_commit(work: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    _git("init", "-q", "-b", "main", cwd=repo)
    rng = random.Random(6)
    for i in range(6):
        (repo / f"file{i}.txt").write_text(f"line {i}\n" * (i * 100))
        (repo / "sub").mkdir(exist_ok=True)
        (repo / "sub" / f"blob{i}.bin").write_bytes(rng.randbytes(20_000))
        if i == 3:
            os.symlink("file0.txt", repo / "link")
            os.chmod(repo / "file1.txt", 0o755)
        _git("add", "-A", cwd=repo)
        _git("commit", "-q", "-m", f"commit {i}", cwd=repo)
    _git("clone", "-q", str(repo), str(work / "clone"), cwd=tmp_path)
    clone = work / "clone"
    _git("fsck", "--full", "--strict", cwd=clone)
    assert _git("status", "--porcelain", cwd=clone) == ""
    assert _git("rev-parse", "HEAD", cwd=clone) == _git("rev-parse", "HEAD", cwd=repo)
    # Work in the clone: commit, branch, repack, and stay consistent.
    (clone / "file0.txt").write_text("changed in the volume\n")
    (clone / "new.txt").write_text("new\n")
    _git("add", "-A", cwd=clone)
    _git("commit", "-q", "-m", "in the volume", cwd=clone)
    _git("checkout", "-q", "-b", "side", "HEAD~3", cwd=clone)
    _git("checkout", "-q", "main", cwd=clone)
    _git("gc", "-q", "--prune=now", cwd=clone)
    _git("fsck", "--full", "--strict", cwd=clone)
    assert _git("status", "--porcelain", cwd=clone) == ""
    assert (clone / "file0.txt").read_text() == "changed in the volume\n"


@pytest.mark.parametrize("journal", ["DELETE", "WAL"])
def test_sqlite(work: Path, journal: str) -> None:
    db = work / "test.sqlite"
    con = sqlite3.connect(db)
    try:
        mode = con.execute(f"PRAGMA journal_mode={journal}").fetchone()[0]
        assert mode.upper() == journal
        con.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, name TEXT, payload BLOB)")
        con.commit()
        for batch in range(10):
            with con:
                con.executemany(
                    "INSERT INTO t (name, payload) VALUES (?, ?)",
                    [(f"row {batch}-{i}", os.urandom(200)) for i in range(100)],
                )
        with con:  # a transaction rolled back leaves nothing behind
            con.execute("INSERT INTO t (name) VALUES ('x')")
            con.rollback()
    finally:
        con.close()
    con = sqlite3.connect(db)
    try:
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 1000
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        with con:
            con.execute("DELETE FROM t WHERE id % 2 = 0")
        con.execute("VACUUM")
        assert con.execute("SELECT count(*) FROM t").fetchone()[0] == 500
    finally:
        con.close()


# --- snapshots and restarts ---------------------------------------------------


def test_commit_shows_the_written_tree_under_snapshots(
    target: Target, work: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    make_tree(src, random.Random(7))
    shutil.copytree(src, work / "tree", symlinks=True)
    first = target.commit()
    assert first.volume == "tools" and first.seq >= 1
    assert first.seq in target.log()
    snap = target.snapshot_dir(first.seq) / work.name / "tree"
    live = walk(work / "tree", mtime=True)
    assert walk(snap, mtime=True) == live, diff_walks(walk(snap, mtime=True), live)
    assert live == walk(src, mtime=True)
    # Nothing changed: a commit says so (and may keep the sequence number).
    again = target.commit()
    assert not again.changed and again.seq == first.seq
    # Change things; the new snapshot shows them, the old one is as it was.
    (work / "tree" / "file 0.bin").write_bytes(b"changed")
    os.unlink(work / "tree" / "rel-link")
    os.symlink("elsewhere", work / "tree" / "rel-link")
    (work / "tree" / "added").mkdir()
    second = target.commit()
    assert second.changed and second.seq > first.seq
    new_live = walk(work / "tree", mtime=True)
    new_snap = walk(target.snapshot_dir(second.seq) / work.name / "tree", mtime=True)
    assert new_snap == new_live, diff_walks(new_snap, new_live)
    old = walk(target.snapshot_dir(first.seq) / work.name / "tree", mtime=True)
    assert old == live, diff_walks(old, live)
    assert [s for s in target.log() if s in (first.seq, second.seq)] == [second.seq, first.seq]


def test_everything_survives_a_restart(target: Target, work: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_tree(src, random.Random(8))
    shutil.copytree(src, work / "tree", symlinks=True)
    os.link(work / "tree" / "rel-link", work / "tree" / "hard-to-symlink", follow_symlinks=False)
    (work / "empty-dir").mkdir(mode=0o705)
    with open(work / "sparse", "wb") as f:
        f.truncate(3 * MIB)
        f.seek(MIB)
        f.write(b"in the middle")
    before = walk(target.base, mtime=True, skip=frozenset({".snapshots"}))
    target.restart()
    after = walk(target.base, mtime=True, skip=frozenset({".snapshots"}))
    assert after == before, diff_walks(after, before)
    assert (work / "tree" / "hard-to-symlink").is_symlink()
    # And the mount still writes after the restart.
    (work / "after-restart").write_bytes(b"yes")
    assert (work / "after-restart").read_bytes() == b"yes"
    remove_tree(work / "tree")
    assert sorted(os.listdir(work)) == ["after-restart", "empty-dir", "sparse"]
