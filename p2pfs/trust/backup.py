"""The estate backup: what a new admin machine needs to take over, under a passphrase.

An admin home holds the estate (``HOME/estate/``: the CA key and certificate, the
revocation and access lists, ``nodes.json``, ``grants.json``, ``groups.json``) and
the volumes it publishes (``HOME/volumes/NAME/``: the record and ``publisher.key``,
the head snapshot in the store). The secrets of private volumes live only in the
access list, sealed to the admin's *node* key, which a successor does not have
(it has its own identity): the backup holds them opened, every epoch's. Not in the
backup: this node's own key and certificate, and the store's chunks (origins and
peers hold them).

The file::

    header  = "P2PFS-BACKUP" (12) | version (1) = 1 | kdf (1) = 1: scrypt
              | log2 N (1) = 17 | r (1) = 8 | p (1) = 1 | salt (16) | nonce (12)
    body    = AES-256-GCM(key = scrypt(passphrase, salt), nonce, contents,
                          associated data = header)

``contents`` is one canonical msgpack map (``encode_contents``). Without the
passphrase the file is useless: scrypt (128 MiB, about half a second) makes every
guess expensive, and the AEAD refuses a wrong passphrase and every changed byte
alike ("wrong passphrase or damaged backup"). Decoding is for hostile bytes:
bounded, every field checked, and everything the contents claim is verified
(the CA key against its certificate, the lists' signatures, each volume key
against its id, each head snapshot's signature, each private secret against its
head's root key) before anything is written. See docs/recovery.md.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from p2pfs.chunking.params import ChunkParams
from p2pfs.errors import DecodeError, IntegrityError, NotFound, P2pfsError, SignatureError
from p2pfs.fsutil import read_bounded, write_atomic
from p2pfs.home import Home
from p2pfs.ids import VolumeId
from p2pfs.keys import PUBLIC_KEY_SIZE, SIGNATURE_SIZE, SigningKey, seal_box, verify
from p2pfs.names import name_problem
from p2pfs.objects import codec
from p2pfs.objects.model import MAX_SNAPSHOT_BYTES, Snapshot, decode_snapshot, object_id
from p2pfs.seal import SECRET_SIZE, open_root
from p2pfs.store.cas import Store
from p2pfs.volume.registry import VolumeRecord, VolumeRegistry

from .access import EMPTY, MAX_ACCESS_LIST, AccessList, VolumeAccess, decode_access, sign_access
from .certs import check_ca_cert, estate_id_of, issue_node_cert, parse_cert, to_der, to_pem
from .estate import ACCESS, CA_CERT, CA_KEY, NODE_CERT, REVOCATIONS, Estate, admin_lock, node_key
from .grants import GRANTS, GROUPS, NODES, remember_node
from .revocation import (
    MAX_NUMBER,
    MAX_REVOCATION_LIST,
    NODE_ID_SIZE,
    RevocationList,
    decode_revocations,
    endorsement_message,
)

log = logging.getLogger(__name__)

MAGIC = b"P2PFS-BACKUP"
VERSION = 1
KDF_SCRYPT = 1
SCRYPT_LOG2_N = 17  # N = 2**17, r = 8: 128 MiB of memory per guess
SCRYPT_R = 8
SCRYPT_P = 1
SALT_SIZE = 16
NONCE_SIZE = 12
TAG_SIZE = 16
_HEADER = struct.Struct(f">{len(MAGIC)}sBBBBB{SALT_SIZE}s{NONCE_SIZE}s")
HEADER_SIZE = _HEADER.size
MAX_BACKUP = 64 * 1024 * 1024
MAX_CONTENTS = MAX_BACKUP - HEADER_SIZE - TAG_SIZE
MAX_FILE = 16 * 1024 * 1024  # one of the admin's JSON files (as grants.py bounds them)
MAX_VOLUMES = 65536
FILES = (NODES, GRANTS, GROUPS)  # the admin's JSON files, kept as they are

_FORMAT = "p2pfs-estate-backup"
_CONTENTS_VERSION = 1
_KEYS = frozenset(
    {"format", "v", "estate", "made", "admin", "ca_key", "ca", "revocations", "access"}
    | {"secrets", "files", "volumes"}
)
WRONG = "wrong passphrase or damaged backup"


# -- what a backup holds ---------------------------------------------------------------


@dataclass(frozen=True)
class VolumeBackup:
    """One volume the admin publishes: enough to publish its next snapshot."""

    name: str
    id: VolumeId
    params: ChunkParams
    keep_owners: bool
    endorsement: bytes | None
    key: SigningKey
    head: bytes | None  # the head snapshot's encoding (None before the first import)
    snapshot: Snapshot | None  # it, decoded and verified

    @property
    def seq(self) -> int:
        return self.snapshot.seq if self.snapshot is not None else 0


@dataclass(frozen=True)
class Backup:
    """The decoded, verified contents of an estate backup."""

    estate_id: bytes
    made: int  # unix time
    admin: bytes  # node id of the admin that made it
    ca_key: SigningKey
    ca_cert: x509.Certificate
    revocations: RevocationList
    access: AccessList
    secrets: dict[bytes, dict[int, bytes]]  # private volume id -> epoch -> secret
    files: dict[str, bytes]  # nodes.json, grants.json, groups.json (those the admin had)
    volumes: tuple[VolumeBackup, ...]

    def is_private(self, volume_id: bytes) -> bool:
        return self.access.is_private(volume_id)


def _raw(key: SigningKey) -> bytes:
    return key.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )


def _key(seed: object, what: str) -> SigningKey:
    if not isinstance(seed, bytes) or len(seed) != PUBLIC_KEY_SIZE:
        raise DecodeError(f"the backup's {what} must be {PUBLIC_KEY_SIZE} bytes")
    return SigningKey(Ed25519PrivateKey.from_private_bytes(seed))


# -- sealing under a passphrase --------------------------------------------------------


@dataclass(frozen=True)
class Header:
    log2_n: int
    r: int
    p: int
    salt: bytes
    nonce: bytes
    encoded: bytes  # the exact bytes: the AEAD's associated data


def _damaged(why: str) -> DecodeError:
    return DecodeError(f"not a p2pfs estate backup, or a damaged one ({why})")


def read_header(data: bytes) -> Header:
    """The header of a backup file; DecodeError unless it is exactly one we write."""
    if not isinstance(data, bytes) or len(data) < HEADER_SIZE + TAG_SIZE:
        raise _damaged("it is too short")
    if len(data) > MAX_BACKUP:
        raise _damaged(f"it is larger than {MAX_BACKUP} bytes")
    magic, version, kdf, log2_n, r, p, salt, nonce = _HEADER.unpack_from(data)
    if magic != MAGIC:
        raise _damaged(f"it does not start with {MAGIC.decode()}")
    if version != VERSION:
        raise _damaged(f"format version {version}; this p2pfs reads version {VERSION}")
    if (kdf, log2_n, r, p) != (KDF_SCRYPT, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P):
        raise _damaged(f"key derivation {kdf} with N=2^{log2_n}, r={r}, p={p} is not scrypt's")
    return Header(log2_n, r, p, salt, nonce, data[:HEADER_SIZE])


def derive_key(passphrase: bytes, header: Header) -> bytes:
    """The AES-256 key of a backup: scrypt of the passphrase under the header's salt."""
    return Scrypt(salt=header.salt, length=32, n=2**header.log2_n, r=header.r, p=header.p).derive(
        passphrase
    )


