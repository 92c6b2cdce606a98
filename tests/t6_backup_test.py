"""The estate backup and its restore (disaster recovery), through the real command line:
a new admin machine takes over the CA, the volume keys and the private volumes'
secrets from a passphrase-sealed file, and continues every volume's sequence."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from harness import run_cli

from p2pfs.errors import IntegrityError, P2pfsError
from p2pfs.home import Home
from p2pfs.keys import SigningKey
from p2pfs.objects.model import decode_snapshot
from p2pfs.seal import SECRET_SIZE
from p2pfs.store.cas import Store
from p2pfs.trust import backup
from p2pfs.trust.certs import node_id_from_cert, parse_cert
from p2pfs.trust.estate import Estate, node_key
from p2pfs.volume.registry import VolumeRegistry

pytestmark = pytest.mark.unit

PASSPHRASE = b"correct horse battery staple"


@dataclass(frozen=True)
class Made:
    """An admin home with a public and a private volume, and its backup."""

    admin: Path
    backup: Path
    passphrase: Path
    estate_id: str
    volumes: dict[str, dict[str, object]]  # name -> volume list --json row


def _ok(home: Path, *args: str) -> str:
    return run_cli(home, *args, check=True).stdout


def _volumes(home: Path) -> dict[str, dict[str, object]]:
    return {v["name"]: v for v in json.loads(_ok(home, "volume", "list", "--json"))}


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    root = tmp_path_factory.mktemp("estate")
    admin = root / "admin"
    tree = root / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_bytes(b"hello\n")
    (tree / "sub" / "b.bin").write_bytes(os.urandom(70_000))
    _ok(admin, "init")
    estate_id = _ok(admin, "estate", "init").strip()
    _ok(admin, "volume", "create", "tools")
    _ok(admin, "volume", "create", "hr", "--private")
    for name in ("tools", "hr"):
        _ok(admin, "import", str(tree), name)
    _ok(admin, "import", str(tree), "tools")  # tools at seq 2, hr at seq 1
    passphrase = root / "pass"
    passphrase.write_bytes(PASSPHRASE + b"\n")
    out = root / "estate.backup"
    said = _ok(admin, "estate", "backup", "--out", str(out), "--passphrase-file", str(passphrase))
    assert f"estate {estate_id}: CA, 2 volumes (hr, tools)" in said
    assert "access list 1" in said and "revocation list 1" in said
    return Made(admin, out, passphrase, estate_id, _volumes(admin))


def _files(home: Path) -> dict[str, bytes]:
    """Every file of a home, by path: to show that a refused restore changed nothing."""
    return {
        str(p.relative_to(home)): p.read_bytes()
        for p in sorted(home.rglob("*"))
        if p.is_file() and p.parent.name != "log"
    }


def _fresh(tmp_path: Path, name: str = "new") -> Path:
    home = tmp_path / name
    _ok(home, "init")
    return home


def _restore(home: Path, made: Made, file: Path | None = None) -> subprocess.CompletedProcess[str]:
    return run_cli(
        home,
        "estate",
        "restore",
        str(file or made.backup),
        "--passphrase-file",
        str(made.passphrase),
    )


def _join(admin: Path, home: Path, tmp_path: Path) -> str:
    req, bundle = tmp_path / f"{home.name}.req", tmp_path / f"{home.name}.bundle"
    _ok(home, "init")
    _ok(home, "request-join", "--out", str(req))
    node = _ok(admin, "estate", "approve", str(req), "--out", str(bundle)).strip()
    _ok(home, "join", str(bundle))
    return node


# -- the restore -----------------------------------------------------------------------


def test_a_restored_home_is_the_admin_and_publisher_and_continues_every_sequence(
    made: Made, tmp_path: Path
) -> None:
    new = _fresh(tmp_path)
    proc = _restore(new, made)
    assert proc.returncode == 0, proc.stderr
    me = Home(new).node_id().hex()
    assert f"restored estate {made.estate_id}: this node {me} is its admin" in proc.stdout
    assert "volume hr: this node publishes it, seq 1, private" in proc.stdout
    assert "volume tools: this node publishes it, seq 2" in proc.stdout
    assert "p2pfs volume restore NAME --from URL" in proc.stdout

    # The same CA, and this node its admin and a member with a certificate of it.
    shown = json.loads(_ok(new, "estate", "show", "--json"))
    assert shown["estate_id"] == made.estate_id and shown["is_admin"] is True
    assert shown["node_id"] == me and shown["revocation_number"] == 1
    ca = made.admin / "estate" / "ca.pem"
    assert (new / "estate" / "ca.pem").read_bytes() == ca.read_bytes()
    assert (new / "estate" / "ca.key").stat().st_mode & 0o777 == 0o600
    old_cert = (made.admin / "estate" / "node.pem").read_bytes()
    assert (new / "estate" / "node.pem").read_bytes() != old_cert
    nodes = json.loads((new / "estate" / "nodes.json").read_text())
    assert nodes[me] == node_key(Home(new)).public_bytes().hex()
    assert Home(made.admin).node_id().hex() in nodes  # the old admin's record kept

    # The CA key works: a third machine is approved by the new admin, and its
    # certificate verifies against the estate's one CA.
    third = tmp_path / "third"
    node = _join(new, third, tmp_path)
    ca_cert = parse_cert(ca.read_bytes(), "ca", pem=True)
    cert = parse_cert((third / "estate" / "node.pem").read_bytes(), "node", pem=True)
    assert node_id_from_cert(cert, ca_cert, "the third node").hex() == node
    member = Estate.load(Home(third))
    assert member is not None and member.estate_id.hex() == made.estate_id

    # The same volumes, keys and sequence numbers; this node their publisher.
    restored = _volumes(new)
    for name in ("tools", "hr"):
        assert restored[name]["id"] == made.volumes[name]["id"]
        assert restored[name]["seq"] == made.volumes[name]["seq"]
        assert restored[name]["head"] == made.volumes[name]["head"]
    registry = VolumeRegistry(Home(new))
    for name in ("tools", "hr"):
        key = registry.publisher_key(name)  # checks the key against the volume id
        assert key.public_bytes().hex() == made.volumes[name]["id"]
        record = registry.get(name)
        assert record.origin is None and record.endorsement is not None
        member.verify_endorsement(record.id, name, record.endorsement)

    # The next import continues each sequence, and a follower accepts it.
    tree = tmp_path / "tree2"
    tree.mkdir()
    (tree / "c.txt").write_bytes(b"after the restore\n")
    follower = VolumeRegistry(Home(third))
    old_store, new_store = Store(made.admin / "store"), Store(new / "store")
    try:
        for name, seq in (("tools", 3), ("hr", 2)):
            said = _ok(new, "import", str(tree), name)
            assert f"(volume {name}, seq {seq})" in said
            record = registry.get(name)
            assert record.head is not None
            head = decode_snapshot(new_store.get_object(record.head))
            assert head.volume_id.hex() == made.volumes[name]["id"] and head.seq == seq
            assert head.parent is not None and head.parent.hex() == made.volumes[name]["head"]
            head.verify()
            last = bytes.fromhex(str(made.volumes[name]["head"]))
            before = decode_snapshot(old_store.get_object(last))
            assert record.endorsement is not None
            follower.follow(before, last, record.endorsement, None)
            follower.follow(head, record.head, record.endorsement, None)
            assert follower.get(name).seq == seq
    finally:
        old_store.close()
        new_store.close()

    # The private volume's secret is usable: the new admin opens the old head and its
    # own, and grants a reader, who opens its box with its own key.
    estate = Estate.load(Home(new))
    assert estate is not None
    vid = bytes.fromhex(str(made.volumes["hr"]["id"]))
    va = estate.access.of(vid)
    assert va is not None and va.may_read(bytes.fromhex(me)) and estate.access.number == 2
    assert estate.access.secret(vid, 1, node_key(Home(new)), bytes.fromhex(me))
    _ok(new, "volume", "grant", "hr", node)
    _ok(new, "volume", "rekey", "hr")
    estate = Estate.load(Home(new))
    assert estate is not None
    secret = estate.access.secret(vid, 2, node_key(Home(third)), bytes.fromhex(node))
    assert len(secret) == SECRET_SIZE


def test_the_backup_file_is_sealed_and_only_the_admin_makes_one(made: Made, tmp_path: Path) -> None:
    data = made.backup.read_bytes()
    assert data.startswith(b"P2PFS-BACKUP") and made.backup.stat().st_mode & 0o777 == 0o600
    keys = [made.admin / "estate" / "ca.key"]
    keys += [made.admin / "volumes" / n / "publisher.key" for n in ("tools", "hr")]
    for path in keys:
        key = SigningKey.load(path)
        raw = key.private_key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        assert raw not in data and path.read_bytes() not in data
        assert key.public_bytes() not in data  # not even which volumes it holds
    estate = Estate.load(Home(made.admin))
    assert estate is not None
    vid = bytes.fromhex(str(made.volumes["hr"]["id"]))
    secret = estate.access.secret(vid, 1, node_key(Home(made.admin)), estate.node_id)
    assert secret not in data and b"grants" not in data
    assert (made.admin / "estate" / "revocations").read_bytes() not in data

    # An existing file is kept unless --force; a second backup is sealed afresh.
    args = ["estate", "backup", "--out", str(made.backup), "--passphrase-file"]
    proc = run_cli(made.admin, *args, str(made.passphrase))
    assert proc.returncode == 1 and "--force" in proc.stderr
    assert made.backup.read_bytes() == data
    again = tmp_path / "again.backup"
    _ok(
        made.admin,
        "estate",
        "backup",
        "--out",
        str(again),
        "--passphrase-file",
        str(made.passphrase),
    )
    assert again.read_bytes()[:12] == data[:12] and again.read_bytes()[17:45] != data[17:45]

    # Only the node holding the CA key: a fresh node and a member are refused.
    member = tmp_path / "member"
    _join(made.admin, member, tmp_path)
    for home in (_fresh(tmp_path), member):
        proc = run_cli(home, "estate", "backup", "--out", str(tmp_path / "x"))
        assert proc.returncode == 3 and "this node holds no estate CA" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "x").exists()
    empty = tmp_path / "empty"
    empty.write_bytes(b"\n")
    proc = run_cli(
        made.admin,
        "estate",
        "backup",
        "--out",
        str(tmp_path / "x"),
        "--passphrase-file",
        str(empty),
    )
    assert proc.returncode == 2 and "empty line" in proc.stderr
    assert not (tmp_path / "x").exists()


def test_no_terminal_and_no_passphrase_file_is_a_clear_error(made: Made, tmp_path: Path) -> None:
    new = _fresh(tmp_path)
    for home, args in (
        (made.admin, ["estate", "backup", "--out", str(tmp_path / "x")]),
        (new, ["estate", "restore", str(made.backup)]),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "p2pfs", "--home", str(home), *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            timeout=120,
        )
        assert proc.returncode == 2 and "--passphrase-file" in proc.stderr, proc.stderr
    assert not (tmp_path / "x").exists() and not (new / "estate").exists()


# -- refusals ----------------------------------------------------------------------------


def _refused(proc: subprocess.CompletedProcess[str], text: str) -> None:
    assert proc.returncode != 0, proc.stdout
    assert text in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_wrong_passphrase_or_a_damaged_file_writes_nothing(made: Made, tmp_path: Path) -> None:
    new = _fresh(tmp_path)
    before = _files(new)
    wrong = tmp_path / "wrong"
    wrong.write_bytes(b"correct horse battery stapler\n")
    proc = run_cli(new, "estate", "restore", str(made.backup), "--passphrase-file", str(wrong))
    _refused(proc, "wrong passphrase or damaged backup")
    assert proc.returncode == 4
    data = made.backup.read_bytes()
    # A header field, the ciphertext, a cut (every other byte: the next test, in process).
    file = tmp_path / "damaged"
    for damaged, text in [
        (data[:15] + bytes([data[15] ^ 0x10]) + data[16:], "damaged"),
        (data[:-1] + bytes([data[-1] ^ 0x10]), "wrong passphrase or damaged backup"),
        (data[:30], "too short"),
    ]:
        file.write_bytes(damaged)
        _refused(_restore(new, made, file), text)
    assert _files(new) == before and not (new / "estate").exists()


def test_every_flipped_bit_is_refused(made: Made) -> None:
    """Every byte of the file, one bit flipped: refused, in process (one scrypt: a
    flipped salt derives another key, which the real KDF would too)."""
    data = made.backup.read_bytes()
    right = backup.read_header(data)
    key = backup.derive_key(PASSPHRASE, right)

    def derive(passphrase: bytes, header: backup.Header) -> bytes:
        same = passphrase == PASSPHRASE and header.salt == right.salt
        return key if same else hashlib.sha256(header.salt + passphrase).digest()

    assert backup.open_backup(data, PASSPHRASE, derive=derive).estate_id.hex() == made.estate_id
    for i in range(len(data)):
        for bit in (0, 7):
            damaged = bytearray(data)
            damaged[i] ^= 1 << bit
            # The header's fields name what is wrong; from the salt on, the AEAD refuses.
            text = "damaged" if i < 17 else backup.WRONG
            with pytest.raises(P2pfsError, match=text):
                backup.open_backup(bytes(damaged), PASSPHRASE, derive=derive)
    with pytest.raises(IntegrityError, match="wrong passphrase"):
        backup.open_backup(data, PASSPHRASE + b"!", derive=derive)


def test_a_home_in_an_estate_or_a_clashing_volume_is_refused_unchanged(
    made: Made, tmp_path: Path
) -> None:
    before = _files(made.admin)
    _refused(_restore(made.admin, made), "already belongs to estate " + made.estate_id)
    assert _files(made.admin) == before
    member = tmp_path / "member"
    _join(made.admin, member, tmp_path)
    before = _files(member)
    _refused(_restore(member, made), "already belongs to estate")
    assert _files(member) == before
    # A home holding another volume under a backed-up name.
    other = _fresh(tmp_path, "other")
    _ok(other, "volume", "create", "tools")
    before = _files(other)
    _refused(_restore(other, made), "another volume named 'tools'")
    assert _files(other) == before and not (other / "estate").exists()


# -- the contents ------------------------------------------------------------------------


def test_contents_that_do_not_agree_are_refused(made: Made) -> None:
    data = made.backup.read_bytes()
    b = backup.open_backup(data, PASSPHRASE)
    again = backup.decode_contents(backup.encode_contents(b))
    assert [v.name for v in again.volumes] == ["hr", "tools"] and again.secrets == b.secrets
    tools, hr = {v.name: v for v in b.volumes}["tools"], {v.name: v for v in b.volumes}["hr"]
    from dataclasses import replace

    for bad, text in [
        (replace(b, volumes=(hr, replace(tools, key=hr.key))), "not its id"),
        (replace(b, volumes=(replace(hr, head=tools.head), tools)), "another volume"),
        (replace(b, secrets={}), "lacks the secrets"),
        (replace(b, ca_key=SigningKey.generate()), "do not agree"),
        (replace(b, volumes=(replace(hr, endorsement=bytes(64)), tools)), "not endorsed"),
    ]:
        with pytest.raises(P2pfsError, match=text):
            backup.decode_contents(backup.encode_contents(bad))
    wrong_secret = {k: {e: bytes(SECRET_SIZE) for e in v} for k, v in b.secrets.items()}
    with pytest.raises(IntegrityError):
        backup.decode_contents(backup.encode_contents(replace(b, secrets=wrong_secret)))
