"""A real FUSE mount in a subprocess, through the p2pfs command."""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
from harness import force_unmount, mounted, run_cli

from p2pfs.fs.vfs import ROOT_TIMEOUT
from p2pfs.home import Home
from p2pfs.node import control
from p2pfs.objects.model import decode_blob, decode_tree
from p2pfs.store.cas import Store
from p2pfs.volume.registry import VolumeRegistry

pytestmark = [pytest.mark.mount, pytest.mark.fuse]

KIB, MIB, GIB = 1024, 1024 * 1024, 1024 * 1024 * 1024
BIG_MARK_AT = 4 * GIB + 4321  # bytes past 4 GiB must come out too


def make_random_tree(root: Path, rng: random.Random) -> None:
    root.mkdir()
    names = ["plain", "ünïcødé-名前", "with space", "x" * 200, "-dash", ".hidden", "emoji-🙂"]
    sizes = [
        0,
        1,
        64 * KIB - 1,
        64 * KIB,
        64 * KIB + 1,
        256 * KIB,
        256 * KIB + 7,
        MIB - 1,
        MIB,
        MIB + 1,
        3 * MIB + 17,
    ]
    dirs = [root]
    for depth in range(4):
        d = dirs[-1] / f"level{depth}-{rng.choice(names)[:20]}"
        d.mkdir()
        dirs.append(d)
    for i, size in enumerate(sizes):
        d = rng.choice(dirs)
        f = d / f"{rng.choice(names)}-{i}"
        f.write_bytes(rng.randbytes(size))
        os.chmod(f, rng.choice([0o644, 0o755, 0o600, 0o400, 0o4755 & 0o777]))
        t = rng.randint(1_000_000_000, 1_700_000_000) * 10**9 + rng.randint(0, 10**9 - 1)
        os.utime(f, ns=(t, t))
    (root / "empty").write_bytes(b"")
    with open(root / "big-300M.bin", "wb") as f:
        for _ in range(300 // 4):
            f.write(rng.randbytes(4 * MIB))
    with open(root / "sparse-5G.img", "wb") as f:
        f.truncate(5 * GIB)
        f.seek(BIG_MARK_AT)
        f.write(b"beyond four gibibytes")
    os.symlink("plain-0", dirs[1] / "rel-link")
    os.symlink("/etc/passwd", root / "abs-link")
    os.symlink("does/not/exist", root / "dangling")
    os.chmod(dirs[2], 0o750)


def compare_trees(src: Path, mnt: Path, *, skip_content: set[str] = frozenset()) -> int:
    checked = 0
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = Path(dirpath).relative_to(src)
        assert sorted(os.listdir(mnt / rel_dir)) == sorted(dirnames + filenames), rel_dir
        for name in dirnames + filenames:
            s, m = Path(dirpath) / name, mnt / rel_dir / name
            ss, ms = os.lstat(s), os.lstat(m)
            assert stat.S_IFMT(ss.st_mode) == stat.S_IFMT(ms.st_mode), s
            assert stat.S_IMODE(ss.st_mode) == stat.S_IMODE(ms.st_mode), s
            if stat.S_ISLNK(ss.st_mode):
                assert os.readlink(s) == os.readlink(m)
            elif stat.S_ISREG(ss.st_mode):
                assert ss.st_size == ms.st_size, s
                assert ss.st_mtime_ns == ms.st_mtime_ns, s
                if name not in skip_content:
                    with open(s, "rb") as a, open(m, "rb") as b:
                        while True:
                            x, y = a.read(4 * MIB), b.read(4 * MIB)
                            assert x == y, f"content of {s} differs"
                            if not x:
                                break
                checked += 1
    return checked


@pytest.fixture(scope="module")
def big_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("tree") / "src"
    make_random_tree(src, random.Random(20261128))
    return src


def test_random_tree_reads_back_identical(home: Path, tmp_path: Path, big_tree: Path) -> None:
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(big_tree), "tools", check=True)
    with mounted(home, tmp_path / "mnt", read_only=True) as mp:
        assert os.listdir(mp) == ["tools"]
        checked = compare_trees(big_tree, mp / "tools", skip_content={"sparse-5G.img"})
        assert checked > 10
        sparse = mp / "tools" / "sparse-5G.img"
        assert sparse.stat().st_size == 5 * GIB
        with open(sparse, "rb") as f:
            assert f.read(4096) == bytes(4096)
            f.seek(BIG_MARK_AT - 10)
            assert f.read(40) == bytes(10) + b"beyond four gibibytes" + bytes(9)
            f.seek(5 * GIB - 5)
            assert f.read(100) == bytes(5)
        blob_id = os.getxattr(mp / "tools" / "big-300M.bin", "user.p2pfs.id")
        assert len(bytes.fromhex(blob_id.decode())) == 32
        with pytest.raises(OSError) as e:
            (mp / "tools" / "empty").write_bytes(b"x")
        assert e.value.errno in (errno.EROFS, errno.EACCES)
        st = os.statvfs(mp)
        assert st.f_namemax == 255
        status = json.loads(run_cli(home, "status", "--json", check=True).stdout)
        assert status["daemon"]["mountpoint"] == str(mp)
        assert status["bytes_from"]["local"] >= 300 * MIB
        assert status["volumes"][0]["name"] == "tools"