def seal_backup(
    contents: bytes,
    passphrase: bytes,
    *,
    derive: Callable[[bytes, Header], bytes] = derive_key,
) -> bytes:
    """A backup file's bytes: ``contents`` sealed under ``passphrase``."""
    if not passphrase:
        raise P2pfsError("an empty passphrase protects nothing")
    if len(contents) > MAX_CONTENTS:
        raise P2pfsError(f"the estate backup would exceed {MAX_BACKUP} bytes")
    salt, nonce = os.urandom(SALT_SIZE), os.urandom(NONCE_SIZE)
    fields = (KDF_SCRYPT, SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P, salt, nonce)
    encoded = _HEADER.pack(MAGIC, VERSION, *fields)
    header = Header(SCRYPT_LOG2_N, SCRYPT_R, SCRYPT_P, salt, nonce, encoded)
    key = derive(passphrase, header)
    return header.encoded + AESGCM(key).encrypt(header.nonce, contents, header.encoded)


def open_backup(
    data: bytes,
    passphrase: bytes,
    *,
    derive: Callable[[bytes, Header], bytes] = derive_key,
) -> Backup:
    """Open and verify a backup file: a ``P2pfsError`` (one line) for anything wrong.

    ``derive`` is the key derivation (the fuzz targets pass one that runs scrypt once)."""
    header = read_header(data)
    try:
        contents = AESGCM(derive(passphrase, header)).decrypt(
            header.nonce, data[HEADER_SIZE:], header.encoded
        )
    except InvalidTag:
        raise IntegrityError(WRONG) from None
    try:
        return decode_contents(contents)
    except P2pfsError as e:  # sealed with the passphrase, yet wrong: made by another tool
        raise IntegrityError(f"the estate backup's contents are invalid: {e}") from None


