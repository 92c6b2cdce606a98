"""Fuzz targets: every decoder of hostile bytes, one function each, and valid seeds.

Shared by ``t0_fuzz_test.py`` (Hypothesis, a short run in ``make test``) and the
coverage-guided long run (``python tests/fuzz_targets.py TARGET [atheris flags]``,
when atheris is installed). A target takes bytes and returns whether the decoder
accepted them; a ``P2pfsError`` is a clean refusal (returned as False); any other
exception escapes, and that is the bug the fuzzing looks for. ``EXECUTIONS``
counts every call, per target, so a run can say how much it tried.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfs import config
from p2pfs.appliance import link_client, seed
from p2pfs.chunking.params import ChunkParams
from p2pfs.errors import P2pfsError
from p2pfs.home import Home, node_id_of
from p2pfs.ids import VolumeId
from p2pfs.keys import SigningKey
from p2pfs.net import link, messages, wire
from p2pfs.node import desktop_api, http
from p2pfs.node.summary import NodeSummary, VolumeSummary
from p2pfs.objects import codec, id_list, model
from p2pfs.objects.origins import OriginRef
from p2pfs.seal import seal_root
from p2pfs.trust import access, backup, certs, desktop, enrolment, estate, revocation

EXECUTIONS: Counter[str] = Counter()
ACCEPTED: Counter[str] = Counter()


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], object]  # raises P2pfsError to refuse
    seeds: list[bytes] = field(default_factory=list)


def check(target: Target, data: bytes) -> bool:
    """Run one input: True if accepted, False if refused with a P2pfsError."""
    EXECUTIONS[target.name] += 1
    try:
        target.run(data)
    except P2pfsError:
        return False
    ACCEPTED[target.name] += 1
    return True


# -- fixed material: keys, ids, a scratch directory for the file-based decoders ----

# Fresh keys per process: the seeds need only be valid, not reproducible byte for byte.
VOLUME_KEY = SigningKey.generate()
CA_KEY = SigningKey.generate()
NODE_KEY = SigningKey.generate()
CA_PUBLIC = CA_KEY.public_bytes()
ESTATE_ID = certs.estate_id_of(CA_PUBLIC)
ID = bytes(range(32))
ID2 = bytes(range(1, 33))
NODE = bytes(range(16))
NODE2 = bytes(range(2, 18))
PARAMS: dict[str, int | str] = {"algorithm": "fastcdc", "min": 4096, "avg": 16384, "max": 65536}

SCRATCH = Path(tempfile.mkdtemp(prefix="p2pfs-fuzz-"))


def _write(name: str, data: bytes) -> Path:
    path = SCRATCH / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    path.chmod(0o600)  # a token file readable by others only warns, but keep logs quiet
    return path


# -- frames and messages ------------------------------------------------------------


def _frames(data: bytes) -> None:
    # Fed in two pieces too: a decoder must not depend on how the bytes arrive.
    wire.Decoder().feed(data)
    cut = len(data) // 3
    d = wire.Decoder()
    d.feed(data[:cut])
    d.feed(data[cut:])


def _desktop_frames(data: bytes) -> None:
    wire.Decoder(0).feed(data)  # the desktop link's decoder: headers only


def _each(*calls: Callable[[], object]) -> None:
    """Call each, a P2pfsError refusing only that one (the others still run)."""
    for call in calls:
        with contextlib.suppress(P2pfsError):
            call()


def _all_parsers(h: dict[str, Any], payload: bytes) -> None:
    """Every parser of a received header, each given the same header (as a hostile peer
    may send any fields under any type)."""
    parsers: list[Callable[[], object]] = [
        lambda: messages.Hello.from_wire(h),
        lambda: messages.parse_announce(h),
        lambda: messages.parse_get(h),
        lambda: messages.get_wants_fetch(h),
        lambda: messages.parse_have(h),
        lambda: messages.parse_snapshot(h),
        lambda: messages.parse_digest(h, payload),
        lambda: messages.parse_revoked(h),
        lambda: messages.parse_access_notice(h),
        lambda: messages.answer_error(h),
        lambda: messages.request_id(h),
        lambda: messages.VolumeHead.from_wire(h.get("vol"), "fuzz"),
    ]
    _each(*parsers)


def _messages(data: bytes) -> None:
    # The header as wire.Decoder decodes it, then every parser on it.
    header = codec.unpack(data, max_size=wire.MAX_HEADER, max_depth=4)
    if not isinstance(header, dict):
        raise wire.ProtocolError("not a map")
    _all_parsers(header, data)


def _frame_then_messages(data: bytes) -> None:
    for header, payload in wire.Decoder().feed(data):
        _all_parsers(header, payload)


VOLUME_HEAD = messages.VolumeHead("tools", ID, 3, ID2, b"e" * 64, NODE)
HEADERS: list[dict[str, Any]] = [
    messages.Hello(NODE, NODE2, 1, (VOLUME_HEAD,), 4, 2).to_wire(),
    messages.announce(VOLUME_HEAD),
    {**messages.get(ID, fetch=True), "id": 7},
    {**messages.have([ID, ID2]), "id": 8},
    {**messages.snapshot(ID), "id": 9},
    messages.digest_notice(3, 7, 100),
    messages.revoked_notice(5),
    messages.access_notice(6),
    messages.answer(7, error="missing"),
    messages.answer(8, bits=b"\x01"),
]
FRAMES = [wire.encode(h, b"\x00" * 64 if h["t"] == "digest" else b"") for h in HEADERS]


# -- objects ------------------------------------------------------------------------

BLOB = model.Blob(10, 0, (model.ChunkRef(ID, 4), model.ChunkRef(ID2 + ID, 6)))
TREE = model.Tree(
    (
        model.Entry(b"a", model.Kind.FILE, 0o644, -5, 10, ID, None),
        model.Entry(b"b", model.Kind.DIR, 0o755, 0, 0, ID2, None),
        model.Entry(b"c", model.Kind.SYMLINK, 0o777, 2**62, 3, None, b"a/b"),
    )
)
# Every kind and every optional field: devices, fifos, sockets, xattrs, owners.
SPECIAL_TREE = model.Tree(
    (
        model.Entry(b"blk", model.Kind.BLK, 0o660, 1, 0, None, None, rdev=model.make_dev(8, 1)),
        model.Entry(
            b"chr", model.Kind.CHR, 0o666, 2, 0, None, None, rdev=model.make_dev(1, 3), owner=(0, 5)
        ),
        model.Entry(b"f", model.Kind.FILE, 0o644, 3, 10, ID, None, xattrs=((b"user.k", b"v"),)),
        model.Entry(b"fifo", model.Kind.FIFO, 0o600, 4, 0, None, None, owner=(1000, 1000)),
        model.Entry(b"sock", model.Kind.SOCKET, 0o755, 5, 0, None, None),
    )
)
SNAPSHOT = model.Snapshot.create(
    VOLUME_KEY, name="tools", seq=2, parent=ID, root=ID2, time_ns=123, params=PARAMS
)
PRIVATE_SNAPSHOT = model.Snapshot.create(
    VOLUME_KEY,
    name="secret",
    seq=1,
    parent=None,
    root=ID2,
    time_ns=5,
    params=PARAMS,
    epoch=2,
    root_key=b"k" * 48,
    ids=ID,
)
ORIGIN_SNAPSHOT = model.Snapshot.create(
    VOLUME_KEY,
    name="tools",
    seq=3,
    parent=ID,
    root=ID2,
    time_ns=124,
    params=PARAMS,
    origins=(
        OriginRef("s3://bucket-1/tools", "http://10.213.9.2:9000", "us-east-1"),
        OriginRef("https://mirror.example.org/p2pfs/tools/"),
    ),
)
ID_LIST = id_list.IdList((ID, ID2), (5, 0), ID)


def _unpack(data: bytes) -> None:
    codec.unpack(data, max_size=1 << 20)
    codec.unpack(data, max_size=1 << 20, canonical=True, max_depth=4)


# -- the estate's signed lists ------------------------------------------------------

ACCESS_ROWS = [
    access.VolumeAccess(ID, "secret", frozenset({NODE}), frozenset({NODE2}), 2, {1: {NODE: b"x"}})
]
ACCESS_LIST = access.sign_access(CA_KEY, ESTATE_ID, 3, ACCESS_ROWS)
REVOCATIONS = revocation.sign_revocations(CA_KEY, ESTATE_ID, 2, frozenset({NODE, NODE2}))
_ACCESS_DOMAIN = b"p2pfs-access-list-v1\0"
_REVOCATION_DOMAIN = b"p2pfs-revocation-list-v1\0"


def _body_of(signed: bytes) -> bytes:
    outer = codec.unpack(signed, max_size=1 << 24)
    assert isinstance(outer, dict)
    body = outer["list"]
    assert isinstance(body, bytes)
    return body


def _signed(domain: bytes, body: bytes) -> bytes:
    # Re-signed by the CA, so the fuzzed body gets past the signature: a body the CA
    # signed is trusted, but its parser must still not crash on it.
    return codec.pack({"list": body, "sig": CA_KEY.sign(domain + body)})


def _access(data: bytes) -> None:
    access.decode_access(data, CA_PUBLIC, ESTATE_ID)


def _access_body(data: bytes) -> None:
    access.decode_access(_signed(_ACCESS_DOMAIN, data), CA_PUBLIC, ESTATE_ID)


def _revocations(data: bytes) -> None:
    revocation.decode_revocations(data, CA_PUBLIC, ESTATE_ID)


def _revocations_body(data: bytes) -> None:
    revocation.decode_revocations(_signed(_REVOCATION_DOMAIN, data), CA_PUBLIC, ESTATE_ID)


# -- enrolment ----------------------------------------------------------------------

CA_CERT = certs.make_ca_cert(CA_KEY)
NODE_CERT = certs.issue_node_cert(CA_KEY, CA_CERT, NODE_KEY.private_key.public_key())
BUNDLE = codec.pack(
    {
        "format": estate._BUNDLE_FORMAT,
        "v": estate._BUNDLE_VERSION,
        "estate": ESTATE_ID,
        "ca": certs.to_der(CA_CERT),
        "node": certs.to_der(NODE_CERT),
        "revocations": REVOCATIONS,
    }
)
REQUEST = certs.make_request(NODE_KEY)


# -- the estate backup --------------------------------------------------------------

BACKUP_PASSPHRASE = b"fuzz passphrase"
_HR_KEY = SigningKey.generate()
_HR = _HR_KEY.public_bytes()
_HR_SECRET = bytes(range(100, 132))
_HR_ACCESS = access.sign_access(
    CA_KEY,
    ESTATE_ID,
    4,
    [access.VolumeAccess(_HR, "hr", frozenset({NODE}), frozenset(), 1, {1: {NODE: b"x"}})],
)
_HR_HEAD = model.Snapshot.create(
    _HR_KEY,
    name="hr",
    seq=1,
    parent=None,
    root=ID2,
    time_ns=9,
    params=PARAMS,
    epoch=1,
    root_key=seal_root(_HR_SECRET, _HR, 1, ID2 + ID),
    ids=ID,
)


def _volume_backup(key: SigningKey, head: model.Snapshot) -> backup.VolumeBackup:
    vid = key.public_bytes()
    endorsement = CA_KEY.sign(revocation.endorsement_message(ESTATE_ID, vid, head.name))
    return backup.VolumeBackup(
        head.name,
        VolumeId(vid),
        ChunkParams(),
        False,
        endorsement,
        key,
        head.encode(),
        head,
    )


BACKUP = backup.Backup(
    ESTATE_ID,
    1_700_000_000,
    NODE,
    CA_KEY,
    CA_CERT,
    revocation.decode_revocations(REVOCATIONS, CA_PUBLIC, ESTATE_ID),
    access.decode_access(_HR_ACCESS, CA_PUBLIC, ESTATE_ID),
    {_HR: {1: _HR_SECRET}},
    {"nodes.json": json.dumps({NODE.hex(): ID.hex()}).encode(), "groups.json": b"{}"},
    (_volume_backup(_HR_KEY, _HR_HEAD), _volume_backup(VOLUME_KEY, SNAPSHOT)),
)
BACKUP_CONTENTS = backup.encode_contents(BACKUP)
_BACKUP_KEYS: dict[bytes, bytes] = {}


def _derive(passphrase: bytes, header: backup.Header) -> bytes:
    """scrypt once, for the seed's salt; under any other salt another key, as scrypt
    would give (a fuzzed salt costs no half second)."""
    if not _BACKUP_KEYS:
        _BACKUP_KEYS[header.salt] = backup.derive_key(passphrase, header)
    key = _BACKUP_KEYS.get(header.salt)
    return key if key is not None else hashlib.sha256(header.salt + passphrase).digest()


SEALED_BACKUP = backup.seal_backup(BACKUP_CONTENTS, BACKUP_PASSPHRASE, derive=_derive)


def _backup(data: bytes) -> None:
    backup.open_backup(data, BACKUP_PASSPHRASE, derive=_derive)


def _cert(data: bytes) -> None:
    _each(
        lambda: certs.parse_cert(data, "fuzz", pem=False),
        lambda: certs.parse_cert(data, "fuzz", pem=True),
    )


# -- desktop link, tokens -----------------------------------------------------------

TOKEN = desktop.DesktopToken("alice", b"s" * 32, b"f" * 32, "192.168.56.2:7421").encode()
TOKEN_RECORD = json.dumps({"desktop": "alice", "digest": "ab" * 32, "created": 1700000000}).encode()
KEYS = desktop.ApplianceKeys(Home(SCRATCH / "home"))


def _token(data: bytes) -> None:
    desktop.load_token(_write("t.token", data))


def _token_record(data: bytes) -> None:
    # The appliance's own record of a desktop's token, read for every connection.
    _write("home/appliance/tokens/alice.token", data)
    KEYS.token_digest("alice")
    KEYS.desktops()
    _each(lambda: KEYS.check("alice", b"s" * 32))


def _split_path(data: bytes) -> None:
    desktop_api.split_path(data)
    desktop_api.split_path(data.decode("utf-8", errors="surrogateescape"))


def _address(data: bytes) -> None:
    link.parse_address(data.decode("utf-8", errors="replace"))


ENCODINGS = ("raw", "json", "msgpack", "other")


def _link_answer(data: bytes) -> None:
    # The desktop's end decoding an answer's payload, in each encoding it knows.
    _each(*(lambda e=enc: link_client.decode_result({"enc": e}, data) for enc in ENCODINGS))


# -- config and the appliance seed --------------------------------------------------

CONFIG = b"""
[network]
port = 7420
listen = "0.0.0.0"
static_peers = ["10.0.0.5:7420", "[fe80::1]:7420"]
discovery = true
frame_timeout_s = 30.0

