"""Credentials of the desktop link (appliance mode): the appliance's TLS key, desktop tokens.

In appliance mode the daemon serves desktops only their *user* face (see
``node/desktop_api.py``) on a host-only link. This module owns what proves who is
who there (``ssl`` and ``cryptography`` stay inside the trust package and keys.py):

- the appliance's own TLS certificate for that link: a self-signed Ed25519
  certificate made on first use, separate from the estate node key, so nothing
  the desktop link exposes is the key that speaks for the node in the estate;
- one token per desktop. The admin makes it (``p2pfs appliance token add``); the
  file handed to the desktop carries the desktop's name, a 256-bit secret and the
  SHA-256 fingerprint of the appliance's certificate, which the client pins (no CA
  is involved: the token file is the trust anchor). The appliance keeps only a
  BLAKE3 digest of each secret, so reading its token folder gives nobody a token,
  and compares digests in constant time.

Layout (``HOME/appliance/``, mode 0700)::

    link.key            the link's Ed25519 TLS key (0600)
    link.pem            its self-signed certificate
    handles.key         32 random bytes keying read handles (0600)
    tokens/NAME.token   one desktop: {"desktop", "digest", "created"} (0600)

Removing a token file shuts the desktop out at its next connection attempt: it
is read for every connection, never cached; the desktop link also rereads it for
every live session (``token_digest``), so removing or replacing a token ends that
desktop's open sessions within a second.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import hmac
import json
import logging
import os
import secrets
import ssl
import time
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from p2pfs.errors import NotFound, P2pfsError, UsageError
from p2pfs.fsutil import read_bounded, write_atomic
from p2pfs.home import Home
from p2pfs.ids import derive
from p2pfs.keys import SigningKey
from p2pfs.names import check_desktop_name, name_problem

log = logging.getLogger(__name__)

APPLIANCE_DIR = "appliance"
TOKEN_FORMAT = "p2pfs-desktop-token"
TOKEN_VERSION = 1
SECRET_SIZE = 32
MAX_TOKEN_FILE = 16 * 1024
CERT_VALIDITY = datetime.timedelta(days=20 * 365)
_DIGEST_DOMAIN = b"p2pfs-desktop-token-v1\0"


class TokenRefused(P2pfsError):
    """A desktop's token is unknown, wrong, or for another appliance."""

    errno = errno.EACCES


@dataclass(frozen=True)
class DesktopToken:
    """What a desktop holds: who it is, its secret, and the appliance it trusts."""

    desktop: str
    secret: bytes
    server_fingerprint: bytes  # SHA-256 of the appliance's link certificate (DER)
    appliance: str | None  # the address the admin wrote in, if any

    def encode(self) -> bytes:
        doc = {
            "format": TOKEN_FORMAT,
            "version": TOKEN_VERSION,
            "desktop": self.desktop,
            "secret": self.secret.hex(),
            "server_cert_sha256": self.server_fingerprint.hex(),
            "appliance": self.appliance,
        }
        return json.dumps(doc, indent=2).encode() + b"\n"


def secret_digest(secret: bytes) -> bytes:
    return derive(_DIGEST_DOMAIN, secret)


def fingerprint(cert_der: bytes) -> bytes:
    return hashlib.sha256(cert_der).digest()


def load_token(path: Path) -> DesktopToken:
    """Read a desktop's token file; a one-line error naming what is wrong with it."""
    data = read_bounded(path, MAX_TOKEN_FILE, "token file")
    try:
        doc = json.loads(data)
        if doc.get("format") != TOKEN_FORMAT or doc.get("version") != TOKEN_VERSION:
            raise ValueError("not a p2pfs desktop token (format/version)")
        secret = bytes.fromhex(doc["secret"])
        fp = bytes.fromhex(doc["server_cert_sha256"])
        if len(secret) != SECRET_SIZE or len(fp) != 32:
            raise ValueError("secret or fingerprint has the wrong length")
        appliance = doc.get("appliance")
        if appliance is not None and not isinstance(appliance, str):
            raise ValueError("appliance must be an address")
        token = DesktopToken(check_desktop_name(doc["desktop"]), secret, fp, appliance)
    # RecursionError: json.loads of "[[[[..." deeper than the interpreter's stack.
    except (ValueError, KeyError, TypeError, AttributeError, UsageError, RecursionError) as e:
        raise P2pfsError(f"token file {path} is damaged: {e}") from None
    if os.stat(path).st_mode & 0o077:
        log.warning("token file %s is readable by others; it should be mode 0600", path)
    return token