# -- the contents ----------------------------------------------------------------------


def encode_contents(b: Backup) -> bytes:
    return codec.pack(
        {
            "format": _FORMAT,
            "v": _CONTENTS_VERSION,
            "estate": b.estate_id,
            "made": b.made,
            "admin": b.admin,
            "ca_key": _raw(b.ca_key),
            "ca": to_der(b.ca_cert),
            "revocations": b.revocations.encoded,
            "access": b.access.encoded,
            "secrets": [
                [vid, [[e, s] for e, s in sorted(per.items())]]
                for vid, per in sorted(b.secrets.items())
            ],
            "files": dict(b.files),
            "volumes": [
                [
                    v.name,
                    v.id,
                    v.params.to_dict(),
                    v.keep_owners,
                    v.endorsement,
                    _raw(v.key),
                    v.head,
                ]
                for v in sorted(b.volumes, key=lambda v: v.name)
            ],
        }
    )


def _bytes(value: object, what: str, *, size: int | None = None, limit: int = 0) -> bytes:
    if not isinstance(value, bytes):
        raise DecodeError(f"the backup's {what} must be bytes")
    if size is not None and len(value) != size:
        raise DecodeError(f"the backup's {what} must be {size} bytes")
    if limit and len(value) > limit:
        raise DecodeError(f"the backup's {what} is larger than {limit} bytes")
    return value


def _sorted_rows(value: object, what: str, width: int, limit: int) -> list[list[object]]:
    """A list of at most ``limit`` rows of ``width`` fields, sorted and unique by the first."""
    if not isinstance(value, list) or len(value) > limit:
        raise DecodeError(f"the backup's {what} must be a list of at most {limit}")
    for i, row in enumerate(value):
        if not isinstance(row, list) or len(row) != width:
            raise DecodeError(f"the backup's {what}: each must be a list of {width} fields")
        if type(row[0]) not in (bytes, str, int):
            raise DecodeError(f"the backup's {what}: each must start with bytes, text or a number")
        if i and not (type(row[0]) is type(value[i - 1][0]) and row[0] > value[i - 1][0]):
            raise DecodeError(f"the backup's {what} must be sorted and unique")
    return value


