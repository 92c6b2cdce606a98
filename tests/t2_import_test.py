"""Import through the CLI: dedup, reimport skipping, special and unreadable files, bad input."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from harness import run_cli

from p2pfs.home import Home
from p2pfs.objects.model import Entry, Kind, decode_tree
from p2pfs.store.cas import Store
from p2pfs.volume.registry import VolumeRegistry

pytestmark = pytest.mark.unit


def _import(home: Path, src: Path, volume: str = "tools") -> dict:
    proc = run_cli(home, "import", str(src), volume, "--json")
    assert proc.returncode in (0, 1), proc.stderr
    return json.loads(proc.stdout)


def _stats(home: Path):
    store = Store(Home(home).store_dir)
    try:
        return store.statistics()
    finally:
        store.close()


def test_volume_create_prints_id_and_rejects_duplicates(home: Path) -> None:
    proc = run_cli(home, "volume", "create", "tools", check=True)
    vid = proc.stdout.strip()
    assert len(bytes.fromhex(vid)) == 32
    again = run_cli(home, "volume", "create", "tools")
    assert again.returncode == 1
    assert "already exists" in again.stderr and "Traceback" not in again.stderr
    bad = run_cli(home, "volume", "create", "../evil")
    assert bad.returncode == 2 and "invalid volume name" in bad.stderr


def test_file_imported_twice_costs_its_chunks_once(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    data = os.urandom(3 * 1024 * 1024 + 12345)
    (src / "a" / "one.bin").write_bytes(data)
    (src / "two.bin").write_bytes(data)
    run_cli(home, "volume", "create", "tools", check=True)
    report = _import(home, src)
    assert report["files"] == 2
    assert report["bytes"] == 2 * len(data)
    assert report["new_bytes"] == len(data)
    assert report["dedup_ratio"] == pytest.approx(2.0, rel=1e-3)
    chunks_after_first = _stats(home).chunks

    # Another volume holding the same bytes again adds only its own tree/blob/snapshot objects.
    run_cli(home, "volume", "create", "copy", check=True)
    second = _import(home, src, "copy")
    assert second["new_bytes"] == 0
    assert second["new_chunks"] == 0
    assert _stats(home).chunks - chunks_after_first <= 4


def test_reimport_of_unchanged_tree_writes_no_chunk_and_skips_by_stat(
    home: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(30):
        (src / f"f{i}").write_bytes(os.urandom(50_000 + i))
    old = 1_600_000_000
    for p in src.iterdir():
        os.utime(p, (old, old))
    run_cli(home, "volume", "create", "tools", check=True)
    first = _import(home, src)
    assert first["new_chunks"] >= 30 and first["reused_files"] == 0
    second = _import(home, src)
    assert second["new_chunks"] == 0
    assert second["reused_files"] == 30
    assert second["seq"] == first["seq"] + 1
    # A file changed behind the same size is read again.
    (src / "f3").write_bytes(os.urandom(50_003))
    third = _import(home, src)
    assert third["reused_files"] == 29
    assert third["new_chunks"] >= 1


def _head_tree(home: Path, volume: str = "tools") -> dict[bytes, Entry]:
    """The entries of the volume's head root tree, by name."""
    store = Store(Home(home).store_dir)
    try:
        registry = VolumeRegistry(Home(home))
        snap = registry.load_head(store, registry.get(volume))
        assert snap is not None
        return {e.name: e for e in decode_tree(store.get_object(snap.root)).entries}
    finally:
        store.close()


def test_fifos_sockets_devices_and_xattrs_are_imported(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "ok").write_text("fine")
    os.setxattr(src / "ok", "user.colour", b"blue")
    os.mkfifo(src / "pipe", 0o640)
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    root = os.geteuid() == 0
    if root:
        os.mknod(src / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(src / "disk", 0o660 | stat.S_IFBLK, os.makedev(8, 1))
    try:
        run_cli(home, "volume", "create", "tools", check=True)
        proc = run_cli(home, "import", str(src), "tools", "--json")
    finally:
        sock.close()
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["files"] == 1 and report["specials"] == (4 if root else 2), report
    entries = _head_tree(home)
    assert entries[b"ok"].xattrs == ((b"user.colour", b"blue"),)
    assert entries[b"pipe"].kind is Kind.FIFO and entries[b"pipe"].mode == 0o640
    assert entries[b"sock"].kind is Kind.SOCKET
    assert all(e.owner is None for e in entries.values())  # the volume keeps no owners
    if root:
        assert entries[b"null"].kind is Kind.CHR and entries[b"null"].rdev == os.makedev(1, 3)
        assert entries[b"disk"].kind is Kind.BLK and entries[b"disk"].rdev == os.makedev(8, 1)


def test_a_volume_keeping_owners_imports_uid_and_gid(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "mine").write_text("x")
    (src / "dir").mkdir()
    if os.geteuid() == 0:
        os.chown(src / "mine", 1234, 5678)
    st = os.lstat(src / "mine")
    run_cli(home, "volume", "create", "tools", "--keep-owners", check=True)
    listed = json.loads(run_cli(home, "volume", "list", "--json", check=True).stdout)
    assert listed[0]["keep_owners"] is True
    proc = run_cli(home, "import", str(src), "tools")
    assert proc.returncode == 0, proc.stderr
    entries = _head_tree(home)
    assert entries[b"mine"].owner == (st.st_uid, st.st_gid)
    assert entries[b"dir"].owner == (os.getuid(), os.getgid())


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv"
)
def test_unreadable_files_are_reported_not_fatal(home: Path, tmp_path: Path) -> None:
    # Root reads anything; without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH in its
    # bounding set it obeys file modes like any user.
    src = tmp_path / "src"
    src.mkdir()
    (src / "readable").write_text("yes")
    (src / "secret").write_text("no")
    os.chmod(src / "secret", 0o000)
    (src / "closed").mkdir()
    (src / "closed" / "x").write_text("x")
    os.chmod(src / "closed", 0o000)
    run_cli(home, "volume", "create", "tools", check=True)
    try:
        proc = subprocess.run(
            [
                "setpriv",
                "--bounding-set=-dac_override,-dac_read_search",
                sys.executable,
                "-m",
                "p2pfs",
                "--home",
                str(home),
                "import",
                str(src),
                "tools",
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        os.chmod(src / "closed", 0o755)
    assert proc.returncode == 1, proc.stderr
    assert "cannot read secret" in proc.stderr
    assert "cannot read closed" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "files: 1" in proc.stdout  # the readable file was stored and a snapshot made


def test_bad_input_gives_one_clear_line(home: Path, tmp_path: Path) -> None:
    run_cli(home, "volume", "create", "tools", check=True)
    cases = [
        (("import", str(tmp_path), "nosuch"), 3, "unknown volume 'nosuch'"),
        (("import", str(tmp_path / "missing"), "tools"), 3, "no such directory"),
        (("mount", str(tmp_path / "nowhere")), 3, "does not exist"),
        (("status",), 0, None),
    ]
    for args, code, text in cases:
        proc = run_cli(home, *args)
        assert proc.returncode == code, (args, proc.stderr)
        assert "Traceback" not in proc.stderr
        if text:
            assert text in proc.stderr
            assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    file_src = tmp_path / "afile"
    file_src.write_text("x")
    proc = run_cli(home, "import", str(file_src), "tools")
    assert proc.returncode == 1 and "not a directory" in proc.stderr
    nohome = run_cli(tmp_path / "nohome", "status")
    assert nohome.returncode == 3 and "init" in nohome.stderr
