"""Objects, codec and keys through their public APIs, including hostile bytes."""

from __future__ import annotations

import contextlib
import os
import random
import stat
from pathlib import Path

import pytest

from p2pfs.errors import DecodeError, NotFound, P2pfsError, SignatureError
from p2pfs.keys import SigningKey, verify
from p2pfs.objects.model import (
    FORMAT_VERSION,
    MAX_BLOB_REFS,
    MAX_SNAPSHOT_BYTES,
    MAX_TREE_BYTES,
    Blob,
    ChunkRef,
    Entry,
    Kind,
    Snapshot,
    Tree,
    codec,
    decode_blob,
    decode_snapshot,
    decode_tree,
    make_dev,
    object_id,
    validate_name,
)
from p2pfs.objects.origins import OriginRef

pytestmark = pytest.mark.unit

PARAMS: dict[str, int | str] = {
    "algorithm": "fastcdc-gear-v1",
    "min": 65536,
    "avg": 262144,
    "max": 1048576,
}


def cid(n: int) -> bytes:
    return object_id(n.to_bytes(8, "big"))


def sample_blob() -> Blob:
    return Blob(size=300, level=0, refs=(ChunkRef(cid(1), 100), ChunkRef(cid(2), 200)))


def sample_tree() -> Tree:
    return Tree(
        (
            Entry(b"a.txt", Kind.FILE, 0o644, 1_700_000_000_000_000_000, 300, cid(3), None),
            Entry(b"dir", Kind.DIR, 0o755, 5, 0, cid(4), None),
            Entry(b"link", Kind.SYMLINK, 0o777, -5, 7, None, b"../a.tx"),
        )
    )


@pytest.fixture(scope="module")
def key() -> SigningKey:
    return SigningKey.generate()


def sample_snapshot(key: SigningKey, seq: int = 2) -> Snapshot:
    return Snapshot.create(
        key,
        name="tools-1.0",
        seq=seq,
        parent=cid(5) if seq > 1 else None,
        root=cid(6),
        time_ns=123456789,
        params=PARAMS,
    )


# -- codec ------------------------------------------------------------------------


def test_pack_is_canonical_whatever_the_key_order() -> None:
    a = codec.pack({"b": 1, "a": [1, b"x", "y", None, True], "c": {"z": 0, "y": -1}})
    b = codec.pack({"c": {"y": -1, "z": 0}, "a": (1, b"x", "y", None, True), "b": 1})
    assert a == b
    assert codec.unpack(a, max_size=100, canonical=True) == {
        "a": [1, b"x", "y", None, True],
        "b": 1,
        "c": {"y": -1, "z": 0},
    }


@pytest.mark.parametrize("bad", [1.5, {1: 2}, {"a": 0.0}, object(), {"s": {1, 2}}, 1 << 64])
def test_pack_refuses_what_has_no_canonical_form(bad: object) -> None:
    with pytest.raises((TypeError, ValueError)):
        codec.pack(bad)