def _secrets(value: object, access: AccessList) -> dict[bytes, dict[int, bytes]]:
    out: dict[bytes, dict[int, bytes]] = {}
    for vid, epochs in _sorted_rows(value, "secrets", 2, len(access.volumes)):
        va = access.of(_bytes(vid, "secret's volume id", size=PUBLIC_KEY_SIZE))
        if va is None:
            raise DecodeError("the backup holds secrets of a volume its access list lacks")
        per = {}
        for epoch, secret in _sorted_rows(epochs, f"epochs of {va.name!r}", 2, len(va.boxes)):
            if type(epoch) is not int or epoch not in va.boxes:
                raise DecodeError(f"the backup's secret of {va.name!r} has an unknown epoch")
            per[epoch] = _bytes(secret, f"secret of {va.name!r}", size=SECRET_SIZE)
        if set(per) != set(va.boxes):
            raise DecodeError(f"the backup lacks secrets of some epochs of {va.name!r}")
        out[va.volume_id] = per
    if set(out) != set(access.volumes):
        raise DecodeError("the backup lacks the secrets of some private volumes")
    return out


def _files(value: object) -> dict[str, bytes]:
    if not isinstance(value, dict) or not set(value) <= set(FILES):
        raise DecodeError(f"the backup's files must be a map of some of {', '.join(FILES)}")
    for name, data in value.items():
        _bytes(data, name, limit=MAX_FILE)
        try:
            doc = json.loads(data)
        except (ValueError, RecursionError):
            raise DecodeError(f"the backup's {name} is not JSON") from None
        if not isinstance(doc, dict):
            raise DecodeError(f"the backup's {name} is not a JSON object")
    return dict(value)


def _volume(row: list[object], estate_id: bytes, ca_public: bytes, b: Backup) -> VolumeBackup:
    name, vid, params, keep_owners, endorsement, seed, head = row
    if (problem := name_problem(name)) is not None:
        raise DecodeError(f"the backup's volume name: {problem}")
    assert isinstance(name, str)
    volume_id = VolumeId(_bytes(vid, f"id of volume {name!r}", size=PUBLIC_KEY_SIZE))
    key = _key(seed, f"publisher key of {name!r}")
    if key.public_bytes() != volume_id:
        raise IntegrityError(f"the backup's publisher key of {name!r} is not its id")
    if not isinstance(keep_owners, bool):
        raise DecodeError(f"the backup's keep_owners of {name!r} must be true or false")
    signature = None
    if endorsement is not None:
        signature = _bytes(endorsement, f"endorsement of {name!r}", size=SIGNATURE_SIZE)
        try:
            verify(ca_public, signature, endorsement_message(estate_id, volume_id, name))
        except SignatureError:
            raise SignatureError(
                f"the backup's volume {name!r} is not endorsed by its CA"
            ) from None
    snapshot = encoded = None
    if head is not None:
        encoded = _bytes(head, f"head of {name!r}", limit=MAX_SNAPSHOT_BYTES)
        snapshot = decode_snapshot(encoded)
        if snapshot.volume_id != volume_id or snapshot.name != name:
            raise IntegrityError(f"the backup's head snapshot of {name!r} is another volume's")
        if snapshot.private != b.is_private(volume_id):
            raise IntegrityError(f"the backup's head of {name!r} disagrees with its access list")
        if snapshot.private:
            assert snapshot.root_key is not None
            secret = b.secrets[volume_id].get(snapshot.epoch)
            if secret is None:
                raise IntegrityError(f"the backup lacks the key of the head of {name!r}")
            open_root(secret, volume_id, snapshot.seq, snapshot.root, snapshot.root_key)
    return VolumeBackup(
        name,
        volume_id,
        ChunkParams.from_dict(params),
        keep_owners,
        signature,
        key,
        encoded,
        snapshot,
    )


