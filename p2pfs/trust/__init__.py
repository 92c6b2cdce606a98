"""Who is who: the estate CA, certificates, revocation, TLS, desktop credentials."""
