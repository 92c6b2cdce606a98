"""Reading from an origin: the fetcher's source of last resort before the publisher.

Each origin is one source for every chunk of the volumes that announce it; its
answers are hashed by the fetcher like a peer's (a wrong byte is counted and the
chunk taken elsewhere). Reads run in worker threads (the backends block); a read
counts as progress while its bytes arrive, so a slow origin that moves bytes is
waited for, as a slow peer is (``[fetch] deadline_s`` counts silence).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

import trio

from p2pfs.errors import NotFound
from p2pfs.net.connection import PeerUnavailable
from p2pfs.objects.model import MAX_CHUNK_LENGTH, MAX_TREE_BYTES
from p2pfs.objects.origins import OriginRef

from .backend import Backend, OriginError
from .kinds import open_backend
from .layout import object_key

MAX_OBJECT = max(MAX_CHUNK_LENGTH, MAX_TREE_BYTES) + 4096  # sealed objects carry a tag


@dataclass(frozen=True)
class SourceStats:
    url: str
    bytes_from: int
    objects_from: int
    missing: int
    errors: int
    bad_objects: int
    last_error: str | None


class OriginSource:
    """One origin as the fetcher sees it (``net.fetcher.ObjectSource``)."""

    def __init__(self, ref: OriginRef, limiter: trio.CapacityLimiter) -> None:
        self.ref = ref
        self.limiter = limiter
        self.url = ref.url
        self._backend: Backend | None = None
        self._opening = threading.Lock()
        self.node_id = b"origin:" + self.url.encode()  # its key among what a fetch tried
        self.label = self.url
        self.latency_s = 0.1
        self.bytes_from = self.objects_from = self.missing = self.errors = 0
        self.bad_objects = 0
        self.last_error: str | None = None

    @property
    def backend(self) -> Backend:
        """Opened on first use, in the worker thread that needs it: making a boto3
        client takes a third of a second, which the event loop must not wait for."""
        with self._opening:
            if self._backend is None:
                self._backend = open_backend(self.ref)
            return self._backend

    async def fetch(self, cid: bytes, moved: Callable[[], None] = lambda: None) -> bytes:
        """The stored bytes the origin holds under ``cid``, unverified (the fetcher
        hashes them); PeerUnavailable when it lacks them or cannot be read."""
        key = object_key(cid)
        start = trio.current_time()
        try:
            fetched = await trio.to_thread.run_sync(
                lambda: self.backend.get(key, MAX_OBJECT, progress=lambda _n: moved()),
                limiter=self.limiter,
                abandon_on_cancel=True,
            )
        except NotFound:
            self.missing += 1
            raise PeerUnavailable("missing") from None
        except OriginError as e:
            self.errors += 1
            self.last_error = str(e)
            raise PeerUnavailable(str(e)) from None
        assert fetched is not None
        self.latency_s = 0.8 * self.latency_s + 0.2 * (trio.current_time() - start)
        return fetched.data

    def delivered(self, size: int) -> None:
        self.bytes_from += size
        self.objects_from += 1

    def rejected(self) -> None:
        self.bad_objects += 1

    def statistics(self) -> SourceStats:
        return SourceStats(
            self.url,
            self.bytes_from,
            self.objects_from,
            self.missing,
            self.errors,
            self.bad_objects,
            self.last_error,
        )