def decode_contents(data: bytes) -> Backup:
    """Decode and verify a backup's (decrypted) contents; a P2pfsError if anything is off."""
    doc = codec.unpack(data, max_size=MAX_CONTENTS, canonical=True)
    if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
        raise DecodeError("the contents are not a p2pfs estate backup's")
    if doc.get("v") != _CONTENTS_VERSION:
        raise DecodeError(f"estate backup contents version {doc.get('v')!r} is not supported")
    if set(doc) != _KEYS:
        raise DecodeError(f"an estate backup holds exactly {', '.join(sorted(_KEYS))}")
    estate_id = _bytes(doc["estate"], "estate id", size=16)
    made = doc["made"]
    if type(made) is not int or not 0 <= made <= MAX_NUMBER:
        raise DecodeError("the backup's time must be a non-negative integer")
    admin = _bytes(doc["admin"], "admin node id", size=NODE_ID_SIZE)
    ca_key = _key(doc["ca_key"], "CA key")
    ca_cert = parse_cert(
        _bytes(doc["ca"], "CA certificate"), "the backup's CA certificate", pem=False
    )
    ca_public = check_ca_cert(ca_cert, "the backup's CA certificate")
    if ca_key.public_bytes() != ca_public or estate_id_of(ca_public) != estate_id:
        raise IntegrityError("the backup's CA key, certificate and estate id do not agree")
    revocations = decode_revocations(
        _bytes(doc["revocations"], "revocation list", limit=MAX_REVOCATION_LIST),
        ca_public,
        estate_id,
    )
    encoded_access = _bytes(doc["access"], "access list", limit=MAX_ACCESS_LIST)
    access = decode_access(encoded_access, ca_public, estate_id) if encoded_access else EMPTY
    b = Backup(
        estate_id,
        made,
        admin,
        ca_key,
        ca_cert,
        revocations,
        access,
        _secrets(doc["secrets"], access),
        _files(doc["files"]),
        (),
    )
    rows = _sorted_rows(doc["volumes"], "volumes", 7, MAX_VOLUMES)
    volumes = tuple(_volume(row, estate_id, ca_public, b) for row in rows)
    return dataclasses.replace(b, volumes=volumes)


# -- the admin's side: collect ---------------------------------------------------------


def collect(home: Home) -> Backup:
    """Everything of this admin home a successor needs (read under the admin lock)."""
    home.require()
    key = node_key(home)
    with admin_lock(home):
        estate = Estate.load(home)
        if estate is None or not estate.is_admin:
            raise NotFound(f"this node holds no estate CA ({home.estate_dir / CA_KEY})")
        assert estate._ca_key is not None
        access = estate.access
        secrets = {
            vid: {e: access.secret(vid, e, key, estate.node_id) for e in va.boxes}
            for vid, va in access.volumes.items()
        }
        files = {
            f: read_bounded(home.estate_dir / f, MAX_FILE, f)
            for f in FILES
            if (home.estate_dir / f).exists()
        }
        volumes = _collect_volumes(home)
        b = Backup(
            estate.estate_id,
            int(time.time()),
            estate.node_id,
            estate._ca_key,
            estate._ca_cert,
            estate._revocations,
            access,
            secrets,
            files,
            tuple(volumes),
        )
    return b


def _collect_volumes(home: Home) -> list[VolumeBackup]:
    registry = VolumeRegistry(home)
    out = []
    store = Store(home.store_dir)
    try:
        for name in registry.names():
            if not registry.is_publisher(name):
                continue  # followed, not published here: its publisher has its key
            record = registry.get(name)
            try:
                snapshot = registry.load_head(store, record)
                head = store.get_object(record.head) if record.head is not None else None
            except P2pfsError as e:
                raise type(e)(f"volume {name!r}: its head snapshot cannot be read ({e})") from None
            out.append(
                VolumeBackup(
                    name,
                    record.id,
                    record.params,
                    record.keep_owners,
                    record.endorsement,
                    registry.publisher_key(name),
                    head,
                    snapshot,
                )
            )
    finally:
        store.close()
    return out


def make_backup(home: Home, passphrase: bytes) -> tuple[bytes, Backup]:
    """The sealed backup of this admin home, and what it holds."""
    b = collect(home)
    data = seal_backup(encode_contents(b), passphrase)
    return data, b


# -- the successor's side: restore -----------------------------------------------------