def test_msgpack_deep_nesting_is_a_decode_error() -> None:
    # msgpack's C unpacker stops at 1024 levels (StackError); we stop at MAX_DEPTH.
    for depth in (10_000, 1025, 1000, codec.MAX_DEPTH + 1):
        data = b"\x91" * depth + b"\xc0"
        with pytest.raises(DecodeError, match="deep"):
            codec.unpack(data, max_size=len(data))
    ok = b"\x91" * codec.MAX_DEPTH + b"\xc0"
    assert codec.unpack(ok, max_size=len(ok)) is not None


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"\x92\x01", "incomplete"),
        (b"\x01\x02", "trailing"),
        (b"\x81\x01\x02", "map key"),
        (b"\xa2\xff\xfe", "UTF-8"),
        (b"\xd4\x05\x00", "ext types"),
        (b"\xd6\xff\x00\x00\x00\x01", "ext types"),  # a msgpack Timestamp
        (b"\xdb\xff\xff\xff\xff", "malformed"),  # a 4 GiB string length
        (b"\xdd\xff\xff\xff\xff", "malformed"),  # a 4 Gi-item array
        (b"\xc1", "malformed"),
    ],
)
def test_unpack_garbage_is_a_decode_error(data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        codec.unpack(data, max_size=1000)


def test_unpack_bounds_size_and_refuses_non_canonical() -> None:
    with pytest.raises(DecodeError, match="limit"):
        codec.unpack(codec.pack(b"x" * 100), max_size=50)
    unsorted = b"\x82\xa1b\x01\xa1a\x02"
    assert codec.unpack(unsorted, max_size=100) == {"a": 2, "b": 1}
    for non_canonical in (
        unsorted,
        b"\x82\xa1a\x01\xa1a\x02",  # duplicate key
        b"\xcc\x01",  # 1 as uint8
        b"\xd9\x01a",  # "a" as str8
    ):
        with pytest.raises(DecodeError, match="canonical"):
            codec.unpack(non_canonical, max_size=100, canonical=True)
    with pytest.raises(DecodeError, match="float"):
        codec.unpack(b"\xcb\x3f\xf0\x00\x00\x00\x00\x00\x00", max_size=100)


# -- objects: round trips and canonical ids -----------------------------------------


def test_blob_round_trip_and_stable_id() -> None:
    blob = sample_blob()
    data = blob.encode()
    assert decode_blob(data) == blob
    assert Blob(300, 0, (ChunkRef(cid(1), 100), ChunkRef(cid(2), 200))).encode() == data
    assert object_id(data) == object_id(decode_blob(data).encode())
    empty = Blob(0, 0, ())
    assert decode_blob(empty.encode()) == empty


def test_tree_round_trip() -> None:
    tree = sample_tree()
    back = decode_tree(tree.encode())
    assert back == tree
    assert back.entries[2].kind is Kind.SYMLINK
    assert back.entries[2].target == b"../a.tx"
    assert decode_tree(Tree(()).encode()) == Tree(())


def test_large_tree_fits(tmp_path: Path) -> None:
    entries = tuple(
        Entry(b"f%08d" % i + b"x" * 40, Kind.FILE, 0o644, i, i, cid(i), None)
        for i in range(100_000)
    )
    data = Tree(entries).encode()
    assert len(data) < MAX_TREE_BYTES
    assert len(decode_tree(data).entries) == 100_000


def test_snapshot_round_trip_and_signature(key: SigningKey) -> None:
    snap = sample_snapshot(key)
    assert snap.volume_id == key.public_bytes()
    snap.verify()
    data = snap.encode()
    back = decode_snapshot(data)
    assert back == snap
    assert back.params == PARAMS
    first = sample_snapshot(key, seq=1)
    assert decode_snapshot(first.encode()).parent is None


def test_blob_and_tree_are_not_interchangeable() -> None:
    with pytest.raises(DecodeError, match="not a tree"):
        decode_tree(sample_blob().encode())
    with pytest.raises(DecodeError, match="not a blob"):
        decode_blob(sample_tree().encode())


# -- objects: rules -------------------------------------------------------------------


@pytest.mark.parametrize("name", [b"", b".", b"..", b"a/b", b"/", b"a\0b", b"x" * 256, "str"])
def test_bad_names_are_refused(name: bytes) -> None:
    with pytest.raises(DecodeError):
        validate_name(name)
    with pytest.raises(DecodeError):
        Entry(name, Kind.FILE, 0o644, 0, 0, cid(1), None)


def test_good_names() -> None:
    for name in (b"a", b"...", b".hidden", b"x" * 255, "é".encode(), b"\xff\xfe"):
        validate_name(name)


def _raw(obj: object) -> bytes:
    return codec.pack(obj)


def _tree_bytes(rows: list[list[object]]) -> bytes:
    return _raw({"v": FORMAT_VERSION, "t": "tree", "e": rows})


def _row(name: bytes = b"a", **kw: object) -> list[object]:
    d: dict[str, object] = {
        "name": name,
        "kind": 1,
        "mode": 0o644,
        "mtime": 0,
        "size": 1,
        "id": cid(1),
        "target": None,
    }
    d.update(kw)
    return list(d.values())


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([_row(b"b"), _row(b"a")], "unsorted"),
        ([_row(b"a"), _row(b"a")], "duplicate"),
        ([_row(b"..")], "not allowed"),
        ([_row(b"a/b")], "'/'"),
        ([_row(kind=8)], "out of range"),
        ([_row(kind=0)], "out of range"),
        # Fifos, sockets and devices: no id, no target, size 0; rdev for devices only.
        ([_row(kind=4)], "no object id"),
        ([_row(kind=4, id=None, size=1)], "size 0"),
        ([_row(kind=5, id=None, size=0, target=b"x")], "no target"),
        ([[*_row(kind=4, id=None, size=0), {"r": [1, 3]}]], "not a device"),
        ([[*_row(kind=6, id=None, size=0), {"r": [0, 0]}]], "leaving the field out"),
        ([[*_row(kind=6, id=None, size=0), {"r": [1]}]], "major, minor"),
        ([[*_row(kind=6, id=None, size=0), {"r": [1, 2**32]}]], "minor"),
        ([[*_row(kind=6, id=None, size=0), {"r": [-1, 1]}]], "major"),
        # The optional map: never empty, only known keys.
        ([[*_row(), {}]], "non-empty map"),
        ([[*_row(), [1]]], "non-empty map"),
        ([[*_row(), {"q": 1}]], "unknown optional"),
        ([[*_row(), {"o": [1, 2], "zz": 1}]], "unknown optional"),
        ([[*_row(), {"o": [1]}]], "uid, gid"),
        ([[*_row(), {"o": [1, -1]}]], "gid"),
        ([[*_row(), {"o": [2**32 - 1, 0]}]], "uid"),
        ([[*_row(), {"o": ["a", 0]}]], "integer"),
        # user.* xattrs only, within the limits, values bytes.
        ([[*_row(), {"x": {}}]], "non-empty map"),
        ([[*_row(), {"x": {b"trusted.a": b""}}]], "user"),
        ([[*_row(), {"x": {b"user.": b""}}]], "user"),
        ([[*_row(), {"x": {b"user.p2pfs.id": b""}}]], "own"),
        ([[*_row(), {"x": {"user.a": b""}}]], "bytes"),
        ([[*_row(), {"x": {b"user.a": 1}}]], "bytes"),
        ([[*_row(), {"x": {b"user." + b"a" * 251: b""}}]], "255"),
        ([[*_row(), {"x": {b"user.a": b"v" * 65537}}]], "65536"),
        ([[*_row(), {"x": {b"user.%d" % i: b"v" * 65536 for i in range(2)}}]], "more than"),
        ([[*_row(), {"o": [1, 2]}, None]], "more than 8"),
        ([_row(kind=True)], "integer"),
        ([_row(mode=0o10000)], "mode"),
        ([_row(size=-1)], "size"),
        ([_row(id=b"short")], "id"),
        ([_row(id=None)], "id"),
        ([_row(target=b"x")], "target"),
        ([_row(kind=3, id=None, target=b"")], "target"),
        ([_row(kind=3, id=None, target=b"a\0b", size=3)], "NUL"),
        ([_row(kind=3, id=None, target=b"x" * 4097, size=4097)], "target"),
        ([_row(kind=3, id=cid(1), target=b"x")], "object id"),
        ([_row(kind=3, id=None, target=b"abc", size=2)], "length"),
        ([_row()[:6]], "must be"),
        ([b"notalist"], "array"),
    ],
)
def test_tree_rules(rows: list[list[object]], message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_tree(_tree_bytes(rows))


def test_entries_without_optional_fields_encode_as_before() -> None:
    """Trees made before fifos, devices, xattrs and owners existed keep their bytes, so
    their ids: an entry is the same 7-array, and nothing is added when nothing is set."""
    rows = [
        [b"a", 1, 0o644, 5, 1, cid(1), None],
        [b"d", 2, 0o755, -3, 0, cid(2), None],
        [b"l", 3, 0o777, 0, 1, None, b"a"],
    ]
    old = _tree_bytes(rows)
    tree = decode_tree(old)
    assert tree.encode() == old
    assert object_id(tree.encode()) == object_id(old)
    assert all(e.rdev == 0 and e.xattrs == () and e.owner is None for e in tree.entries)


def test_special_kinds_xattrs_and_owners_round_trip() -> None:
    entries = (
        Entry(b"b", Kind.BLK, 0o660, 1, 0, None, None, rdev=make_dev(8, 17)),
        Entry(b"c", Kind.CHR, 0o620, 2, 0, None, None, rdev=make_dev(4095, 2**20)),
        Entry(
            b"f",
            Kind.FILE,
            0o644,
            3,
            1,
            cid(1),
            None,
            xattrs=((b"user.a", b""), (b"user.b", b"\0")),
        ),
        Entry(b"p", Kind.FIFO, 0o600, 4, 0, None, None, owner=(1000, 100)),
        Entry(b"s", Kind.SOCKET, 0o755, 5, 0, None, None, owner=(0, 0)),
        Entry(b"z", Kind.CHR, 0o600, 6, 0, None, None),  # a device 0:0 carries no rdev
    )
    data = Tree(entries).encode()
    back = decode_tree(data)
    assert back.entries == entries
    assert back.encode() == data
    assert back.entries[1].rdev == os.makedev(4095, 2**20)
    raw = codec.unpack(data, max_size=len(data))
    assert isinstance(raw, dict)
    rows = raw["e"]
    assert rows[0][7] == {"r": [8, 17]}
    assert rows[2][7] == {"x": {b"user.a": b"", b"user.b": b"\0"}}
    assert rows[3][7] == {"o": [1000, 100]}
    assert len(rows[5]) == 7


def test_entry_fields_are_checked_on_construction() -> None:
    with pytest.raises(DecodeError, match="sorted"):
        Entry(b"f", Kind.FILE, 0, 0, 1, cid(1), None, xattrs=((b"user.b", b""), (b"user.a", b"")))
    with pytest.raises(DecodeError, match="pairs"):
        Entry(b"f", Kind.FILE, 0, 0, 1, cid(1), None, xattrs=((b"user.b",),))  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match="rdev"):
        Entry(b"c", Kind.CHR, 0, 0, 0, None, None, rdev=1 << 64)