def test_directory_of_100000_entries_lists_completely(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src" / "many"
    src.mkdir(parents=True)
    names = [f"entry-{i:06d}" for i in range(100_000)]
    for n in names:
        (src / n).touch()
    run_cli(home, "volume", "create", "big", check=True)
    run_cli(home, "import", str(src.parent), "big", check=True)
    with mounted(home, tmp_path / "mnt") as mp:
        listed = os.listdir(mp / "big" / "many")
        assert len(listed) == 100_000
        assert sorted(listed) == names
        assert (mp / "big" / "many" / "entry-054321").stat().st_size == 0


def _chunk_of(home: Path, volume: str, filename: str, index: int = 0) -> bytes:
    h = Home(home)
    store = Store(h.store_dir)
    try:
        reg = VolumeRegistry(h)
        snap = reg.load_head(store, reg.get(volume))
        assert snap is not None
        tree = decode_tree(store.get_object(snap.root))
        entry = next(e for e in tree.entries if e.name == filename.encode())
        blob = decode_blob(store.get_object(entry.id))
        assert blob.level == 0
        return blob.refs[index].id
    finally:
        store.close()


def _flip_bit(home: Path, cid: bytes) -> None:
    store = Store(Home(home).store_dir)
    try:
        path = store.path_of(cid)
    finally:
        store.close()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x04
    os.chmod(path, 0o644)
    path.write_bytes(data)


def test_corrupted_chunk_gives_eio_never_a_wrong_byte(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    victim = os.urandom(3 * MIB)
    (src / "victim.bin").write_bytes(victim)
    for i in range(5):
        (src / f"other{i}.bin").write_bytes(os.urandom(700 * KIB))
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(src), "tools", check=True)
    bad_chunk = _chunk_of(home, "tools", "victim.bin", index=1)
    _flip_bit(home, bad_chunk)
    with mounted(home, tmp_path / "mnt") as mp:
        got = bytearray()
        failed = False
        with open(mp / "tools" / "victim.bin", "rb", buffering=0) as f:
            while True:
                try:
                    piece = f.read(64 * KIB)
                except OSError as e:
                    assert e.errno == errno.EIO
                    failed = True
                    break
                if not piece:
                    break
                got += piece
        assert failed, "a corrupted chunk was read without error"
        assert bytes(got) == victim[: len(got)], "a wrong byte reached the application"
        for i in range(5):
            assert (mp / "tools" / f"other{i}.bin").read_bytes() == (
                src / f"other{i}.bin"
            ).read_bytes()
        status = json.loads(run_cli(home, "status", "--json", check=True).stdout)
        assert status["store"]["corrupt_chunks"] >= 1
        assert status["store"]["quarantined"] >= 1
        # Still EIO on a second try: the chunk is gone, not re-read as good.
        with pytest.raises(OSError) as e:
            (mp / "tools" / "victim.bin").read_bytes()
        assert e.value.errno == errno.EIO


def test_unexpected_handler_error_gives_eio_and_mount_survives(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"hello" * 1000)
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(src), "tools", check=True)
    with mounted(home, tmp_path / "mnt", "--debug-faults") as mp:
        sock = Home(home).control_socket
        control.call(sock, "inject-fault", handler="read")
        with pytest.raises(OSError) as e:
            (mp / "tools" / "f").read_bytes()
        assert e.value.errno == errno.EIO
        control.call(sock, "inject-fault", handler="read", clear=True)
        assert (mp / "tools" / "f").read_bytes() == b"hello" * 1000
        errors = control.call(sock, "status")["fuse_errors"]
        assert errors >= 1
        control.call(sock, "inject-fault", handler="getattr")
        time.sleep(ROOT_TIMEOUT + 0.2)  # let the kernel's cached root attributes expire
        with pytest.raises(OSError) as e:
            os.stat(mp)
        assert e.value.errno == errno.EIO
        control.call(sock, "inject-fault", handler="getattr", clear=True)
        assert os.listdir(mp) == ["tools"]
        assert os.stat(mp / "tools" / "f").st_size == 5000
        assert control.call(sock, "status")["fuse_errors"] > errors