class ApplianceKeys:
    """The appliance side: its link certificate, handle key and the desktops' token digests."""

    def __init__(self, home: Home) -> None:
        self.home = home
        self.root = home.root / APPLIANCE_DIR
        self.tokens_dir = self.root / "tokens"
        self.key_path = self.root / "link.key"
        self.cert_path = self.root / "link.pem"
        self.handles_path = self.root / "handles.key"

    # -- setup ---------------------------------------------------------------

    def ensure(self) -> ApplianceKeys:
        """Create the link key, certificate and handle key if missing (idempotent)."""
        self.home.require()
        self.root.mkdir(mode=0o700, exist_ok=True)
        self.tokens_dir.mkdir(mode=0o700, exist_ok=True)
        if not self.key_path.exists():
            SigningKey.generate().save(self.key_path)
            self.cert_path.unlink(missing_ok=True)
        if not self.cert_path.exists():
            write_atomic(self.cert_path, self._self_signed(SigningKey.load(self.key_path)))
        if not self.handles_path.exists():
            write_atomic(self.handles_path, secrets.token_bytes(32), 0o600)
        return self

    def _self_signed(self, key: SigningKey) -> bytes:
        name = x509.Name(
            [
                x509.NameAttribute(
                    NameOID.COMMON_NAME, f"p2pfs appliance {self.home.node_id().hex()}"
                )
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.private_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + CERT_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key.private_key, None)
        )
        return cert.public_bytes(serialization.Encoding.PEM)

    def cert_der(self) -> bytes:
        pem = read_bounded(self.cert_path, MAX_TOKEN_FILE, "link certificate")
        cert = x509.load_pem_x509_certificate(pem)
        return cert.public_bytes(serialization.Encoding.DER)

    def handle_key(self) -> bytes:
        key = read_bounded(self.handles_path, MAX_TOKEN_FILE, "handle key")
        if len(key) != 32:
            raise P2pfsError(f"{self.handles_path} is damaged: remove it and restart the daemon")
        return key

    def server_context(self) -> ssl.SSLContext:
        """TLS 1.3 with the link certificate; clients authenticate with a token inside."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.num_tickets = 0
        try:
            ctx.load_cert_chain(self.cert_path, self.key_path)
        except (ssl.SSLError, OSError) as e:
            raise P2pfsError(
                f"cannot set up the desktop link's TLS from {self.root}: {e}"
            ) from None
        return ctx

    # -- tokens --------------------------------------------------------------

    def _token_path(self, desktop: str) -> Path:
        return self.tokens_dir / f"{check_desktop_name(desktop)}.token"

    def add(self, desktop: str, appliance: str | None = None) -> DesktopToken:
        """A new token for ``desktop`` (replacing any old one, which stops working)."""
        self.ensure()
        secret = secrets.token_bytes(SECRET_SIZE)
        record = {
            "desktop": desktop,
            "digest": secret_digest(secret).hex(),
            "created": int(time.time()),
        }
        write_atomic(self._token_path(desktop), json.dumps(record).encode() + b"\n", 0o600)
        return DesktopToken(desktop, secret, fingerprint(self.cert_der()), appliance)

    def remove(self, desktop: str) -> None:
        path = self._token_path(desktop)
        if not path.exists():
            raise NotFound(f"no token for desktop {desktop!r}")
        path.unlink()

    def desktops(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = []
        if not self.tokens_dir.is_dir():
            return out
        for path in sorted(self.tokens_dir.glob("*.token")):
            try:
                doc = json.loads(read_bounded(path, MAX_TOKEN_FILE, "token record"))
                out.append({"desktop": doc["desktop"], "created": int(doc["created"])})
            # OverflowError: int() of an Infinity; RecursionError: JSON nested too deeply.
            except (P2pfsError, ValueError, KeyError, TypeError, OverflowError, RecursionError):
                out.append({"desktop": path.stem, "created": None, "damaged": True})
        return out

    def token_digest(self, desktop: str) -> bytes | None:
        """The stored digest of ``desktop``'s current token; None if it has none (removed,
        damaged, or not a desktop name). Read from disk on every call, never cached: the
        desktop link compares it with what a session authenticated with, so a removed or
        replaced token ends that session (node/desktop_api.py). Blocking."""
        if name_problem(desktop) is not None:
            return None
        path = self.tokens_dir / f"{desktop}.token"
        try:
            doc = json.loads(read_bounded(path, MAX_TOKEN_FILE, "token record"))
            digest = bytes.fromhex(doc["digest"])
        except (P2pfsError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
            return None
        if doc.get("desktop") != desktop or len(digest) != 32:
            return None
        return digest

    def check(self, desktop: object, secret: object) -> str:
        """The desktop's name if its secret matches the stored digest; TokenRefused otherwise.

        The same answer for an unknown desktop and a wrong secret, and a constant-time
        comparison against a digest (a dummy one when the desktop is unknown).
        """
        if not isinstance(desktop, str) or not isinstance(secret, bytes):
            raise TokenRefused("refused: the desktop link needs a desktop name and a token")
        digest = self.token_digest(desktop)
        known = digest is not None
        ok = hmac.compare_digest(secret_digest(secret), digest or bytes(32))
        if not (ok and known):
            raise TokenRefused(f"refused: no valid token for desktop {desktop[:63]!r}")
        return desktop


def client_context() -> ssl.SSLContext:
    """TLS 1.3 for the desktop side; the appliance's certificate is checked by its pinned
    fingerprint right after the handshake (``check_pinned``), not against a CA."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


def check_pinned(cert_der: bytes | None, token: DesktopToken) -> None:
    if not cert_der or not hmac.compare_digest(fingerprint(cert_der), token.server_fingerprint):
        raise TokenRefused(
            "the appliance's certificate does not match the fingerprint in the token file: "
            "wrong address, or not the appliance that issued this token"
        )
