"""This node's membership of its estate: the CA certificate, its own, the revocation list.

An estate is one Ed25519 certificate authority held by the admin node; its id is
a BLAKE3 digest of the CA public key, so a CA certificate proves which estate it
is. Every member node, the admin included, holds a certificate issued by the CA
for its own node key (``HOME/node.key``, which never leaves the node); the TLS key
of a node is its node key (Ed25519 certificates in TLS 1.3: OpenSSL 3 supports
them, checked by tests/t6_estate_test.py over real sockets). Certificates:
``certs.py``; revocation lists and endorsements: ``revocation.py``; TLS contexts:
``contexts.py``; enrolment: ``enrolment.py``.

Layout (``HOME/estate/``)::

    ca.key        the CA private key, on the admin node only (0600)
    ca.pem        the CA certificate (self-signed)
    node.pem      this node's certificate, issued by the CA
    revocations   the newest CA-signed revocation list this node has seen
    access        the newest CA-signed access list (private volumes), if any
    nodes.json    (admin) each approved node's public key, to seal volume secrets to
    grants.json   (admin) each private volume's grants as given (groups unexpanded)
    groups.json   (admin) groups of node ids that grants may name

The revocation list is checked by ``Estate.peer_node_id`` right after every
handshake, not by OpenSSL, so a newer list applies at once to every new
connection without rebuilding the TLS contexts. See docs/estate.md.

Every input (join request, bundle, revocation list, peer certificate) is hostile:
size-bounded, fully checked, and refused with a one-line ``P2pfsError``.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import ssl
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from p2pfs.errors import DecodeError, IntegrityError, P2pfsError, SignatureError
from p2pfs.fsutil import locked, read_bounded, write_atomic
from p2pfs.home import Home, node_id_of
from p2pfs.ids import NodeId
from p2pfs.keys import SigningKey, verify
from p2pfs.objects import codec

from .access import EMPTY, MAX_ACCESS_LIST, AccessList, decode_access
from .certs import (
    EXPIRY_WARNING,
    MAX_CERT,
    PeerRejected,
    cert_public,
    check_ca_cert,
    estate_id_of,
    issue_node_cert,
    node_id_from_cert,
    parse_cert,
    to_der,
    to_pem,
    utc_now,
)
from .contexts import tls_context
from .revocation import (
    MAX_REVOCATION_LIST,
    RevocationList,
    decode_revocations,
    endorsement_message,
)

log = logging.getLogger(__name__)

ESTATE_DIR = "estate"  # under the node home: HOME/estate/
CA_KEY = "ca.key"
CA_CERT = "ca.pem"
NODE_CERT = "node.pem"
REVOCATIONS = "revocations"
ACCESS = "access"
_LOCK = ".lock"


_BUNDLE_FORMAT = "p2pfs-join-bundle"
_BUNDLE_VERSION = 1


# -- files ---------------------------------------------------------------------


@contextlib.contextmanager
def admin_lock(home: Home) -> Iterator[None]:
    """Serialize the admin's changes (init, revoke): two revocations must not share a number."""
    home.estate_dir.mkdir(mode=0o700, exist_ok=True)
    with locked(home.estate_dir / _LOCK):
        yield