def test_the_kernel_asks_flush_once_and_every_close_still_succeeds(
    home: Path, tmp_path: Path
) -> None:
    # flush answers ENOSYS, so the kernel stops sending FLUSH at close(): a round trip
    # less per file. close() must still return 0 and nothing may count as an error.
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(5).randbytes(100 * KIB)
    (src / "f").write_bytes(data)
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(src), "tools", check=True)
    with mounted(home, tmp_path / "mnt") as mp:
        for _ in range(20):
            fd = os.open(mp / "tools" / "f", os.O_RDONLY)
            try:
                assert os.read(fd, len(data) + 1) == data
            finally:
                os.close(fd)  # raises if close() failed
        requests = json.loads(run_cli(home, "status", "--json", check=True).stdout)
        calls, errors = requests["fuse_requests"]["calls"], requests["fuse_requests"]["errors"]
        assert calls["open"] >= 20
        assert calls.get("flush", 0) == 1, calls
        assert "flush" not in errors and requests["fuse_errors"] == 0


def test_the_publishers_mount_keeps_re_reads_in_the_page_cache_and_in_step_with_writes(
    home: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = random.Random(6).randbytes(3 * MIB + 5)
    (src / "f").write_bytes(data)
    run_cli(home, "volume", "create", "tools", check=True)  # this node publishes: writable
    run_cli(home, "import", str(src), "tools", check=True)

    def reads() -> int:
        status = json.loads(run_cli(home, "status", "--json", check=True).stdout)
        return int(status["fuse_requests"]["calls"].get("read", 0))

    with mounted(home, tmp_path / "mnt") as mp:
        f = mp / "tools" / "f"
        assert f.read_bytes() == data
        before = reads()
        assert f.read_bytes() == data  # a new open keeps the pages: no read reaches us
        assert reads() == before
        # Bytes changed through the mount are what every later open reads.
        with open(f, "r+b") as w:
            w.seek(MIB)
            w.write(b"changed in place")
        changed = data[:MIB] + b"changed in place" + data[MIB + 16 :]
        assert f.read_bytes() == changed
        os.truncate(f, 10)
        assert f.read_bytes() == data[:10]
        with open(f, "ab") as w:
            w.write(b"+tail")
        assert f.read_bytes() == data[:10] + b"+tail"
    # And after a remount, from the daemon.
    with mounted(home, tmp_path / "mnt") as mp:
        assert (mp / "tools" / "f").read_bytes() == data[:10] + b"+tail"


def test_mount_errors_are_clear(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(src), "tools", check=True)
    with mounted(home, tmp_path / "mnt") as mp:
        again = run_cli(home, "mount", str(tmp_path))
        assert again.returncode == 1 and "already running" in again.stderr
        other = tmp_path / "other"
        run_cli(other, "init", check=True)
        busy = run_cli(other, "mount", str(mp))
        assert busy.returncode == 5 and "busy" in busy.stderr
        assert "Traceback" not in again.stderr + busy.stderr
    notm = run_cli(home, "umount", str(tmp_path / "mnt"))
    assert notm.returncode == 3 and "nothing" in notm.stderr


def test_damaged_index_and_objects_lose_nothing(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f").write_bytes(os.urandom(500 * KIB))
    (src / "g").write_bytes(os.urandom(100 * KIB))
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(src), "tools", check=True)
    index = Home(home).store_dir / "index.sqlite"
    for suffix in ("-wal", "-shm"):
        Path(str(index) + suffix).unlink(missing_ok=True)
    with open(index, "r+b") as f:
        f.truncate(os.path.getsize(index) // 3)
    # Read-only: a writable mount keeps the directories it visited in its work tree.
    with mounted(home, tmp_path / "mnt", read_only=True) as mp:
        assert (mp / "tools" / "d" / "f").read_bytes() == (src / "d" / "f").read_bytes()
    # A damaged tree object: that directory fails with EIO, the rest still reads.
    h = Home(home)
    store = Store(h.store_dir)
    try:
        reg = VolumeRegistry(h)
        snap = reg.load_head(store, reg.get("tools"))
        root = decode_tree(store.get_object(snap.root))
        sub = next(e for e in root.entries if e.name == b"d")
    finally:
        store.close()
    _flip_bit(home, sub.id)
    with mounted(home, tmp_path / "mnt", read_only=True) as mp:
        with pytest.raises(OSError) as e:
            os.listdir(mp / "tools" / "d")
        assert e.value.errno == errno.EIO
        assert (mp / "tools" / "g").read_bytes() == (src / "g").read_bytes()


def test_new_snapshot_switches_mount_and_open_files_keep_their_version(
    home: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_bytes(b"version one")
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(src), "tools", check=True)
    with (
        mounted(home, tmp_path / "mnt", read_only=True) as mp,
        open(mp / "tools" / "f", "rb") as old,
    ):
        (src / "f").write_bytes(b"version two!")
        run_cli(home, "import", str(src), "tools", check=True)
        assert (mp / "tools" / "f").read_bytes() == b"version two!"
        assert old.read() == b"version one"


@pytest.mark.skipif(shutil.which("fio") is None, reason="fio is not installed")
def test_fio_verify_reads_through_the_mount(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    # fio writes blocks with crc32c headers, then re-reads them through the
    # mount: a read workload with verify= checks every block it reads (fio's
    # verify_only mode would open the file for writing, which a ro mount refuses).
    common = [
        "--name=p2pfs",
        "--bs=4k",
        "--size=48M",
        "--verify=crc32c",
        "--ioengine=psync",
        "--randrepeat=1",
        "--verify_state_save=0",
    ]
    subprocess.run(
        ["fio", *common, "--rw=randwrite", f"--filename={src / 'fio.dat'}", "--do_verify=0"],
        check=True,
        capture_output=True,
    )
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(src), "tools", check=True)
    with mounted(home, tmp_path / "mnt") as mp:
        for rw in ("read", "randread"):
            proc = subprocess.run(
                [
                    "fio",
                    *common,
                    f"--rw={rw}",
                    "--readonly",
                    f"--filename={mp / 'tools' / 'fio.dat'}",
                ],
                capture_output=True,
                text=True,
            )
            assert proc.returncode == 0, proc.stdout + proc.stderr
            assert "verify failed" not in proc.stdout + proc.stderr


def test_stale_mount_of_a_killed_daemon_is_named_and_cleared(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(src), "tools", check=True)
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        run_cli(home, "mount", str(mp), check=True, timeout=120)
        pid = int((home / "run" / "daemon.pid").read_text())
        os.kill(pid, 9)
        for _ in range(100):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        again = run_cli(home, "mount", str(mp))
        assert again.returncode == 5, again.stderr
        assert "stale mount" in again.stderr and "Traceback" not in again.stderr
        cleared = run_cli(home, "umount", str(mp))
        assert cleared.returncode == 0 and "stale" in cleared.stdout, cleared.stderr
        assert not os.path.ismount(mp)
        with mounted(home, mp) as m:
            assert (m / "tools" / "f").read_text() == "x"
    finally:
        force_unmount(mp, home)


def test_log_lists_snapshots_newest_first(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    run_cli(home, "volume", "create", "tools", check=True)
    for i in range(3):
        (src / f"f{i}").write_text(str(i))
        run_cli(home, "import", str(src), "tools", check=True)
    with mounted(home, tmp_path / "mnt"):
        snaps = json.loads(run_cli(home, "log", "tools", "--json", check=True).stdout)
        assert [s["seq"] for s in snaps] == [3, 2, 1]
        assert all(s["available"] for s in snaps)
        text = run_cli(home, "log", "tools", "-n", "2", check=True).stdout.splitlines()
        assert len(text) == 2 and text[0].startswith("seq      3")
        bad = run_cli(home, "log", "nosuch")
        assert bad.returncode == 3 and "unknown volume" in bad.stderr


def test_hidden_snapshots_dir_serves_every_version(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    run_cli(home, "volume", "create", "tools", check=True)
    ids = []
    for i in range(3):
        (src / "version").write_text(f"v{i + 1}\n")
        (src / f"added-{i + 1}").write_text("x")
        report = json.loads(run_cli(home, "import", str(src), "tools", "--json", check=True).stdout)
        ids.append(report["snapshot"])
    with mounted(home, tmp_path / "mnt") as mp:
        vol = mp / "tools"
        assert ".snapshots" not in os.listdir(vol)  # hidden: found by name only
        snaps = vol / ".snapshots"
        assert sorted(os.listdir(snaps)) == ["1", "2", "3"]
        for seq in (1, 2, 3):
            d = snaps / str(seq)
            assert (d / "version").read_text() == f"v{seq}\n"
            assert sorted(os.listdir(d)) == sorted(
                ["version", *(f"added-{k}" for k in range(1, seq + 1))]
            )
            assert os.getxattr(d / "version", "user.p2pfs.snapshot").decode() == ids[seq - 1]
        assert not (snaps / "4").exists()
        with pytest.raises(OSError) as e:
            (snaps / "1" / "new").write_text("no")
        assert e.value.errno in (errno.EROFS, errno.EACCES)