[fetch]
deadline_s = 5.0
peers_without_digest = 3

[cache]
max_bytes = "20G"
min_free = 1073741824
memory = "1.5G"
scrub_interval_h = 24

[publish]
settle_s = 2.0

[appliance]
user_listen = ["192.168.122.2:7421", "vsock:3:7421"]
desktop_pin = false
volumes = ["tools"]
"""


def _config(data: bytes) -> None:
    config.decode(data, "config.toml", config.ConfigFile)
    config.load(_write("config.toml", data))


SEED_DOC: dict[str, Any] = {
    "seed": {
        "format": 1,
        "estate": ESTATE_ID.hex(),
        "node": node_id_of(NODE_KEY.public_bytes()).hex(),
        "volumes": ["tools"],
        "cache": "2G",
        "desktop_pin": False,
        "desktop_snapshots": True,
    },
    "host_only": {"address": "192.168.56.2/24", "port": 7421},
    "lan": {"address": "dhcp", "gateway": "10.0.0.1", "peers": ["10.0.0.5:7420"]},
    "desktops": {"alice": {"smb_password": "pw"}},
}
SEED_TOML = seed._toml(SEED_DOC).encode()
SEED_DIR = SCRATCH / "seed"
for _name, _data in {
    "node.key": b"unused by read_seed\n",
    "node.bundle": BUNDLE,
    "appliance/link.pem": b"unused by read_seed\n",
}.items():
    _write(f"seed/{_name}", _data)


def _seed(data: bytes) -> None:
    _write("seed/config.toml", data)
    seed.read_seed(SEED_DIR)


def _seed_bundle(data: bytes) -> None:
    _write("seed/config.toml", SEED_TOML)
    _write("seed/node.bundle", data)
    try:
        seed.read_seed(SEED_DIR)
    finally:
        _write("seed/node.bundle", BUNDLE)


SUMMARY = NodeSummary(
    name="d1",
    site="berlin",
    version="0.1.0",
    uptime_s=60,
    volumes=(VolumeSummary("tools", 3, "ab" * 32, "public"),),
    cache_bytes=1 << 20,
    cache_quota=None,
    offline_ready=True,
    pins=1,
    corrupt_chunks_rejected=0,
    quarantined_peers=0,
    peers_connected=2,
    bytes_from=(1, 2, 3),
    bytes_served=4,
    problems=("tools: a problem",),
    history=((1_700_000_000, 0, 0, 0), (1_700_000_060, 1, 2, 3)),
).to_wire()


def _http_head(data: bytes) -> None:
    http.parse_head(data)


TARGETS: dict[str, Target] = {
    t.name: t
    for t in [
        Target("frames", _frames, [*FRAMES, b"".join(FRAMES)]),
        Target("desktop-frames", _desktop_frames, [wire.encode({"t": "req", "id": 1})]),
        Target("messages", _messages, [codec.pack(h) for h in HEADERS]),
        Target("frame-messages", _frame_then_messages, [b"".join(FRAMES)]),
        Target("unpack", _unpack, [BLOB.encode(), SNAPSHOT.encode(), codec.pack(HEADERS[0])]),
        Target("blob", model.decode_blob, [BLOB.encode(), model.Blob(0, 0, ()).encode()]),
        Target("tree", model.decode_tree, [TREE.encode(), SPECIAL_TREE.encode()]),
        Target(
            "snapshot",
            model.decode_snapshot,
            [SNAPSHOT.encode(), PRIVATE_SNAPSHOT.encode(), ORIGIN_SNAPSHOT.encode()],
        ),
        Target("id-list", id_list.decode_id_list, [ID_LIST.encode()]),
        Target("access", _access, [ACCESS_LIST]),
        Target("access-body", _access_body, [_body_of(ACCESS_LIST)]),
        Target("revocations", _revocations, [REVOCATIONS]),
        Target("revocations-body", _revocations_body, [_body_of(REVOCATIONS)]),
        Target("bundle", enrolment.parse_bundle, [BUNDLE]),
        Target("backup", _backup, [SEALED_BACKUP]),
        Target("backup-contents", backup.decode_contents, [BACKUP_CONTENTS]),
        Target("request", certs.parse_request, [REQUEST]),
        Target("cert", _cert, [certs.to_der(CA_CERT), certs.to_pem(NODE_CERT)]),
        Target("token", _token, [TOKEN]),
        Target("token-record", _token_record, [TOKEN_RECORD]),
        Target("split-path", _split_path, [b"tools/a/b", b"tools/.snapshots/3/x"]),
        Target("address", _address, [b"vsock:3:7421", b"[fe80::1]:7421", b"tcp:host:1"]),
        Target("link-answer", _link_answer, [b'{"a": [1, 2.5]}', codec.pack({"a": [b"x"]})]),
        Target("config", _config, [CONFIG]),
        Target("seed", _seed, [SEED_TOML]),
        Target("seed-bundle", _seed_bundle, [BUNDLE]),
        Target("summary", NodeSummary.from_wire, [SUMMARY]),
        Target("http-head", _http_head, [b"GET /?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"]),
    ]
}


def _atheris_main(argv: list[str]) -> None:
    """``python tests/fuzz_targets.py TARGET [libFuzzer flags]``: coverage-guided, seeded
    with the target's valid encodings (written to a corpus directory)."""
    import atheris  # optional: `pip install atheris` (not needed by make test)

    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: {argv[0]} TARGET [libFuzzer flags]; targets: {', '.join(TARGETS)}")
    target = TARGETS[argv[1]]
    corpus = Path(tempfile.mkdtemp(prefix=f"p2pfs-corpus-{target.name}-"))
    for i, s in enumerate(target.seeds):
        (corpus / f"seed-{i}").write_bytes(s)

    def one(data: bytes) -> None:
        check(target, data)

    atheris.instrument_all()  # p2pfs is imported already: instrument what is loaded
    try:
        atheris.Setup([argv[0], *argv[2:], str(corpus)], one)
        atheris.Fuzz()
    finally:
        # libFuzzer exits the process at the end of a run: this line may not print.
        print(f"{target.name}: {EXECUTIONS[target.name]} executions", file=sys.stderr)


if __name__ == "__main__":
    _atheris_main(sys.argv)
