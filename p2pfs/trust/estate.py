"""The estate's trust layer: its CA, enrolment, TLS contexts, revocation and volume endorsement.

The only module that imports ``ssl``, and (with keys.py) ``cryptography``.

An estate is one Ed25519 certificate authority held by the admin node. Its id is
a BLAKE3 digest of the CA public key, so a CA certificate proves which estate it
is. Every member node, the admin included, holds a certificate issued by the CA
for its own node key (``HOME/node.key``, which never leaves the node): the
certificate's public key *is* the node's identity (node id = ``node_id_of`` of it),
and its CN and SAN URI ``p2pfs://node/<hex>`` repeat that id. The TLS key of a
node is its node key, so Ed25519 certificates are used in TLS 1.3 (OpenSSL 3
supports them; checked by tests/t6_estate_test.py over real sockets).

Layout (``HOME/estate/``)::

    ca.key        the CA private key, on the admin node only (0600)
    ca.pem        the CA certificate (self-signed)
    node.pem      this node's certificate, issued by the CA
    revocations   the newest CA-signed revocation list this node has seen

Revocation is a CA-signed, numbered list of node ids (canonical msgpack, not an
X.509 CRL): it names identities rather than certificate serials, so a revoked
node stays out whatever certificate it presents, and peers hand it around as
opaque bytes. It is checked by ``Estate.peer_node_id`` right after every
handshake, not by OpenSSL, so a newer list applies at once to every new
connection without rebuilding the TLS contexts. See docs/estate.md.

Every input (join request, bundle, revocation list, peer certificate) is hostile:
size-bounded, fully checked, and refused with a one-line ``P2pfsError``.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import logging
import ssl
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pfs.errors import DecodeError, IntegrityError, NotFound, P2pfsError, SignatureError
from p2pfs.fsutil import locked, write_atomic
from p2pfs.home import Home, node_id_of
from p2pfs.ids import NodeId, derive
from p2pfs.keys import PUBLIC_KEY_SIZE, SigningKey, verify
from p2pfs.objects import codec

log = logging.getLogger(__name__)

ESTATE_DIR = "estate"  # under the node home: HOME/estate/
CA_KEY = "ca.key"
CA_CERT = "ca.pem"
NODE_CERT = "node.pem"
REVOCATIONS = "revocations"
_LOCK = ".lock"

ESTATE_ID_SIZE = 16
NODE_ID_SIZE = 16
VOLUME_ID_SIZE = PUBLIC_KEY_SIZE

CA_VALIDITY = datetime.timedelta(days=20 * 365)
NODE_VALIDITY = datetime.timedelta(days=2 * 365)
CLOCK_SKEW = datetime.timedelta(hours=1)  # certificates start this much in the past
EXPIRY_WARNING = datetime.timedelta(days=30)

# Bounds on hostile input. A certificate of ours is ~600 bytes, a request ~300.
MAX_CERT = 16 * 1024
MAX_REQUEST = 16 * 1024
# Equal to messages.MAX_REVOCATION_LIST (the network layer sits above this one).
MAX_REVOCATION_LIST = 1024 * 1024
MAX_REVOKED = (MAX_REVOCATION_LIST - 1024) // (NODE_ID_SIZE + 2)  # ~58,000 node ids
MAX_BUNDLE = MAX_REVOCATION_LIST + 4 * MAX_CERT
MAX_NUMBER = 2**63 - 1
MAX_VOLUME_NAME = 255  # bytes of UTF-8 in an endorsed volume name

# Domain separation: a signature made for one purpose never verifies for another.
_ESTATE_ID_DOMAIN = b"p2pfs-estate-id\0"
_REVOCATION_DOMAIN = b"p2pfs-revocation-list-v1\0"
_ENDORSEMENT_DOMAIN = b"p2pfs-volume-endorsement-v1\0"
_BUNDLE_FORMAT = "p2pfs-join-bundle"
_BUNDLE_VERSION = 1
_REVOCATION_VERSION = 1
_NODE_URI = "p2pfs://node/"
_SIGNATURE_BITS = b"\x03\x41\x00"  # DER: BIT STRING, 65 bytes, 0 unused bits


class PeerRejected(P2pfsError):
    """A peer certificate that must not be trusted: not the estate's, no node id, or revoked."""

    errno = errno.EACCES


