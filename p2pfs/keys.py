"""Ed25519 keys and signatures: the only module that imports ``cryptography`` for them,
and sealed boxes to a node's Ed25519 key (PyNaCl's one home).

A key file is an unencrypted PKCS#8 PEM private key (``openssl pkey -in FILE``
reads it), written atomically with mode 0600. A public key is its 32 raw bytes.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from nacl.bindings import (
    crypto_box_seal,
    crypto_box_seal_open,
    crypto_sign_ed25519_pk_to_curve25519,
    crypto_sign_ed25519_sk_to_curve25519,
)
from nacl.exceptions import CryptoError

from p2pfs.errors import IntegrityError, NotFound, P2pfsError, SignatureError
from p2pfs.fsutil import write_atomic

log = logging.getLogger(__name__)

PUBLIC_KEY_SIZE = 32
SIGNATURE_SIZE = 64
_MAX_KEY_FILE = 64 * 1024


class SigningKey:
    """An Ed25519 private key."""

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key

    @classmethod
    def generate(cls) -> SigningKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: Path) -> SigningKey:
        """Read a key file; NotFound if it is missing, UsageError if it is not a key."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                pem = f.read(_MAX_KEY_FILE + 1)
        except FileNotFoundError:
            raise NotFound(f"key file {path} does not exist") from None
        except IsADirectoryError:
            raise P2pfsError(f"key file {path} is a directory") from None
        except PermissionError:
            raise P2pfsError(f"key file {path} is not readable (permission denied)") from None
        if len(pem) > _MAX_KEY_FILE:
            raise P2pfsError(f"key file {path} is too large to be a key")
        if st.st_mode & 0o077:
            log.warning(
                "key file %s is readable by others (mode %o); it should be 0600",
                path,
                st.st_mode & 0o777,
            )
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError, UnicodeError) as e:
            raise P2pfsError(f"key file {path} is not a valid Ed25519 key: {e}") from None
        except Exception as e:  # the backend may raise its own types for garbage
            raise P2pfsError(
                f"key file {path} is not a valid Ed25519 key ({type(e).__name__})"
            ) from None
        if not isinstance(key, Ed25519PrivateKey):
            raise P2pfsError(f"key file {path} holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key)

    def save(self, path: Path, *, overwrite: bool = False) -> None:
        """Write the key to ``path`` atomically with mode 0600.

        An existing file is refused unless ``overwrite``: losing a publisher key
        loses the ability to publish its volume.
        """
        path = Path(path)
        pem = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            write_atomic(path, pem, 0o600, overwrite=overwrite)
        except FileExistsError:
            raise P2pfsError(f"key file {path} already exists; not overwriting it") from None

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """The underlying key, for the estate module to sign certificates and CSRs with."""
        return self._key

    def public_bytes(self) -> bytes:
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def open_box(self, box: bytes) -> bytes:
        """What ``seal_box`` sealed to this key; IntegrityError if it was not for us."""
        seed = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        public = self.public_bytes()
        # libsodium's Ed25519 secret key is the seed followed by the public key.
        secret = crypto_sign_ed25519_sk_to_curve25519(seed + public)
        try:
            return bytes(
                crypto_box_seal_open(box, crypto_sign_ed25519_pk_to_curve25519(public), secret)
            )
        except CryptoError:
            raise IntegrityError("a sealed box does not open with this node's key") from None

    def __repr__(self) -> str:
        return f"SigningKey(public={self.public_bytes().hex()})"


def verify(public: bytes, signature: bytes, data: bytes) -> None:
    """Check an Ed25519 signature; SignatureError if it does not verify."""
    if not isinstance(public, bytes) or len(public) != PUBLIC_KEY_SIZE:
        raise SignatureError(f"a public key must be {PUBLIC_KEY_SIZE} bytes")
    if not isinstance(signature, bytes) or len(signature) != SIGNATURE_SIZE:
        raise SignatureError(f"a signature must be {SIGNATURE_SIZE} bytes")
    try:
        Ed25519PublicKey.from_public_bytes(public).verify(signature, data)
    except InvalidSignature:
        raise SignatureError("signature does not verify") from None
    except ValueError as e:
        raise SignatureError(f"invalid public key: {e}") from None


BOX_OVERHEAD = 48  # an ephemeral X25519 key and a Poly1305 tag


def seal_box(public: bytes, data: bytes) -> bytes:
    """``data`` sealed to the holder of Ed25519 key ``public`` (libsodium's sealed box:
    X25519 to the key's Montgomery form, XSalsa20-Poly1305): how a volume secret
    reaches a granted node without a key exchange of its own."""
    if not isinstance(public, bytes) or len(public) != PUBLIC_KEY_SIZE:
        raise SignatureError(f"an Ed25519 public key must be {PUBLIC_KEY_SIZE} bytes")
    try:
        target = crypto_sign_ed25519_pk_to_curve25519(public)
    except CryptoError:
        raise SignatureError("not a valid Ed25519 public key") from None
    return bytes(crypto_box_seal(data, target))
