"""Where a volume's objects are kept beyond the estate: the origins a snapshot announces.

A publisher lists its volume's origins (object storage, static HTTP mirrors) in every
snapshot it signs, so a follower learns where to go when no peer holds a chunk, and
that the list is the publisher's, not a peer's. An origin is untrusted storage: what a
reader takes from one is verified like bytes from any peer (docs/origins.md).

An entry is a URL (``s3://BUCKET/PREFIX`` or ``http(s)://HOST/PATH/``), and for S3 the
API endpoint (MinIO, Ceph RGW, any S3-compatible server; none for AWS) and region.
Credentials are never announced: each reader brings its own (the AWS environment).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from p2pfs.errors import DecodeError

MAX_ORIGINS = 8
MAX_URL = 512
MAX_REGION = 32
SCHEMES = ("s3", "http", "https")
# S3's bucket naming rule (3-63 lower-case letters, digits, dots and hyphens).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_REGION = re.compile(r"[a-z0-9-]{1,32}")
# A key prefix or URL path: printable ASCII without spaces, quotes or backslashes.
_PATH = re.compile(r"[A-Za-z0-9._~!$&'()*+,;=:@%/-]*")


def _text(value: object, what: str, most: int) -> str:
    if not isinstance(value, str) or not 0 < len(value) <= most or not value.isprintable():
        raise DecodeError(f"{what} must be printable text of 1..{most} characters")
    return value


def _http_url(url: str, what: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise DecodeError(f"{what} {url!r} is not an http:// or https:// URL with a host")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise DecodeError(f"{what} {url!r} may not carry a query, fragment or credentials")
    if not _PATH.fullmatch(parts.path):
        raise DecodeError(f"{what} {url!r} has characters a URL path may not hold")
    try:
        parts.port  # noqa: B018 (raises ValueError on a port out of range)
    except ValueError:
        raise DecodeError(f"{what} {url!r} has a bad port") from None


@dataclass(frozen=True)
class OriginRef:
    url: str
    endpoint: str | None = None  # the S3 API's URL when it is not AWS's
    region: str | None = None

    def __post_init__(self) -> None:
        _text(self.url, "an origin's URL", MAX_URL)
        scheme = self.url.partition(":")[0]
        if scheme == "s3":
            bucket, _, prefix = self.url.removeprefix("s3://").partition("/")
            if not self.url.startswith("s3://") or not _BUCKET.fullmatch(bucket):
                raise DecodeError(
                    f"origin {self.url!r}: an S3 origin is s3://BUCKET/PREFIX with a valid bucket name"
                )
            if not _PATH.fullmatch(prefix) or "//" in prefix or prefix.startswith("/"):
                raise DecodeError(f"origin {self.url!r}: its prefix has characters S3 keys avoid")
        elif scheme in ("http", "https"):
            _http_url(self.url, "origin")
            if self.endpoint is not None or self.region is not None:
                raise DecodeError(f"origin {self.url!r}: an HTTP origin has no endpoint or region")
        else:
            raise DecodeError(
                f"origin {self.url!r}: the URL must begin with one of {', '.join(s + '://' for s in SCHEMES)}"
            )
        if self.endpoint is not None:
            _text(self.endpoint, "an origin's endpoint", MAX_URL)
            _http_url(self.endpoint, "endpoint")
        if self.region is not None and (
            not isinstance(self.region, str) or not _REGION.fullmatch(self.region)
        ):
            raise DecodeError(f"origin {self.url!r}: region {self.region!r} is not a region name")

    @property
    def kind(self) -> str:
        return "s3" if self.url.startswith("s3://") else "http"

    def to_wire(self) -> dict[str, str]:
        out = {"u": self.url}
        if self.endpoint is not None:
            out["e"] = self.endpoint
        if self.region is not None:
            out["r"] = self.region
        return out

    @classmethod
    def from_wire(cls, obj: object) -> OriginRef:
        if not isinstance(obj, dict) or "u" not in obj or not set(obj) <= {"u", "e", "r"}:
            raise DecodeError("an origin entry is a map of u (URL), e (endpoint), r (region)")
        return cls(obj["u"], obj.get("e"), obj.get("r"))


def decode_origins(value: object) -> tuple[OriginRef, ...]:
    if not isinstance(value, list) or not 0 < len(value) <= MAX_ORIGINS:
        raise DecodeError(f"a snapshot's origins are a list of 1..{MAX_ORIGINS} entries")
    refs = tuple(OriginRef.from_wire(v) for v in value)
    if len({r.url for r in refs}) != len(refs):
        raise DecodeError("a snapshot names one origin twice")
    return refs