def _blob_bytes(**kw: object) -> bytes:
    d: dict[str, object] = {"v": 1, "t": "blob", "s": 10, "l": 0, "r": [[cid(1), 10]]}
    d.update(kw)
    return _raw(d)


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"s": 11}, "cover"),
        ({"v": 2}, "version"),
        ({"v": True}, "version"),
        ({"t": "tree"}, "not a blob"),
        ({"x": 1}, "unknown"),
        ({"s": -1}, "size"),
        ({"l": 99}, "level"),
        ({"r": [[cid(1), 0]], "s": 0}, "length"),
        ({"r": [[cid(1)]]}, "id, length"),
        ({"r": [[b"x" * 31, 10]]}, "id"),
        ({"r": "x"}, "array"),
        ({"l": 1, "r": [], "s": 0}, "no refs"),
        ({"r": [[cid(1), 1]] * (MAX_BLOB_REFS + 1), "s": MAX_BLOB_REFS + 1}, "more than"),
    ],
)
def test_blob_rules(kw: dict[str, object], message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        decode_blob(_blob_bytes(**kw))


def test_non_canonical_object_is_refused() -> None:
    good = sample_blob().encode()
    assert good[0] == 0x85  # a fixmap of 5
    # The same map with its keys in another order decodes to an equal dict.
    obj = {"v": 1, "t": "blob", "s": 300, "l": 0, "r": [[cid(1), 100], [cid(2), 200]]}
    import msgpack  # the test may build non-canonical bytes directly

    reordered = msgpack.packb(dict(reversed(list(obj.items()))), use_bin_type=True)
    assert reordered != good
    with pytest.raises(DecodeError, match="canonical"):
        decode_blob(reordered)


def test_snapshot_rules(key: SigningKey) -> None:
    for kw, message in [
        ({"name": ".hidden"}, "volume name"),
        ({"name": ""}, "volume name"),
        ({"name": "a" * 65}, "volume name"),
        ({"name": "a/b"}, "volume name"),
        ({"seq": 0}, "seq"),
        ({"seq": 1}, "parent"),  # seq 1 with a parent
        ({"params": {"algorithm": "x", "min": 1, "avg": 2}}, "keys"),
        ({"params": {**PARAMS, "min": 2**20, "max": 2**19}}, "min <= avg"),
        ({"params": {**PARAMS, "avg": "big"}}, "integer"),
        ({"root": b"r"}, "root"),
    ]:
        args: dict[str, object] = {
            "name": "vol",
            "seq": 2,
            "parent": cid(1),
            "root": cid(2),
            "time_ns": 1,
            "params": PARAMS,
        }
        args.update(kw)
        with pytest.raises(DecodeError, match=message):
            Snapshot.create(key, **args)  # type: ignore[arg-type]
    with pytest.raises(DecodeError, match="parent"):
        Snapshot.create(key, name="v", seq=3, parent=None, root=cid(2), time_ns=1, params=PARAMS)


def _resign(fields: dict[str, object], key: SigningKey) -> bytes:
    from p2pfs.objects.model import SNAPSHOT_DOMAIN

    body = {k: v for k, v in fields.items() if k != "sig"}
    return _raw({**body, "sig": key.sign(SNAPSHOT_DOMAIN + _raw(body))})


def test_tampered_snapshot_is_a_signature_error(key: SigningKey) -> None:
    snap = sample_snapshot(key)
    fields = codec.unpack(snap.encode(), max_size=4096)
    assert isinstance(fields, dict)
    # A changed field under the original signature.
    with pytest.raises(SignatureError):
        decode_snapshot(_raw({**fields, "seq": 99}))
    # A flipped signature bit.
    sig = bytearray(fields["sig"])
    sig[0] ^= 1
    with pytest.raises(SignatureError):
        decode_snapshot(_raw({**fields, "sig": bytes(sig)}))
    # Signed by another key but claiming this volume.
    other = SigningKey.generate()
    with pytest.raises(SignatureError):
        decode_snapshot(_resign({**fields, "seq": 99}, other))
    # Re-signed by the right key: accepted (so the checks above test the signature).
    assert decode_snapshot(_resign({**fields, "seq": 99}, key)).seq == 99
    # A signature without the domain prefix is refused.
    body = {k: v for k, v in fields.items() if k != "sig"}
    with pytest.raises(SignatureError):
        decode_snapshot(_raw({**body, "sig": key.sign(_raw(body))}))


def test_snapshot_unknown_version_is_refused(key: SigningKey) -> None:
    fields = codec.unpack(sample_snapshot(key).encode(), max_size=4096)
    assert isinstance(fields, dict)
    with pytest.raises(DecodeError, match="version"):
        decode_snapshot(_resign({**fields, "v": 2}, key))


def test_oversized_objects_are_refused(key: SigningKey) -> None:
    with pytest.raises(DecodeError, match="limit"):
        decode_snapshot(b"\x80" * (MAX_SNAPSHOT_BYTES + 1))
    with pytest.raises(DecodeError, match="limit"):
        decode_blob(_blob_bytes(pad=b"x" * 300_000))


# -- fuzz: hostile bytes give a DecodeError or a valid object, nothing else ----------------


def _decode_any(data: bytes) -> object:
    """The object ``data`` decodes to, or None; any exception but ours fails the test."""
    found = None
    for decode in (decode_blob, decode_tree, decode_snapshot):
        try:
            obj = decode(data)
        except (DecodeError, SignatureError):
            continue
        assert found is None
        assert obj.encode() == data  # only the canonical encoding decodes
        found = obj
    return found


def test_fuzz_random_bytes_and_mutations(key: SigningKey) -> None:
    rng = random.Random(1234)
    valid = [sample_blob().encode(), sample_tree().encode(), sample_snapshot(key).encode()]
    tried = 0
    accepted: dict[type, int] = {}
    for _ in range(3000):
        data = bytes(rng.getrandbits(8) for _ in range(rng.randrange(0, 80)))
        with contextlib.suppress(DecodeError):
            codec.unpack(data, max_size=100, canonical=rng.random() < 0.5)
        tried += 1
        obj = _decode_any(data)
        accepted[type(obj)] = accepted.get(type(obj), 0) + 1
    for _ in range(6000):
        original = rng.choice(valid)
        data = bytearray(original)
        op = rng.randrange(4)
        if op == 0:
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        elif op == 1:
            data[rng.randrange(len(data))] = rng.getrandbits(8)
        elif op == 2:
            del data[rng.randrange(len(data)) :]
        else:
            i = rng.randrange(len(data))
            data[i:i] = bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 4)))
        tried += 1
        obj = _decode_any(bytes(data))
        if bytes(data) != original:
            accepted[type(obj)] = accepted.get(type(obj), 0) + 1
    assert tried == 9000
    # Whatever decoded was a valid, canonical object (checked in _decode_any). Changed ids
    # and sizes can still make valid blobs and trees, but no changed snapshot verifies.
    assert Snapshot not in accepted
    assert accepted[type(None)] > 7000


