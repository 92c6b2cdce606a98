"""Estate certificates: the CA's, node certificates, join requests (``cryptography``).

The certificate's public key *is* the node's identity (node id = ``node_id_of`` of
it), and its CN and SAN URI ``p2pfs://node/<hex>`` repeat that id. Every
certificate and request is hostile input: size-bounded, checked field by field
and refused with a one-line error.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import warnings
from collections.abc import Iterator

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from p2pfs.errors import DecodeError, P2pfsError, SignatureError
from p2pfs.home import node_id_of
from p2pfs.ids import NodeId, derive
from p2pfs.keys import SigningKey

ESTATE_ID_SIZE = 16


CA_VALIDITY = datetime.timedelta(days=20 * 365)


NODE_VALIDITY = datetime.timedelta(days=2 * 365)


CLOCK_SKEW = datetime.timedelta(hours=1)  # certificates start this much in the past


EXPIRY_WARNING = datetime.timedelta(days=30)


# Bounds on hostile input. A certificate of ours is ~600 bytes, a request ~300.
MAX_CERT = 16 * 1024


MAX_REQUEST = 16 * 1024


# Domain separation: a signature made for one purpose never verifies for another.
_ESTATE_ID_DOMAIN = b"p2pfs-estate-id\0"


_NODE_URI = "p2pfs://node/"


_SIGNATURE_BITS = b"\x03\x41\x00"  # DER: BIT STRING, 65 bytes, 0 unused bits


class PeerRejected(P2pfsError):
    """A peer certificate that must not be trusted: not the estate's, no node id, or revoked."""

    errno = errno.EACCES


def estate_id_of(ca_public_key: bytes) -> bytes:
    """The estate id: 16 bytes of BLAKE3 over the CA's raw Ed25519 public key."""
    return derive(_ESTATE_ID_DOMAIN, ca_public_key, ESTATE_ID_SIZE)


def utc_now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def raw_public(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


@contextlib.contextmanager
def warnings_are_errors() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


def parse_cert(data: bytes, what: str, *, pem: bool) -> x509.Certificate:
    if not isinstance(data, bytes) or not data:
        raise DecodeError(f"{what} is empty")
    if len(data) > MAX_CERT:
        raise DecodeError(f"{what} is {len(data)} bytes, more than the limit of {MAX_CERT}")
    try:
        # A warning from the parser (e.g. "a negative serial number will not load in a
        # future release") refuses the certificate: what is dubious now may break later.
        # (catch_warnings is process-wide: a warning from another thread during the
        # parse may be lost; the CLI and the event loop parse, no worker thread does.)
        with warnings_are_errors():
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


def cert_public(cert: x509.Certificate, what: str) -> bytes:
    try:
        key = cert.public_key()
    except Exception as e:  # unsupported or malformed key algorithms
        raise PeerRejected(f"{what} has an unusable public key ({type(e).__name__})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise PeerRejected(f"{what} holds a {type(key).__name__}, not an Ed25519 key")
    return raw_public(key)


def check_ca_cert(cert: x509.Certificate, what: str) -> bytes:
    """A self-signed Ed25519 CA certificate: return its raw public key."""
    public = cert_public(cert, what)
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


def node_id_from_cert(
    cert: x509.Certificate, ca: x509.Certificate, what: str, *, check_time: bool = True
) -> NodeId:
    """The node id a certificate issued by ``ca`` proves; PeerRejected if it proves none."""
    try:
        cert.verify_directly_issued_by(ca)
    except Exception:
        raise PeerRejected(f"{what} is not issued by this estate's CA") from None
    node_id = node_id_of(cert_public(cert, what))
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
    now = utc_now()
    if check_time and not start - CLOCK_SKEW <= now <= end:
        raise PeerRejected(f"{what} of node {expected} is not valid now (valid {start} to {end})")
    return node_id


def issue_node_cert(
    ca_key: SigningKey, ca: x509.Certificate, public: Ed25519PublicKey
) -> x509.Certificate:
    node_id = node_id_of(raw_public(public)).hex()
    now = utc_now()
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


def make_ca_cert(ca_key: SigningKey) -> x509.Certificate:
    public = ca_key.private_key.public_key()
    estate_id = estate_id_of(raw_public(public))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"p2pfs estate {estate_id.hex()}")])
    now = utc_now()
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


def to_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def to_der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def parse_request(request: bytes) -> tuple[NodeId, Ed25519PublicKey]:
    """Check a join request: signed by its key, and its CN is that key's node id."""
    if not isinstance(request, bytes) or not request.strip():
        raise DecodeError("the join request is empty")
    if len(request) > MAX_REQUEST:
        raise DecodeError(
            f"the join request is {len(request)} bytes, more than the limit of {MAX_REQUEST}"
        )
    try:
        with warnings_are_errors():
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
    node_id = node_id_of(raw_public(public))
    if len(cns) != 1 or not isinstance(cns[0].value, str):
        raise DecodeError("the join request must name exactly one node id (CN)")
    if cns[0].value != node_id.hex():
        raise P2pfsError(
            f"the join request names node {cns[0].value[:64]!r} but its key is node "
            f"{node_id.hex()}: refusing it"
        )
    return node_id, public


def make_request(key: SigningKey) -> bytes:
    """A PEM certificate signing request made with a node's own key."""
    node_id = node_id_of(key.public_bytes()).hex()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_id)]))
        .sign(key.private_key, None)
    )
    return csr.public_bytes(serialization.Encoding.PEM)