@dataclass(frozen=True)
class Restored:
    estate_id: bytes
    node_id: bytes
    old_admin: bytes
    revocation_number: int
    access_number: int  # of the list re-signed to admit this node (0: none)
    volumes: list[VolumeRecord]


def check_fresh(home: Home) -> None:
    """A P2pfsError unless this node is in no estate (nor has one half made)."""
    d = home.estate_dir
    if (d / NODE_CERT).exists():
        try:
            existing = Estate.load(home)
        except P2pfsError:
            existing = None
        named = f" {existing.estate_id.hex()}" if existing is not None else ""
        raise P2pfsError(
            f"this node already belongs to estate{named}: restore an estate backup into a "
            "freshly initialized home ('p2pfs --home NEW init')"
        )
    if (d / CA_KEY).exists():
        raise P2pfsError(
            f"{d} holds an estate CA key but no node certificate (an 'estate init' or "
            f"'estate restore' cut short): remove {d} and run the restore again"
        )


def _readmit(b: Backup, public: bytes, me: bytes) -> bytes:
    """The next access list: as the backup's, with this node a reader of every private
    volume and a box of every epoch's secret sealed to its key."""
    volumes = []
    for vid, va in sorted(b.access.volumes.items()):
        boxes = {e: per | {me: seal_box(public, b.secrets[vid][e])} for e, per in va.boxes.items()}
        volumes.append(
            VolumeAccess(vid, va.name, va.readers | {me}, va.cachers - {me}, va.epoch, boxes)
        )
    return sign_access(b.ca_key, b.estate_id, b.access.number + 1, volumes)


def restore(home: Home, b: Backup) -> Restored:
    """Make this freshly initialized node the estate's admin and its volumes' publisher.

    Refused, with nothing written, if the node is in an estate already or a volume of
    the same name but another key is here. The volumes are written first (a restore
    cut short is run again: the estate does not exist yet), the estate files next,
    the node certificate issued from the restored CA last, as ``estate init`` does.
    """
    key = node_key(home)
    me = home.node_id()
    check_fresh(home)
    if me in b.revocations.revoked:
        raise P2pfsError(f"this node {me.hex()} is revoked by the estate in the backup")
    registry = VolumeRegistry(home)
    for v in b.volumes:
        if v.name in registry.names() and registry.get(v.name).id != v.id:
            raise P2pfsError(f"this node holds another volume named {v.name!r}; not replacing it")
    access = _readmit(b, key.public_bytes(), me) if b.access.number else b""
    node_cert = issue_node_cert(b.ca_key, b.ca_cert, key.private_key.public_key())
    restored = []
    store = Store(home.store_dir)
    try:
        for v in b.volumes:
            head = None
            if v.head is not None:
                if b.is_private(v.id):
                    store.tag(v.id, [object_id(v.head)])  # never served as public
                head = store.put_object(v.head)
            record = VolumeRecord(
                v.name, v.id, v.params, head, v.seq, v.endorsement, None, v.keep_owners
            )
            restored.append(registry.restore(record, v.key))
    finally:
        store.close()
    d = home.estate_dir
    with admin_lock(home):
        check_fresh(home)
        write_atomic(d / CA_CERT, to_pem(b.ca_cert), 0o644)
        write_atomic(d / REVOCATIONS, b.revocations.encoded, 0o644)
        if access:
            write_atomic(d / ACCESS, access, 0o644)
        for name, data in sorted(b.files.items()):
            write_atomic(d / name, data, 0o600)
        b.ca_key.save(d / CA_KEY)
        write_atomic(d / NODE_CERT, to_pem(node_cert), 0o644)  # last: it makes the node a member
    remember_node(home, key.public_bytes())
    estate = Estate.load(home)
    assert estate is not None and estate.is_admin
    log.info("restored estate %s on node %s", b.estate_id.hex(), me.hex())
    return Restored(
        b.estate_id,
        me,
        b.admin,
        estate.revocation_number,
        estate.access.number,
        restored,
    )
