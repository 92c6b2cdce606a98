"""Object storage through the S3 API (AWS S3, MinIO, Ceph RGW, ...): boto3's home.

boto3 rather than a client of our own: it signs requests (SigV4), finds credentials
where every AWS tool does (environment, ``~/.aws``, instance roles), retries throttled
requests, and is what MinIO's and Ceph's documentation test against. Without
credentials, requests go unsigned: a public bucket needs none to be read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import boto3
from botocore import UNSIGNED
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from p2pfs.errors import NotFound
from p2pfs.objects.origins import OriginRef

from .backend import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, Fetched, OriginError, read_limited

_MISSING = {"NoSuchKey", "404", "NotFound"}
_NOT_MODIFIED = {"304", "NotModified"}


class S3Backend:
    writable = True

    def __init__(self, ref: OriginRef, *, threads: int = 16) -> None:
        self.ref = ref
        self.bucket, _, prefix = ref.url.removeprefix("s3://").partition("/")
        self.prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        session = boto3.session.Session()
        signed = session.get_credentials() is not None
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=READ_TIMEOUT_S,
            retries={"max_attempts": 3, "mode": "standard"},
            max_pool_connections=threads,
            signature_version=None if signed else UNSIGNED,
            # MinIO, Ceph RGW and most S3-compatible servers serve buckets by path, not
            # as a DNS name of their own; AWS itself is addressed as it prefers.
            s3={"addressing_style": "path" if ref.endpoint else "auto"},
        )
        try:
            self.client: Any = session.client(
                "s3", endpoint_url=ref.endpoint, region_name=ref.region, config=config
            )
        except (BotoCoreError, ValueError) as e:
            raise OriginError(f"origin {ref.url}: {e}") from None

    def _fail(self, e: Exception, key: str) -> OriginError:
        if isinstance(e, ClientError):
            err = e.response.get("Error", {})
            return OriginError(
                f"origin {self.ref.url}: {key}: {err.get('Code')} {err.get('Message', '')}".rstrip()
            )
        return OriginError(f"origin {self.ref.url}: {key}: {e}")

    def get(
        self,
        key: str,
        max_bytes: int,
        *,
        etag: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Fetched | None:
        args: dict[str, str] = {"Bucket": self.bucket, "Key": self.prefix + key}
        if etag is not None:
            args["IfNoneMatch"] = etag
        try:
            answer = self.client.get_object(**args)
            if answer.get("ContentLength", 0) > max_bytes:
                answer["Body"].close()
                raise OriginError(f"origin {self.ref.url}: {key} is larger than {max_bytes} bytes")
            body = answer["Body"]
            try:
                data = read_limited(body.read, max_bytes, f"origin {self.ref.url}: {key}", progress)
            finally:
                body.close()
            return Fetched(data, answer.get("ETag"))
        except ClientError as e:
            code = str(e.response.get("Error", {}).get("Code"))
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode"))
            if code in _NOT_MODIFIED or status == "304":
                return None
            if code in _MISSING or status == "404":
                raise NotFound(f"origin {self.ref.url} has no {key}") from None
            raise self._fail(e, key) from None
        except (BotoCoreError, OSError) as e:
            raise self._fail(e, key) from None

    def put(self, key: str, data: bytes) -> None:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self.prefix + key, Body=data)
        except (ClientError, BotoCoreError, OSError) as e:
            raise self._fail(e, key) from None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix + prefix
            )
            for page in pages:
                for item in page.get("Contents", ()):
                    yield item["Key"][len(self.prefix) :], int(item["Size"])
        except (ClientError, BotoCoreError, OSError) as e:
            raise self._fail(e, prefix) from None