# -- keys --------------------------------------------------------------------------------


def test_key_save_load_sign_verify(tmp_path: Path) -> None:
    k = SigningKey.generate()
    path = tmp_path / "key.pem"
    k.save(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["key.pem"]  # no temp file left
    loaded = SigningKey.load(path)
    assert loaded.public_bytes() == k.public_bytes()
    assert len(k.public_bytes()) == 32
    sig = loaded.sign(b"hello")
    verify(k.public_bytes(), sig, b"hello")
    with pytest.raises(SignatureError):
        verify(k.public_bytes(), sig, b"hellO")
    with pytest.raises(SignatureError):
        verify(SigningKey.generate().public_bytes(), sig, b"hello")
    with pytest.raises(SignatureError):
        verify(b"short", sig, b"hello")
    with pytest.raises(SignatureError):
        verify(k.public_bytes(), sig[:10], b"hello")
    with pytest.raises(P2pfsError, match="exists"):
        SigningKey.generate().save(path)
    assert SigningKey.load(path).public_bytes() == k.public_bytes()


def test_key_load_errors(tmp_path: Path) -> None:
    with pytest.raises(NotFound, match="does not exist"):
        SigningKey.load(tmp_path / "nope")
    bad = tmp_path / "bad"
    bad.write_bytes(b"garbage\n")
    with pytest.raises(P2pfsError, match="not a valid"):
        SigningKey.load(bad)
    with pytest.raises(P2pfsError, match="directory"):
        SigningKey.load(tmp_path)
    huge = tmp_path / "huge"
    huge.write_bytes(b"x" * 100_000)
    with pytest.raises(P2pfsError, match="too large"):
        SigningKey.load(huge)


# -- origins in snapshots ------------------------------------------------------------


def _with_origins(key: SigningKey, *refs: OriginRef) -> Snapshot:
    s = sample_snapshot(key)
    return Snapshot.create(
        key,
        name=s.name,
        seq=s.seq,
        parent=s.parent,
        root=s.root,
        time_ns=s.time_ns,
        params=dict(s.params),
        origins=refs,
    )


def test_snapshot_origins_round_trip_and_are_signed(key: SigningKey) -> None:
    refs = (
        OriginRef("s3://bucket-1/p2pfs/tools", "http://10.213.9.2:9000", "us-east-1"),
        OriginRef("https://mirror.example.org/p2pfs/tools/"),
    )
    snap = _with_origins(key, *refs)
    assert decode_snapshot(snap.encode()).origins == refs
    # A snapshot without origins encodes as the first releases did: same bytes, same id.
    assert b"orig" not in sample_snapshot(key).encode()
    # The list is under the signature: a peer cannot add its own origin.
    fields = codec.unpack(snap.encode(), max_size=MAX_SNAPSHOT_BYTES)
    assert isinstance(fields, dict)
    forged = {**fields, "orig": [{"u": "https://evil.example/"}]}
    with pytest.raises(SignatureError):
        decode_snapshot(_raw(forged))


@pytest.mark.parametrize(
    "entry",
    [
        {"u": "ftp://host/x/"},
        {"u": "s3://UPPER/x"},
        {"u": "s3://b"},
        {"u": "http://host/a b/"},
        {"u": "http://user:pw@host/"},
        {"u": "https://host/", "e": "https://s3.example/"},
        {"u": "s3://bucket/x", "e": "file:///etc"},
        {"u": "s3://bucket/x", "r": "Not A Region"},
        {"u": "s3://bucket/x", "z": 1},
        {"u": 7},
        {"u": "s3://bucket/" + "x" * 600},
    ],
)
def test_bad_origin_entries_are_refused(key: SigningKey, entry: dict[str, object]) -> None:
    fields = codec.unpack(sample_snapshot(key).encode(), max_size=MAX_SNAPSHOT_BYTES)
    assert isinstance(fields, dict)
    with pytest.raises(DecodeError):
        decode_snapshot(_resign({**fields, "orig": [entry]}, key))


def test_origin_lists_are_bounded(key: SigningKey) -> None:
    fields = codec.unpack(sample_snapshot(key).encode(), max_size=MAX_SNAPSHOT_BYTES)
    assert isinstance(fields, dict)
    many = [{"u": f"s3://bucket/p{i}"} for i in range(9)]
    for bad in (many, [], [{"u": "s3://bucket/a"}] * 2, "s3://bucket/a"):
        with pytest.raises(DecodeError):
            decode_snapshot(_resign({**fields, "orig": bad}, key))
