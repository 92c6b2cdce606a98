"""What every kind of origin offers (``kinds.open_backend`` opens one).

A backend is blocking (boto3 and urllib3 are): the daemon calls it in worker threads.
Every read is bounded (``max_bytes``) and every wait timed out; a missing key is
``NotFound``, anything else that goes wrong an ``OriginError`` naming the origin.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from p2pfs.errors import P2pfsError
from p2pfs.objects.origins import OriginRef

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 10.0  # silence on a read, not the whole transfer


class OriginError(P2pfsError):
    """An origin that could not be reached, or answered what it should not."""


class TooLarge(OriginError):
    pass


@dataclass(frozen=True)
class Fetched:
    data: bytes
    etag: str | None  # for a conditional read of the same key next time


class Backend(Protocol):
    ref: OriginRef
    writable: bool

    def get(
        self,
        key: str,
        max_bytes: int,
        *,
        etag: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Fetched | None:
        """The object's bytes (NotFound if absent); None when ``etag`` still matches."""
        ...

    def put(self, key: str, data: bytes) -> None: ...

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        """Every (key, size) under ``prefix``."""
        ...


def read_limited(
    read: Callable[[int], bytes],
    max_bytes: int,
    what: str,
    progress: Callable[[int], None] | None,
) -> bytes:
    """Read a body in pieces, refusing it once it passes ``max_bytes``."""
    parts: list[bytes] = []
    total = 0
    while piece := read(256 * 1024):
        total += len(piece)
        if total > max_bytes:
            raise TooLarge(f"{what}: more than {max_bytes} bytes")
        parts.append(piece)
        if progress is not None:
            progress(len(piece))
    return b"".join(parts)
