"""The steps of enrolment: the admin creates the estate, a node asks to join, the admin
approves, the node joins; and the admin's revocations and endorsements. See
docs/estate.md.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from p2pfs.errors import DecodeError, IntegrityError, NotFound, P2pfsError
from p2pfs.fsutil import write_atomic
from p2pfs.home import Home, node_id_of
from p2pfs.keys import SigningKey
from p2pfs.objects import codec

from .certs import (
    MAX_CERT,
    PeerRejected,
    cert_public,
    check_ca_cert,
    estate_id_of,
    issue_node_cert,
    make_ca_cert,
    make_request,
    node_id_from_cert,
    parse_cert,
    parse_request,
    to_pem,
)
from .estate import (
    _BUNDLE_FORMAT,
    _BUNDLE_VERSION,
    CA_CERT,
    CA_KEY,
    NODE_CERT,
    REVOCATIONS,
    Estate,
    admin_lock,
    node_key,
)
from .grants import remember_node
from .revocation import MAX_REVOCATION_LIST, NODE_ID_SIZE, decode_revocations, sign_revocations

log = logging.getLogger(__name__)

MAX_BUNDLE = MAX_REVOCATION_LIST + 4 * MAX_CERT


def _require_admin(home: Home) -> Estate:
    home.require()
    estate = Estate.load(home)
    if estate is None:
        raise NotFound(f"{home.root} holds no estate: run 'p2pfs estate init' on the admin node")
    if not estate.is_admin:
        raise P2pfsError(
            f"{home.root} is a member, not the admin, of estate {estate.estate_id.hex()}: "
            "only the node holding the estate CA key can do this"
        )
    return estate


def init_estate(home: Home) -> Estate:
    """Admin: create the estate CA, an empty revocation list, and enrol this node."""
    key = node_key(home)
    with admin_lock(home):
        d = home.estate_dir
        existing = Estate.load(home)
        if existing is not None:
            role = "holds" if existing.is_admin else "is a member of"
            raise P2pfsError(
                f"this node already {role} estate {existing.estate_id.hex()}; not creating another"
            )
        ca_key = SigningKey.generate()
        ca_key.save(d / CA_KEY)
        ca_cert = make_ca_cert(ca_key)
        estate_id = estate_id_of(ca_key.public_bytes())
        write_atomic(d / CA_CERT, to_pem(ca_cert), 0o644)
        revocations = sign_revocations(ca_key, estate_id, 1, frozenset())
        write_atomic(d / REVOCATIONS, revocations, 0o644)
        node_cert = issue_node_cert(ca_key, ca_cert, key.private_key.public_key())
        write_atomic(d / NODE_CERT, to_pem(node_cert), 0o644)  # last: it makes the node a member
    remember_node(home, key.public_bytes())
    log.info("created estate %s with admin node %s", estate_id.hex(), home.node_id().hex())
    estate = Estate.load(home)
    assert estate is not None
    return estate


def request_join(home: Home) -> bytes:
    """Desktop: a PEM certificate signing request made with this node's own key."""
    return make_request(node_key(home))


def approve(home: Home, request: bytes) -> bytes:
    """Admin: check a join request and answer it with a bundle (certificate, CA, revocations)."""
    estate = _require_admin(home)
    node_id, public = parse_request(request)
    if estate.is_revoked(node_id):
        raise P2pfsError(f"node {node_id.hex()} is revoked; it cannot rejoin with this key")
    cert = estate._issue(public)
    # The admin seals private volumes' secrets to approved nodes' keys: keep this one.
    remember_node(home, public.public_bytes(Encoding.Raw, PublicFormat.Raw))
    log.info("approved node %s until %s", node_id.hex(), cert.not_valid_after_utc.date())
    return estate._bundle(cert)


@dataclass(frozen=True)
class Bundle:
    """A decoded join bundle (not yet checked against a node)."""

    estate_id: bytes
    ca_cert: x509.Certificate
    node_cert: x509.Certificate
    revocations: bytes