def node_key(home: Home) -> SigningKey:
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
        access: AccessList = EMPTY,
    ) -> None:
        self.home = home
        self._ca_cert = ca_cert
        self._ca_pem = to_pem(ca_cert).decode("ascii")
        self._ca_public = cert_public(ca_cert, "the CA certificate")
        self.estate_id = estate_id_of(self._ca_public)
        self._node_cert = node_cert
        self.node_id: bytes = node_id
        self._ca_key = ca_key
        self._revocations = revocations
        self._access = access
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
        ca_cert = parse_cert(
            read_bounded(d / CA_CERT, MAX_CERT, "CA certificate", too_large=DecodeError),
            f"{d / CA_CERT}",
            pem=True,
        )
        node_cert = parse_cert(
            read_bounded(d / NODE_CERT, MAX_CERT, "node certificate", too_large=DecodeError),
            f"{d / NODE_CERT}",
            pem=True,
        )
        try:
            ca_public = check_ca_cert(ca_cert, f"{d / CA_CERT}")
            # An expired certificate still loads (peers will refuse it; 'estate show' says so).
            node_id = node_id_from_cert(node_cert, ca_cert, f"{d / NODE_CERT}", check_time=False)
        except PeerRejected as e:
            raise IntegrityError(f"{e}: the estate files are damaged") from None
        if node_id != home.node_id():
            raise IntegrityError(f"{d / NODE_CERT} belongs to node {node_id.hex()}, not this one")
        data = read_bounded(
            d / REVOCATIONS, MAX_REVOCATION_LIST, "revocation list", too_large=DecodeError
        )
        try:
            revocations = decode_revocations(data, ca_public, estate_id_of(ca_public))
        except IntegrityError as e:
            raise IntegrityError(f"{d / REVOCATIONS} is damaged: {e}") from None
        access = EMPTY
        if (d / ACCESS).exists():
            data = read_bounded(d / ACCESS, MAX_ACCESS_LIST, "access list", too_large=DecodeError)
            try:
                access = decode_access(data, ca_public, estate_id_of(ca_public))
            except (DecodeError, IntegrityError) as e:
                raise IntegrityError(f"{d / ACCESS} is damaged: {e}") from None
        ca_key = None
        if (d / CA_KEY).exists():
            ca_key = SigningKey.load(d / CA_KEY)
            if ca_key.public_bytes() != ca_public:
                raise IntegrityError(f"{d / CA_KEY} does not match {d / CA_CERT}")
        estate = cls(home, ca_cert, node_cert, node_id, revocations, ca_key, access)
        left = estate.node_cert_expiry - utc_now()
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
    def node_cert_validity(self) -> tuple[datetime.datetime, datetime.datetime]:
        """(not before, not after) of this node's certificate, in UTC."""
        return self._node_cert.not_valid_before_utc, self._node_cert.not_valid_after_utc

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
        return tls_context(
            server=server,
            ca_pem=self._ca_pem,
            cert_file=self.home.estate_dir / NODE_CERT,
            key_file=self.home.node_key,
        )

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
            cert = parse_cert(cert_der, "the peer certificate", pem=False)
        except DecodeError as e:
            raise PeerRejected(str(e)) from None
        node_id = node_id_from_cert(cert, self._ca_cert, "the peer certificate")
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

    # -- access ----------------------------------------------------------------------

    @property
    def access(self) -> AccessList:
        """The newest access list held (number 0 when the estate has no private volume)."""
        return self._access

    def accept_access_list(self, data: bytes) -> bool:
        """Take an access list: True if it was newer and is now stored and in force.

        SignatureError if the CA did not sign it, DecodeError if it is malformed.
        """
        fresh = decode_access(data, self._ca_public, self.estate_id)
        if fresh.number <= self._access.number:
            return False
        write_atomic(self.home.estate_dir / ACCESS, fresh.encoded, 0o644)
        self._access = fresh  # one assignment: readers see the old list or the new
        log.info("access list %d accepted (%d private volumes)", fresh.number, len(fresh.volumes))
        return True

    # -- endorsement -----------------------------------------------------------------

    def endorse(self, volume_id: bytes, name: str) -> bytes:
        """The CA's signature saying volume key ``volume_id`` is the estate's volume ``name``."""
        if self._ca_key is None:
            raise P2pfsError("only the admin node (it holds the estate CA key) can endorse volumes")
        return self._ca_key.sign(endorsement_message(self.estate_id, volume_id, name))

    def verify_endorsement(self, volume_id: bytes, name: str, endorsement: bytes) -> None:
        """SignatureError unless this estate's CA endorsed ``volume_id`` as ``name``."""
        message = endorsement_message(self.estate_id, volume_id, name)
        try:
            verify(self._ca_public, endorsement, message)
        except SignatureError:
            raise SignatureError(
                f"volume {name!r} ({volume_id.hex()[:16]}) is not endorsed by this estate"
            ) from None

    def _issue(self, public: Ed25519PublicKey) -> x509.Certificate:
        assert self._ca_key is not None
        return issue_node_cert(self._ca_key, self._ca_cert, public)

    def _bundle(self, node_cert: x509.Certificate) -> bytes:
        return codec.pack(
            {
                "format": _BUNDLE_FORMAT,
                "v": _BUNDLE_VERSION,
                "estate": self.estate_id,
                "ca": to_der(self._ca_cert),
                "node": to_der(node_cert),
                "revocations": self._revocations.encoded,
            }
        )

    def __repr__(self) -> str:
        return (
            f"Estate(id={self.estate_id.hex()}, node={self.node_id.hex()}, "
            f"admin={self.is_admin}, revocations={self.revocation_number})"
        )