def estate_id_of(ca_public_key: bytes) -> bytes:
    """The estate id: 16 bytes of BLAKE3 over the CA's raw Ed25519 public key."""
    return derive(_ESTATE_ID_DOMAIN, ca_public_key, ESTATE_ID_SIZE)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- certificates --------------------------------------------------------------


@contextlib.contextmanager
def _warnings_are_errors() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def _parse_cert(data: bytes, what: str, *, pem: bool) -> x509.Certificate:
    if not isinstance(data, bytes) or not data:
        raise DecodeError(f"{what} is empty")
    if len(data) > MAX_CERT:
        raise DecodeError(f"{what} is {len(data)} bytes, more than the limit of {MAX_CERT}")
    try:
        # A warning from the parser (e.g. "a negative serial number will not load in a
        # future release") refuses the certificate: what is dubious now may break later.
        # (catch_warnings is process-wide: a warning from another thread during the
        # parse may be lost; the CLI and the event loop parse, no worker thread does.)
        with _warnings_are_errors():
            if pem:
                cert = x509.load_pem_x509_certificate(data)
            else:
                cert = x509.load_der_x509_certificate(data)
        der = cert.public_bytes(serialization.Encoding.DER)  # the bytes as received
        signature = cert.signature
    except Exception as e:  # the Rust parser raises ValueError, others for odd input
        raise DecodeError(f"{what} is not an X.509 certificate ({e or type(e).__name__})") from None
    # An Ed25519 signature is a BIT STRING of 64 bytes with no unused bits. The
    # verifiers ignore the unused-bits count, so without this check one certificate
    # would have two encodings (a flipped bit that still verifies).
    if len(signature) != 64 or not der.endswith(_SIGNATURE_BITS + signature):
        raise DecodeError(f"{what} is not an Ed25519-signed certificate in canonical encoding")
    return cert


def _cert_public(cert: x509.Certificate, what: str) -> bytes:
    try:
        key = cert.public_key()
    except Exception as e:  # unsupported or malformed key algorithms
        raise PeerRejected(f"{what} has an unusable public key ({type(e).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PeerRejected(f"{what} holds a {type(key).__name__}, not an Ed25519 key")
    return _raw_public(key)


def _check_ca_cert(cert: x509.Certificate, what: str) -> bytes:
    """A self-signed Ed25519 CA certificate: return its raw public key."""
    public = _cert_public(cert, what)
    try:
        cert.verify_directly_issued_by(cert)
        basic = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except Exception as e:
        raise PeerRejected(
            f"{what} is not a self-signed estate CA certificate ({e or type(e).__name__})"
        ) from None
    if not basic.ca:
        raise PeerRejected(f"{what} is not a CA certificate")
    return public


def _node_id_from_cert(
    cert: x509.Certificate, ca: x509.Certificate, what: str, *, check_time: bool = True
) -> NodeId:
    """The node id a certificate issued by ``ca`` proves; PeerRejected if it proves none."""
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        raise PeerRejected(f"{what} is not issued by this estate's CA") from None
    node_id = node_id_of(_cert_public(cert, what))
    try:
        cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    except Exception as e:
        raise PeerRejected(f"{what} carries no node id ({e or type(e).__name__})") from None
    expected = node_id.hex()
    if len(cns) != 1 or cns[0].value != expected:
        raise PeerRejected(f"{what} names another node than its key ({expected})")
    if [u for u in uris if u.startswith(_NODE_URI)] != [_NODE_URI + expected]:
        raise PeerRejected(f"{what} lacks the node id URI {_NODE_URI}{expected}")
    now = _now()
    if check_time and not start - CLOCK_SKEW <= now <= end:
        raise PeerRejected(f"{what} of node {expected} is not valid now (valid {start} to {end})")
    return node_id


def _issue_node_cert(
    ca_key: SigningKey, ca: x509.Certificate, public: Ed25519PublicKey
) -> x509.Certificate:
    node_id = node_id_of(_raw_public(public)).hex()
    now = _now()
    not_after = min(now + NODE_VALIDITY, ca.not_valid_after_utc)
    ca_public = ca.public_key()
    assert isinstance(ca_public, Ed25519PublicKey)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .issuer_name(ca.subject)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
            ),
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(_NODE_URI + node_id)]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_public), critical=False
        )
        .sign(ca_key.private_key, None)
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=not cert_sign,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _make_ca_cert(ca_key: SigningKey) -> x509.Certificate:
    public = ca_key.private_key.public_key()
    estate_id = estate_id_of(_raw_public(public))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2pfs estate {estate_id.hex()}")])
    now = _now()
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + CA_VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(public), critical=False)
        .sign(ca_key.private_key, None)
    )


