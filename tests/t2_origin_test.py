"""Origins without a network: the layout written into a directory (what an HTTP origin's
server publishes), through the real command line. Resuming, refusing what an origin must
not take, and a private volume's origin holding only ciphertext. Over real S3 and HTTP
servers: t21 and t22."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from harness import run_cli

from p2pfs.home import Home
from p2pfs.keys import SigningKey
from p2pfs.objects.model import Snapshot, decode_snapshot
from p2pfs.origin.layout import LATEST, OBJECTS

pytestmark = pytest.mark.unit
MARKER = b"payroll-marker-7f3a"
URL = "http://mirror.example.org/p2pfs/tools/"


def _tree(root: Path) -> None:
    (root / "d").mkdir(parents=True)
    (root / "d" / "big.bin").write_bytes(random.Random(3).randbytes(3 * 1024 * 1024) + MARKER)
    (root / "secret-name.txt").write_bytes(MARKER)


@pytest.fixture
def published(home: Path, tmp_path: Path) -> tuple[Path, Path]:
    run_cli(home, "volume", "create", "tools", check=True)
    _tree(tmp_path / "src")
    run_cli(home, "import", str(tmp_path / "src"), "tools", check=True)
    www = tmp_path / "www"
    www.mkdir()
    return home, www


def _objects(www: Path) -> list[Path]:
    return [p for p in (www / OBJECTS).rglob("*") if p.is_file()]


def test_sync_uploads_what_is_missing_and_latest_last(published: tuple[Path, Path]) -> None:
    home, www = published
    out = run_cli(home, "origin", "add", "tools", URL, "--dir", str(www), check=True)
    assert "snapshot 2 announces 1 origin" in out.stdout
    first = json.loads(run_cli(home, "origin", "sync", "tools", "--json", check=True).stdout)[0]
    assert first["seq"] == 2 and first["uploaded"] == first["objects"] > 3
    assert decode_snapshot((www / LATEST).read_bytes()).seq == 2
    assert (www / "snapshots" / f"{2:020d}").read_bytes() == (www / LATEST).read_bytes()
    # Some objects lost (a half-copied mirror): only those go up again.
    lost = sorted(_objects(www))[:3]
    for p in lost:
        p.unlink()
    again = json.loads(run_cli(home, "origin", "sync", "tools", "--json", check=True).stdout)[0]
    assert again["uploaded"] == 3 and again["present"] == first["objects"] - 3
    assert all(p.exists() for p in lost)
    rows = json.loads(run_cli(home, "origin", "list", "--json", check=True).stdout)
    assert rows == [
        {
            "volume": "tools",
            "url": URL,
            "kind": "http",
            "writable_here": True,
            "reachable": True,
            "seq": 2,
            "lag": 0,
            "objects": first["objects"],
            "bytes": sum(p.stat().st_size for p in _objects(www)),
            "error": None,
        }
    ]


def test_an_origin_of_another_publisher_or_volume_is_refused(
    published: tuple[Path, Path],
) -> None:
    home, www = published
    run_cli(home, "origin", "add", "tools", URL, "--dir", str(www), check=True)
    run_cli(home, "origin", "sync", "tools", check=True)
    # A newer snapshot of the same volume there (another machine publishes it).
    key = SigningKey.load(Home(home).volumes_dir / "tools" / "publisher.key")
    head = decode_snapshot((www / LATEST).read_bytes())
    newer = Snapshot.create(
        key,
        name="tools",
        seq=9,
        parent=head.parent,
        root=head.root,
        time_ns=1,
        params=dict(head.params),
    )
    (www / LATEST).write_bytes(newer.encode())
    proc = run_cli(home, "origin", "sync", "tools")
    assert proc.returncode == 1 and "newer than this node's 2" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # Another volume's.
    other = Snapshot.create(
        SigningKey.generate(),
        name="tools",
        seq=1,
        parent=None,
        root=head.root,
        time_ns=1,
        params=dict(head.params),
    )
    (www / LATEST).write_bytes(other.encode())
    proc = run_cli(home, "origin", "sync", "tools")
    assert proc.returncode == 1 and "another volume" in proc.stderr
    # Garbage.
    (www / LATEST).write_bytes(b"\x93not a snapshot")
    proc = run_cli(home, "origin", "sync", "tools")
    assert proc.returncode == 1 and "not a valid snapshot" in proc.stderr


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("ftp://x/y/",), 2, "must begin with"),
        (("s3://Bad_Bucket/x",), 2, "valid bucket name"),
        (("s3://bucket/x", "--dir", "/tmp"), 2, "--dir is for an HTTP origin"),
        (("https://m.example/x/", "--endpoint", "https://e.example/"), 2, "no endpoint"),
    ],
)
def test_bad_origins_are_refused_with_one_line(
    published: tuple[Path, Path], args: tuple[str, ...], code: int, message: str
) -> None:
    home, _ = published
    proc = run_cli(home, "origin", "add", "tools", *args)
    assert proc.returncode == code and message in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_add_and_remove_announce_and_refuse_what_they_cannot_mean(
    published: tuple[Path, Path], home: Path
) -> None:
    home, www = published
    run_cli(home, "origin", "add", "tools", URL, "--dir", str(www), check=True)
    proc = run_cli(home, "origin", "add", "tools", URL, "--dir", str(www))
    assert proc.returncode == 1 and "already announces" in proc.stderr
    proc = run_cli(home, "origin", "remove", "tools", "https://other.example/")
    assert proc.returncode == 3 and "announces no origin" in proc.stderr
    run_cli(home, "origin", "remove", "tools", URL, check=True)
    rows = json.loads(run_cli(home, "origin", "list", "--json", check=True).stdout)
    assert rows == []
    run_cli(home, "volume", "create", "empty", check=True)
    proc = run_cli(home, "origin", "add", "empty", URL, "--dir", str(www))
    assert proc.returncode == 1 and "no snapshot yet" in proc.stderr
    proc = run_cli(home, "origin", "sync", "empty")
    assert proc.returncode == 3 and "no origin this node writes" in proc.stderr


def test_a_private_volumes_origin_holds_only_ciphertext(home: Path, tmp_path: Path) -> None:
    run_cli(home, "estate", "init", check=True)
    run_cli(home, "volume", "create", "hr", "--private", check=True)
    _tree(tmp_path / "src")
    run_cli(home, "import", str(tmp_path / "src"), "hr", check=True)
    www = tmp_path / "www"
    www.mkdir()
    url = "http://mirror.example.org/p2pfs/hr/"
    run_cli(home, "origin", "add", "hr", url, "--dir", str(www), check=True)
    report = json.loads(run_cli(home, "origin", "sync", "hr", "--json", check=True).stdout)[0]
    assert report["uploaded"] == report["objects"] > 3
    files = [p for p in www.rglob("*") if p.is_file()]
    assert not [p for p in files if MARKER in p.read_bytes() or b"secret-name" in p.read_bytes()]
    latest = decode_snapshot((www / LATEST).read_bytes())
    assert latest.private and latest.seq == 2 and latest.origins[0].url == url
    # The root key was sealed again for seq 2: a reader opens it (and the next import works).
    from p2pfs.seal import open_root
    from p2pfs.trust.estate import Estate, node_key

    estate = Estate.load(Home(home))
    assert estate is not None and latest.root_key is not None
    secret = estate.access.secret(
        latest.volume_id, latest.epoch, node_key(Home(home)), estate.node_id
    )
    open_root(secret, latest.volume_id, latest.seq, latest.root, latest.root_key)
    run_cli(home, "import", str(tmp_path / "src"), "hr", check=True)
    report = json.loads(run_cli(home, "origin", "sync", "hr", "--json", check=True).stdout)[0]
    assert report["seq"] == 3 and report["uploaded"] == 0  # the same content, already there


def test_volume_restore_needs_the_key_and_the_same_volume(
    published: tuple[Path, Path], tmp_path: Path
) -> None:
    _home, _www = published
    other = tmp_path / "other"
    run_cli(other, "init", check=True)
    proc = run_cli(other, "volume", "restore", "tools", "--from", URL)
    assert proc.returncode == 3 and "unknown volume 'tools'" in proc.stderr