def parse_bundle(data: bytes) -> Bundle:
    if not isinstance(data, bytes) or not data:
        raise DecodeError("the join bundle is empty")
    if len(data) > MAX_BUNDLE:
        raise DecodeError(
            f"the join bundle is {len(data)} bytes, more than the limit of {MAX_BUNDLE}"
        )
    try:
        doc: Any = codec.unpack(data, max_size=MAX_BUNDLE, canonical=True)
    except DecodeError as e:
        raise DecodeError(f"the join bundle is not a p2pfs bundle ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != _BUNDLE_FORMAT:
        raise DecodeError("the join bundle is not a p2pfs join bundle")
    if doc.get("v") != _BUNDLE_VERSION:
        raise DecodeError(f"join bundle version {doc.get('v')!r} is not supported")
    if set(doc) != {"format", "v", "estate", "ca", "node", "revocations"}:
        raise DecodeError("the join bundle must hold exactly estate, ca, node and revocations")
    for field in ("estate", "ca", "node", "revocations"):
        if not isinstance(doc[field], bytes):
            raise DecodeError(f"the join bundle's {field!r} must be bytes")
    return Bundle(
        doc["estate"],
        parse_cert(doc["ca"], "the bundle's CA certificate", pem=False),
        parse_cert(doc["node"], "the bundle's node certificate", pem=False),
        doc["revocations"],
    )


def join(home: Home, bundle: bytes) -> Estate:
    """Desktop: check the admin's bundle against this node and store it: the node is a member."""
    key = node_key(home)
    b = parse_bundle(bundle)
    ca_public = check_ca_cert(b.ca_cert, "the bundle's CA certificate")
    estate_id = estate_id_of(ca_public)
    if b.estate_id != estate_id:
        raise IntegrityError("the join bundle names another estate than its CA certificate")
    node_id = node_id_from_cert(b.node_cert, b.ca_cert, "the bundle's node certificate")
    mine = node_id_of(key.public_bytes())
    if node_id != mine or cert_public(b.node_cert, "") != key.public_bytes():
        raise PeerRejected(
            f"this bundle was issued for node {node_id.hex()}, not for this node {mine.hex()}"
        )
    revocations = decode_revocations(b.revocations, ca_public, estate_id)
    if mine in revocations.revoked:
        raise PeerRejected(f"this node {mine.hex()} is revoked by estate {estate_id.hex()}")
    existing = Estate.load(home)
    if existing is not None:
        if existing.estate_id != estate_id:
            raise P2pfsError(
                f"this node is already a member of estate {existing.estate_id.hex()}; "
                f"to move it to {estate_id.hex()}, remove {home.estate_dir} first"
            )
        if existing.is_admin:
            raise P2pfsError("this node is the estate's admin: it issued its own certificate")
        if existing.revocation_number > revocations.number:
            revocations = existing._revocations  # never roll the list back
    d = home.estate_dir
    d.mkdir(mode=0o700, exist_ok=True)
    write_atomic(d / CA_CERT, to_pem(b.ca_cert), 0o644)
    write_atomic(d / REVOCATIONS, revocations.encoded, 0o644)
    write_atomic(d / NODE_CERT, to_pem(b.node_cert), 0o644)  # last: it makes the node a member
    log.info("joined estate %s as node %s", estate_id.hex(), mine.hex())
    estate = Estate.load(home)
    assert estate is not None
    return estate


def revoke(home: Home, node_id: bytes) -> int:
    """Admin: add ``node_id`` to the revocation list and re-sign it; returns the list's number."""
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_SIZE:
        raise P2pfsError(f"a node id is {NODE_ID_SIZE} bytes ({NODE_ID_SIZE * 2} hex digits)")
    home.require()
    with admin_lock(home):
        estate = _require_admin(home)
        if node_id == estate.node_id:
            raise P2pfsError("refusing to revoke the admin node itself")
        if estate.is_revoked(node_id):
            return estate.revocation_number
        assert estate._ca_key is not None
        fresh = sign_revocations(
            estate._ca_key,
            estate.estate_id,
            estate.revocation_number + 1,
            estate._revocations.revoked | {node_id},
        )
        if not estate.accept_revocation_list(fresh):
            raise AssertionError("a newly signed revocation list was not accepted")
        return estate.revocation_number


def endorse(home: Home, volume_id: bytes, name: str) -> bytes:
    """Admin: the CA's signature saying this volume key belongs to the estate under ``name``."""
    return _require_admin(home).endorse(volume_id, name)