def _pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


# -- revocation lists ----------------------------------------------------------


@dataclass(frozen=True)
class RevocationList:
    """A verified revocation list and the exact bytes it came in."""

    number: int
    issued: int  # unix time the CA signed it
    revoked: frozenset[bytes]
    encoded: bytes


def _sign_revocations(
    ca_key: SigningKey, estate_id: bytes, number: int, revoked: frozenset[bytes]
) -> bytes:
    if len(revoked) > MAX_REVOKED:
        raise P2pfsError(f"a revocation list holds at most {MAX_REVOKED} node ids")
    body = codec.pack(
        {
            "v": _REVOCATION_VERSION,
            "estate": estate_id,
            "n": number,
            "issued": int(time.time()),
            "revoked": sorted(revoked),
        }
    )
    return codec.pack({"list": body, "sig": ca_key.sign(_REVOCATION_DOMAIN + body)})


def decode_revocations(data: bytes, ca_public: bytes, estate_id: bytes) -> RevocationList:
    """Verify a revocation list; DecodeError if malformed, SignatureError if not this CA's."""
    if not isinstance(data, bytes):
        raise DecodeError("a revocation list must be bytes")
    outer = codec.unpack(data, max_size=MAX_REVOCATION_LIST, canonical=True)
    if not isinstance(outer, dict) or set(outer) != {"list", "sig"}:
        raise DecodeError("a revocation list must be a map of 'list' and 'sig'")
    body, sig = outer["list"], outer["sig"]
    if not isinstance(body, bytes) or not isinstance(sig, bytes):
        raise DecodeError("a revocation list's 'list' and 'sig' must be bytes")
    try:
        verify(ca_public, sig, _REVOCATION_DOMAIN + body)
    except SignatureError:
        raise SignatureError("the revocation list is not signed by this estate's CA") from None
    doc = codec.unpack(body, max_size=MAX_REVOCATION_LIST, canonical=True)
    if not isinstance(doc, dict) or set(doc) != {"v", "estate", "n", "issued", "revoked"}:
        raise DecodeError("a revocation list must hold v, estate, n, issued and revoked")
    if doc["v"] != _REVOCATION_VERSION:
        raise DecodeError(f"revocation list version {doc['v']!r} is not supported")
    if doc["estate"] != estate_id:
        raise IntegrityError("the revocation list names another estate")
    number, issued, revoked = doc["n"], doc["issued"], doc["revoked"]
    if type(number) is not int or not 1 <= number <= MAX_NUMBER:
        raise DecodeError("a revocation list number must be an integer from 1 to 2^63-1")
    if type(issued) is not int or not 0 <= issued <= MAX_NUMBER:
        raise DecodeError("a revocation list's issue time must be a non-negative integer")
    if not isinstance(revoked, list) or len(revoked) > MAX_REVOKED:
        raise DecodeError(f"a revocation list must list at most {MAX_REVOKED} node ids")
    for i, node_id in enumerate(revoked):
        if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_SIZE:
            raise DecodeError(f"a revoked node id must be {NODE_ID_SIZE} bytes")
        if i and node_id <= revoked[i - 1]:
            raise DecodeError("revoked node ids must be sorted and unique")
    return RevocationList(number, issued, frozenset(revoked), data)


