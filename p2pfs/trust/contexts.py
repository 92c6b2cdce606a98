"""TLS contexts of the estate: TLS 1.3 only, both sides' certificates checked (``ssl``)."""

from __future__ import annotations

import ssl
from pathlib import Path

from p2pfs.errors import P2pfsError


def tls_context(*, server: bool, ca_pem: str, cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """A context whose only trust anchor is the estate CA (``ca_pem``), presenting the
    node's certificate and key; the peer must present a certificate too."""
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
        ctx.load_verify_locations(cadata=ca_pem)
        ctx.load_cert_chain(cert_file, key_file)
    except (ssl.SSLError, OSError) as e:
        raise P2pfsError(f"cannot set up TLS from {cert_file.parent}: {e}") from None
    return ctx
