"""Private volumes on one node: sealing, boxes, access lists, the admin's commands, and a
private volume read through a real mount (the lab test, t14, takes them across hosts)."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from harness import mounted, run_cli

from p2pfs.errors import DecodeError, IntegrityError, P2pfsError, SignatureError
from p2pfs.home import Home
from p2pfs.ids import content_id
from p2pfs.keys import SigningKey, seal_box
from p2pfs.objects.id_list import IdList, decode_id_list
from p2pfs.objects.model import decode_snapshot
from p2pfs.seal import (
    REF_SIZE,
    new_secret,
    open_root,
    seal,
    seal_root,
    stored_id,
    unseal,
)
from p2pfs.trust.access import VolumeAccess, decode_access, sign_access
from p2pfs.trust.estate import Estate

MARKER = b"P2PFS-MARKER-THAT-MUST-NOT-BE-STORED"


# -- sealing ----------------------------------------------------------------------


@pytest.mark.unit
def test_sealing_is_convergent_within_an_epoch_and_verifiable_without_the_key() -> None:
    secret = new_secret()
    data = os.urandom(100_000)
    stored, ref = seal(secret, data)
    assert len(ref) == REF_SIZE and stored_id(ref) == content_id(stored)
    assert data not in stored
    assert seal(secret, data) == (stored, ref)  # dedup within the volume's epoch
    assert seal(new_secret(), data)[1] != ref  # nothing links across volumes or epochs
    assert unseal(ref, stored) == data


@pytest.mark.unit
def test_altered_bytes_or_a_wrong_key_never_open() -> None:
    secret = new_secret()
    stored, ref = seal(secret, b"payroll " * 100)
    flipped = bytearray(stored)
    flipped[7] ^= 1
    with pytest.raises(IntegrityError):
        unseal(ref, bytes(flipped))
    with pytest.raises(IntegrityError):
        unseal(stored_id(ref) + bytes(32), stored)


@pytest.mark.unit
def test_a_root_key_opens_only_in_its_own_snapshot() -> None:
    secret = new_secret()
    _, ref = seal(secret, b"a tree")
    vid = os.urandom(32)
    sealed = seal_root(secret, vid, 3, ref)
    assert open_root(secret, vid, 3, stored_id(ref), sealed) == ref
    for args in ((vid, 4, stored_id(ref)), (os.urandom(32), 3, stored_id(ref))):
        with pytest.raises(IntegrityError):
            open_root(secret, *args, sealed)
    with pytest.raises(IntegrityError):
        open_root(new_secret(), vid, 3, stored_id(ref), sealed)


@pytest.mark.unit
def test_a_box_opens_only_with_its_node_key() -> None:
    key = SigningKey.generate()
    box = seal_box(key.public_bytes(), b"k" * 32)
    assert key.open_box(box) == b"k" * 32
    with pytest.raises(IntegrityError):
        SigningKey.generate().open_box(box)
    with pytest.raises(SignatureError):
        seal_box(b"short", b"x")


@pytest.mark.unit
def test_id_lists_round_trip_and_refuse_mismatched_sizes() -> None:
    ids = tuple(os.urandom(32) for _ in range(5))
    part = IdList(ids, (1, 2, 3, 4, 5), None)
    assert decode_id_list(part.encode()) == part
    with pytest.raises(DecodeError):
        IdList(ids, (1, 2), None)


# -- access lists -------------------------------------------------------------------


def _access(ca: SigningKey, number: int, node: SigningKey) -> bytes:
    from p2pfs.home import node_id_of

    nid = node_id_of(node.public_bytes())
    va = VolumeAccess(os.urandom(32), "hr", frozenset({nid}), frozenset(), 1, {1: {nid: b"box"}})
    return sign_access(ca, b"e" * 16, number, [va])


@pytest.mark.unit
def test_access_lists_are_checked_against_the_ca_and_the_estate() -> None:
    ca, node = SigningKey.generate(), SigningKey.generate()
    data = _access(ca, 7, node)
    got = decode_access(data, ca.public_bytes(), b"e" * 16)
    assert got.number == 7 and len(got.volumes) == 1
    va = next(iter(got.volumes.values()))
    assert got.is_private(va.volume_id) and not got.is_private(os.urandom(32))
    outsider = os.urandom(16)
    assert not got.may_see(outsider, va.volume_id)
    assert got.may_see(outsider, os.urandom(32))  # not listed: public
    with pytest.raises(SignatureError):
        decode_access(data, SigningKey.generate().public_bytes(), b"e" * 16)
    with pytest.raises(IntegrityError):
        decode_access(data, ca.public_bytes(), b"x" * 16)
    tampered = bytearray(data)
    tampered[len(tampered) // 2] ^= 1
    with pytest.raises((DecodeError, SignatureError)):
        decode_access(bytes(tampered), ca.public_bytes(), b"e" * 16)


# -- the admin's commands -------------------------------------------------------------


@pytest.fixture
def admin(home: Path) -> Path:
    run_cli(home, "estate", "init", check=True)
    return home


@pytest.mark.unit
def test_private_needs_the_admin_node(home: Path) -> None:
    proc = run_cli(home, "volume", "create", "hr", "--private")
    assert proc.returncode == 2 and "admin node" in proc.stderr
    assert "hr" not in run_cli(home, "volume", "list", check=True).stdout


@pytest.mark.unit
def test_grants_refuse_what_they_cannot_mean(admin: Path) -> None:
    run_cli(admin, "volume", "create", "tools", check=True)
    run_cli(admin, "volume", "create", "hr", "--private", check=True)
    proc = run_cli(admin, "volume", "grant", "tools", "0" * 32)
    assert proc.returncode == 2 and "not private" in proc.stderr
    proc = run_cli(admin, "volume", "grant", "hr", "0" * 32)
    assert proc.returncode != 0 and "not known to this admin" in proc.stderr
    proc = run_cli(admin, "volume", "grant", "hr", "not a node!")
    assert proc.returncode == 2 and "neither a node id" in proc.stderr
    proc = run_cli(admin, "volume", "grant", "hr", "@nobody")
    assert proc.returncode != 0 and "no group 'nobody'" in proc.stderr
    proc = run_cli(admin, "volume", "revoke", "hr", "1" * 32)
    assert proc.returncode != 0 and "holds no grant" in proc.stderr
    me = json.loads((admin / "node.json").read_text())["node_id"]
    proc = run_cli(admin, "volume", "revoke", "hr", me)
    assert proc.returncode == 2 and "always reads" in proc.stderr
    doc = json.loads(run_cli(admin, "volume", "access", "hr", "--json", check=True).stdout)
    assert doc["readers"] == [me] and doc["epoch"] == 1 and doc["access_list"] == 1


@pytest.mark.unit
def test_grant_revoke_and_groups_sign_numbered_lists_and_epochs(
    admin: Path, tmp_path: Path
) -> None:
    run_cli(admin, "volume", "create", "hr", "--private", check=True)
    other = tmp_path / "other"
    run_cli(other, "init", check=True)
    req, bundle = tmp_path / "req", tmp_path / "bundle"
    run_cli(other, "request-join", "--out", str(req), check=True)
    run_cli(admin, "estate", "approve", str(req), "--out", str(bundle), check=True)
    run_cli(other, "join", str(bundle), check=True)
    node = json.loads((other / "node.json").read_text())["node_id"]
    run_cli(admin, "group", "add", "finance", node, check=True)
    run_cli(admin, "volume", "grant", "hr", "finance", check=True)
    doc = json.loads(run_cli(admin, "volume", "access", "hr", "--json", check=True).stdout)
    assert node in doc["readers"] and doc["granted"]["readers"][-1] == "@finance"
    estate = Estate.load(Home(admin))
    assert estate is not None
    # The other node can open its box of epoch 1 (with its own key only).
    from p2pfs.trust.estate import node_key

    vid = bytes.fromhex(doc["id"])
    mine = estate.access.secret(vid, 1, node_key(Home(other)), bytes.fromhex(node))
    assert len(mine) == 32
    proc = run_cli(admin, "volume", "revoke", "hr", node)
    assert proc.returncode != 0 and "@finance" in proc.stderr  # it reads through a group
    run_cli(admin, "volume", "revoke", "hr", "@finance", check=True)
    doc = json.loads(run_cli(admin, "volume", "access", "hr", "--json", check=True).stdout)
    assert node not in doc["readers"] and doc["epoch"] == 2
    estate = Estate.load(Home(admin))
    assert estate is not None
    with pytest.raises(P2pfsError, match="not granted"):
        estate.access.secret(vid, 2, node_key(Home(other)), bytes.fromhex(node))
    run_cli(admin, "volume", "grant", "hr", node, "--cache-only", check=True)
    doc = json.loads(run_cli(admin, "volume", "access", "hr", "--json", check=True).stdout)
    assert doc["cache_only"] == [node] and doc["access_list"] == 5


# -- through a mount ----------------------------------------------------------------


def _tree(root: Path) -> dict[str, bytes]:
    rng = random.Random(4)
    (root / "d").mkdir(parents=True)
    files = {
        "d/big.bin": rng.randbytes(5 * 1024 * 1024) + MARKER,
        "note.txt": MARKER + b" salaries",
        "name-that-is-secret.txt": b"x",
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    os.symlink("note.txt", root / "link")
    return files


def _grep(home: Path, needle: bytes) -> list[Path]:
    return [p for p in (home / "store").rglob("*") if p.is_file() and needle in p.read_bytes()]


@pytest.mark.mount
@pytest.mark.fuse
def test_a_private_volume_reads_through_the_mount_and_its_store_holds_only_ciphertext(
    admin: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    run_cli(admin, "volume", "create", "hr", "--private", check=True)
    run_cli(admin, "import", str(src), "hr", check=True)
    assert _grep(admin, MARKER) == [] and _grep(admin, b"name-that-is-secret") == []
    (src / "later.txt").write_bytes(MARKER + b" later")
    run_cli(admin, "import", str(src), "hr", check=True)
    with mounted(admin, tmp_path / "mnt", read_only=True) as mp:
        for rel, data in files.items():
            assert (mp / "hr" / rel).read_bytes() == data
        assert os.readlink(mp / "hr" / "link") == "note.txt"
        assert sorted(os.listdir(mp / "hr" / ".snapshots")) == ["1", "2"]
        assert not (mp / "hr" / ".snapshots" / "1" / "later.txt").exists()
        st = json.loads(run_cli(admin, "status", "--json", check=True).stdout)
        vol = next(v for v in st["volumes"] if v["name"] == "hr")
        assert vol["access"] == "reader" and vol["problem"] is None
        # rekey --full: a new epoch, and the head sealed again in it
        before = json.loads(run_cli(admin, "volume", "access", "hr", "--json", check=True).stdout)
        out = run_cli(admin, "volume", "rekey", "hr", "--full", "--json", check=True)
        report = json.loads(out.stdout)
        assert report["epoch"] == before["epoch"] + 1 and report["resealed"]["seq"] == 3
        assert report["resealed"]["files"] == len(files) + 1
        for rel, data in files.items():
            assert (mp / "hr" / rel).read_bytes() == data
        assert (mp / "hr" / ".snapshots" / "1" / "note.txt").read_bytes() == files["note.txt"]
    snap = decode_snapshot(
        (admin / "store" / "chunks").joinpath(*_shard(_head(admin))).read_bytes()
    )
    assert snap.epoch == report["epoch"]
    assert _grep(admin, MARKER) == []


def _head(home: Path) -> bytes:
    return bytes.fromhex(json.loads((home / "volumes" / "hr" / "volume.json").read_text())["head"])


def _shard(cid: bytes) -> tuple[str, str, str]:
    h = cid.hex()
    return h[:2], h[2:4], h


@pytest.mark.unit
def test_the_files_cache_of_a_private_volume_holds_no_names_and_still_skips_files(
    admin: Path, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    files = _tree(src)
    for p in src.rglob("*"):
        os.utime(p, (1_600_000_000, 1_600_000_000), follow_symlinks=False)
    run_cli(admin, "volume", "create", "hr", "--private", check=True)
    run_cli(admin, "import", str(src), "hr", check=True)
    again = json.loads(run_cli(admin, "import", str(src), "hr", "--json", check=True).stdout)
    assert again["reused_files"] == len(files) and again["new_chunks"] == 0
    assert _grep(admin, b"name-that-is-secret") == [] and _grep(admin, MARKER) == []