# -- endorsements --------------------------------------------------------------


def _endorsement_message(estate_id: bytes, volume_id: bytes, name: str) -> bytes:
    if not isinstance(volume_id, bytes) or len(volume_id) != VOLUME_ID_SIZE:
        raise SignatureError(f"a volume id must be {VOLUME_ID_SIZE} bytes")
    if not isinstance(name, str):
        raise SignatureError("a volume name must be a string")
    try:
        encoded = name.encode("utf-8")
    except UnicodeError:
        raise SignatureError(f"volume name {name!r} is not valid UTF-8") from None
    if not 0 < len(encoded) <= MAX_VOLUME_NAME:
        raise SignatureError(f"a volume name must be 1 to {MAX_VOLUME_NAME} bytes")
    # Fixed-size fields first, the name last: the encoding is unambiguous.
    return _ENDORSEMENT_DOMAIN + estate_id + volume_id + encoded


# -- files ---------------------------------------------------------------------


def _read_bounded(path: Path, limit: int, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except FileNotFoundError:
        raise NotFound(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise P2pfsError(f"{what} {path} is a directory") from None
    except PermissionError:
        raise P2pfsError(f"{what} {path} is not readable (permission denied)") from None
    if len(data) > limit:
        raise DecodeError(f"{what} {path} is larger than the limit of {limit} bytes")
    return data


@contextlib.contextmanager
def _admin_lock(home: Home) -> Iterator[None]:
    """Serialize the admin's changes (init, revoke): two revocations must not share a number."""
    home.estate_dir.mkdir(mode=0o700, exist_ok=True)
    with locked(home.estate_dir / _LOCK):
        yield


def _node_key(home: Home) -> SigningKey:
    home.require()
    key = SigningKey.load(home.node_key)
    if node_id_of(key.public_bytes()) != home.node_id():
        raise IntegrityError(f"{home.node_key} does not match the node id in {home.node_json}")
    return key


# -- the estate as a member sees it ---------------------------------------------


class Estate:
    """This node's membership: what the daemon loads at start."""

    def __init__(
        self,
        home: Home,
        ca_cert: x509.Certificate,
        node_cert: x509.Certificate,
        node_id: NodeId,
        revocations: RevocationList,
        ca_key: SigningKey | None,
    ) -> None:
        self.home = home
        self._ca_cert = ca_cert
        self._ca_pem = _pem(ca_cert).decode("ascii")
        self._ca_public = _cert_public(ca_cert, "the CA certificate")
        self.estate_id = estate_id_of(self._ca_public)
        self._node_cert = node_cert
        self.node_id: bytes = node_id
        self._ca_key = ca_key
        self._revocations = revocations
        self._server_ctx: ssl.SSLContext | None = None
        self._client_ctx: ssl.SSLContext | None = None

    @classmethod
    def load(cls, home: Home) -> Estate | None:
        """This node's estate; None if it has joined none. Damaged files: a clear P2pfsError."""
        d = home.estate_dir
        if not (d / NODE_CERT).exists():
            if (d / CA_KEY).exists():
                raise P2pfsError(
                    f"{d} holds an estate CA key but no node certificate: 'estate init' was "
                    f"interrupted; if no node was approved yet, remove {d} and run it again"
                )
            return None  # an interrupted join leaves no node.pem: join again
        ca_cert = _parse_cert(
            _read_bounded(d / CA_CERT, MAX_CERT, "CA certificate"), f"{d / CA_CERT}", pem=True
        )
        node_cert = _parse_cert(
            _read_bounded(d / NODE_CERT, MAX_CERT, "node certificate"),
            f"{d / NODE_CERT}",
            pem=True,
        )
        try:
            ca_public = _check_ca_cert(ca_cert, f"{d / CA_CERT}")
            # An expired certificate still loads (peers will refuse it; 'estate show' says so).
            node_id = _node_id_from_cert(node_cert, ca_cert, f"{d / NODE_CERT}", check_time=False)
        except PeerRejected as e:
            raise IntegrityError(f"{e}: the estate files are damaged") from None
        if node_id != home.node_id():
            raise IntegrityError(f"{d / NODE_CERT} belongs to node {node_id.hex()}, not this one")
        data = _read_bounded(d / REVOCATIONS, MAX_REVOCATION_LIST, "revocation list")
        try:
            revocations = decode_revocations(data, ca_public, estate_id_of(ca_public))
        except IntegrityError as e:
            raise IntegrityError(f"{d / REVOCATIONS} is damaged: {e}") from None
        ca_key = None
        if (d / CA_KEY).exists():
            ca_key = SigningKey.load(d / CA_KEY)
            if ca_key.public_bytes() != ca_public:
                raise IntegrityError(f"{d / CA_KEY} does not match {d / CA_CERT}")
        estate = cls(home, ca_cert, node_cert, node_id, revocations, ca_key)
        left = estate.node_cert_expiry - _now()
        if left < EXPIRY_WARNING:
            log.warning(
                "this node's estate certificate %s on %s: ask the admin to approve a new "
                "request-join",
                "expired" if left.total_seconds() < 0 else "expires",
                estate.node_cert_expiry.date(),
            )
        if estate.is_revoked(node_id):
            log.error("this node is revoked by its estate: peers will refuse it")
        return estate

    # -- facts ---------------------------------------------------------------------

    @property
    def is_admin(self) -> bool:
        """Whether this node holds the estate CA key."""
        return self._ca_key is not None

    @property
    def node_cert_expiry(self) -> datetime.datetime:
        return self._node_cert.not_valid_after_utc

    @property
    def revocation_number(self) -> int:
        return self._revocations.number

    @property
    def revoked(self) -> list[bytes]:
        return sorted(self._revocations.revoked)

    def is_revoked(self, node_id: bytes) -> bool:
        return node_id in self._revocations.revoked

    # -- TLS -------------------------------------------------------------------------

    def _context(self, *, server: bool) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.maximum_version = ssl.TLSVersion.TLSv1_3
        # Peers are identified by the node id in their certificate, not by a host name.
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.verify_flags |= ssl.VERIFY_X509_STRICT
        if server:
            ctx.num_tickets = 0  # no session resumption: every connection shows its certificate
        try:
            ctx.load_verify_locations(cadata=self._ca_pem)  # the estate CA is the only anchor
            ctx.load_cert_chain(self.home.estate_dir / NODE_CERT, self.home.node_key)
        except (ssl.SSLError, OSError) as e:
            raise P2pfsError(f"cannot set up TLS from {self.home.estate_dir}: {e}") from None
        return ctx

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3 only; requires a client certificate issued by the estate CA."""
        if self._server_ctx is None:
            self._server_ctx = self._context(server=True)
        return self._server_ctx

    def client_context(self) -> ssl.SSLContext:
        """TLS 1.3 only; the server's certificate must be issued by the estate CA."""
        if self._client_ctx is None:
            self._client_ctx = self._context(server=False)
        return self._client_ctx

    def peer_node_id(self, cert_der: bytes) -> NodeId:
        """The node id of a peer's certificate; PeerRejected if it is not a live member's.

        Called right after every handshake. It checks again what OpenSSL checked
        (issued by our CA, valid now) and then what only we know: the node id
        matches the key, and the node is not revoked by the newest list we hold.
        """
        if not isinstance(cert_der, bytes) or not cert_der:
            raise PeerRejected("the peer sent no certificate")
        try:
            cert = _parse_cert(cert_der, "the peer certificate", pem=False)
        except DecodeError as e:
            raise PeerRejected(str(e)) from None
        node_id = _node_id_from_cert(cert, self._ca_cert, "the peer certificate")
        if self.is_revoked(node_id):
            raise PeerRejected(
                f"node {node_id.hex()} is revoked (revocation list {self.revocation_number})"
            )
        return node_id

    # -- revocation ------------------------------------------------------------------

    def revocation_list(self) -> bytes:
        """The newest signed list this node holds, as bytes to hand to peers."""
        return self._revocations.encoded

    def accept_revocation_list(self, data: bytes) -> bool:
        """Take a list from a peer: True if it was newer and is now stored and in force.

        SignatureError if the CA did not sign it, DecodeError if it is malformed.
        """
        fresh = decode_revocations(data, self._ca_public, self.estate_id)
        if fresh.number <= self._revocations.number:
            return False
        write_atomic(self.home.estate_dir / REVOCATIONS, fresh.encoded, 0o644)
        added = fresh.revoked - self._revocations.revoked
        self._revocations = fresh  # one assignment: readers see the old list or the new
        log.info(
            "revocation list %d accepted; newly revoked: %s",
            fresh.number,
            ", ".join(sorted(n.hex() for n in added)) or "none",
        )
        return True

    # -- endorsement -----------------------------------------------------------------

    def endorse(self, volume_id: bytes, name: str) -> bytes:
        """The CA's signature saying volume key ``volume_id`` is the estate's volume ``name``."""
        if self._ca_key is None:
            raise P2pfsError("only the admin node (it holds the estate CA key) can endorse volumes")
        return self._ca_key.sign(_endorsement_message(self.estate_id, volume_id, name))

    def verify_endorsement(self, volume_id: bytes, name: str, endorsement: bytes) -> None:
        """SignatureError unless this estate's CA endorsed ``volume_id`` as ``name``."""
        message = _endorsement_message(self.estate_id, volume_id, name)
        try:
            verify(self._ca_public, endorsement, message)
        except SignatureError:
            raise SignatureError(
                f"volume {name!r} ({volume_id.hex()[:16]}) is not endorsed by this estate"
            ) from None

    def _issue(self, public: Ed25519PublicKey) -> x509.Certificate:
        assert self._ca_key is not None
        return _issue_node_cert(self._ca_key, self._ca_cert, public)

    def _bundle(self, node_cert: x509.Certificate) -> bytes:
        return codec.pack(
            {
                "format": _BUNDLE_FORMAT,
                "v": _BUNDLE_VERSION,
                "estate": self.estate_id,
                "ca": _der(self._ca_cert),
                "node": _der(node_cert),
                "revocations": self._revocations.encoded,
            }
        )

    def __repr__(self) -> str:
        return (
            f"Estate(id={self.estate_id.hex()}, node={self.node_id.hex()}, "
            f"admin={self.is_admin}, revocations={self.revocation_number})"
        )


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


# -- the steps of enrolment -------------------------------------------------------


def init_estate(home: Home) -> Estate:
    """Admin: create the estate CA, an empty revocation list, and enrol this node."""
    key = _node_key(home)
    with _admin_lock(home):
        d = home.estate_dir
        existing = Estate.load(home)
        if existing is not None:
            role = "holds" if existing.is_admin else "is a member of"
            raise P2pfsError(
                f"this node already {role} estate {existing.estate_id.hex()}; not creating another"
            )
        ca_key = SigningKey.generate()
        ca_key.save(d / CA_KEY)
        ca_cert = _make_ca_cert(ca_key)
        estate_id = estate_id_of(ca_key.public_bytes())
        write_atomic(d / CA_CERT, _pem(ca_cert), 0o644)
        revocations = _sign_revocations(ca_key, estate_id, 1, frozenset())
        write_atomic(d / REVOCATIONS, revocations, 0o644)
        node_cert = _issue_node_cert(ca_key, ca_cert, key.private_key.public_key())
        write_atomic(d / NODE_CERT, _pem(node_cert), 0o644)  # last: it makes the node a member
    log.info("created estate %s with admin node %s", estate_id.hex(), home.node_id().hex())
    estate = Estate.load(home)
    assert estate is not None
    return estate


def request_join(home: Home) -> bytes:
    """Desktop: a PEM certificate signing request made with this node's own key."""
    key = _node_key(home)
    node_id = node_id_of(key.public_bytes()).hex()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(key.private_key, None)
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def parse_request(request: bytes) -> tuple[NodeId, Ed25519PublicKey]:
    """Check a join request: signed by its key, and its CN is that key's node id."""
    if not isinstance(request, bytes) or not request.strip():
        raise DecodeError("the join request is empty")
    if len(request) > MAX_REQUEST:
        raise DecodeError(
            f"the join request is {len(request)} bytes, more than the limit of {MAX_REQUEST}"
        )
    try:
        with _warnings_are_errors():
            csr = x509.load_pem_x509_csr(request)
    except Exception:  # the message of the PEM loader is a paragraph with a URL
        raise DecodeError("the join request is not a PEM certificate signing request") from None
    try:
        public = csr.public_key()
        signed = csr.is_signature_valid
        cns = csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    except Exception as e:
        raise DecodeError(f"the join request is malformed ({e or type(e).__name__})") from None
    if not isinstance(public, Ed25519PublicKey):
        raise P2pfsError(f"the join request holds a {type(public).__name__}, not an Ed25519 key")
    if not signed:
        raise SignatureError("the join request's signature does not verify")
    node_id = node_id_of(_raw_public(public))
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise DecodeError("the join request must name exactly one node id (CN)")
    if cns[0].value != node_id.hex():
        raise P2pfsError(
            f"the join request names node {cns[0].value[:64]!r} but its key is node "
            f"{node_id.hex()}: refusing it"
        )
    return node_id, public


def approve(home: Home, request: bytes) -> bytes:
    """Admin: check a join request and answer it with a bundle (certificate, CA, revocations)."""
    estate = _require_admin(home)
    node_id, public = parse_request(request)
    if estate.is_revoked(node_id):
        raise P2pfsError(f"node {node_id.hex()} is revoked; it cannot rejoin with this key")
    cert = estate._issue(public)
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
        _parse_cert(doc["ca"], "the bundle's CA certificate", pem=False),
        _parse_cert(doc["node"], "the bundle's node certificate", pem=False),
        doc["revocations"],
    )


def join(home: Home, bundle: bytes) -> Estate:
    """Desktop: check the admin's bundle against this node and store it: the node is a member."""
    key = _node_key(home)
    b = parse_bundle(bundle)
    ca_public = _check_ca_cert(b.ca_cert, "the bundle's CA certificate")
    estate_id = estate_id_of(ca_public)
    if b.estate_id != estate_id:
        raise IntegrityError("the join bundle names another estate than its CA certificate")
    node_id = _node_id_from_cert(b.node_cert, b.ca_cert, "the bundle's node certificate")
    mine = node_id_of(key.public_bytes())
    if node_id != mine or _cert_public(b.node_cert, "") != key.public_bytes():
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
    write_atomic(d / CA_CERT, _pem(b.ca_cert), 0o644)
    write_atomic(d / REVOCATIONS, revocations.encoded, 0o644)
    write_atomic(d / NODE_CERT, _pem(b.node_cert), 0o644)  # last: it makes the node a member
    log.info("joined estate %s as node %s", estate_id.hex(), mine.hex())
    estate = Estate.load(home)
    assert estate is not None
    return estate


def revoke(home: Home, node_id: bytes) -> int:
    """Admin: add ``node_id`` to the revocation list and re-sign it; returns the list's number."""
    if not isinstance(node_id, bytes) or len(node_id) != NODE_ID_SIZE:
        raise P2pfsError(f"a node id is {NODE_ID_SIZE} bytes ({NODE_ID_SIZE * 2} hex digits)")
    home.require()
    with _admin_lock(home):
        estate = _require_admin(home)
        if node_id == estate.node_id:
            raise P2pfsError("refusing to revoke the admin node itself")
        if estate.is_revoked(node_id):
            return estate.revocation_number
        assert estate._ca_key is not None
        fresh = _sign_revocations(
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
