"""A static HTTP server holding the origin layout (nginx, a CDN, S3 website hosting):
read only, urllib3's home (a well-kept pool of keep-alive connections with timeouts;
already installed with boto3).

No redirects are followed and no retries made: the fetcher moves on to the next
source, which is its own retry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import urllib3

from p2pfs.errors import NotFound
from p2pfs.objects.origins import OriginRef

from .backend import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, Fetched, OriginError, read_limited


class HttpBackend:
    writable = False

    def __init__(self, ref: OriginRef, *, threads: int = 16) -> None:
        self.ref = ref
        self.base = ref.url if ref.url.endswith("/") else ref.url + "/"
        self.pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=threads,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=READ_TIMEOUT_S),
            retries=False,
        )

    def get(
        self,
        key: str,
        max_bytes: int,
        *,
        etag: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Fetched | None:
        headers = {"If-None-Match": etag} if etag is not None else {}
        what = f"origin {self.ref.url}: {key}"
        try:
            answer = self.pool.request(
                "GET", self.base + key, headers=headers, preload_content=False, redirect=False
            )
        except urllib3.exceptions.HTTPError as e:
            raise OriginError(f"{what}: {e}") from None
        try:
            if answer.status == 304 and etag is not None:
                return None
            if answer.status == 404:
                raise NotFound(f"origin {self.ref.url} has no {key}")
            if answer.status != 200:
                raise OriginError(f"{what}: HTTP {answer.status}")
            length = answer.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > max_bytes:
                raise OriginError(f"{what} is larger than {max_bytes} bytes")
            data = read_limited(answer.read, max_bytes, what, progress)
            if length is not None and length.isdigit() and int(length) != len(data):
                raise OriginError(f"{what}: truncated ({len(data)} of {length} bytes)")
            return Fetched(data, answer.headers.get("ETag"))
        except (urllib3.exceptions.HTTPError, OSError) as e:
            raise OriginError(f"{what}: {e}") from None
        finally:
            answer.release_conn()

    def put(self, key: str, data: bytes) -> None:
        raise OriginError(
            f"origin {self.ref.url} is a read-only HTTP origin: give 'origin add' the "
            "directory its server publishes (--dir) to write it from this node"
        )

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        raise OriginError(f"origin {self.ref.url} is a read-only HTTP origin: it cannot be listed")
