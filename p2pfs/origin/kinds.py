"""Which backend serves an origin: by its URL's kind, or this node's directory of it."""

from __future__ import annotations

from pathlib import Path

from p2pfs.objects.origins import OriginRef

from .backend import Backend


def open_backend(ref: OriginRef, *, local_dir: Path | None = None) -> Backend:
    """The backend for an origin: its directory when this node writes its files
    (an HTTP origin published from ``local_dir``), else its URL."""
    if local_dir is not None:
        from .directory import DirectoryBackend

        return DirectoryBackend(ref, local_dir)
    if ref.kind == "s3":
        from .s3 import S3Backend

        return S3Backend(ref)
    from .http import HttpBackend

    return HttpBackend(ref)
