"""An origin's files in a directory of this machine, which a web server publishes (the
HTTP origin written by its publisher, as CernVM-FS's Stratum 0 is a directory Apache
serves). Files are written whole (temp file, fsync, rename): a web server never
serves half an object.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from p2pfs.errors import NotFound
from p2pfs.fsutil import write_atomic
from p2pfs.objects.origins import OriginRef

from .backend import Fetched, OriginError, read_limited


class DirectoryBackend:
    writable = True

    def __init__(self, ref: OriginRef, root: Path) -> None:
        self.ref = ref
        self.root = root
        if not root.is_dir():
            raise OriginError(f"origin {ref.url}: {root} is not a directory")

    def _path(self, key: str) -> Path:
        path = self.root / key
        if ".." in Path(key).parts or key.startswith("/"):
            raise OriginError(f"origin {self.ref.url}: bad key {key!r}")
        return path

    def get(
        self,
        key: str,
        max_bytes: int,
        *,
        etag: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> Fetched | None:
        path = self._path(key)
        try:
            with open(path, "rb") as f:
                st = os.fstat(f.fileno())
                tag = f'"{st.st_mtime_ns:x}-{st.st_size:x}"'
                if etag == tag:
                    return None
                return Fetched(read_limited(f.read, max_bytes, f"{path}", progress), tag)
        except FileNotFoundError:
            raise NotFound(f"origin {self.ref.url} has no {key}") from None
        except OSError as e:
            raise OriginError(f"origin {self.ref.url}: {path}: {e.strerror}") from None

    def put(self, key: str, data: bytes) -> None:
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data, 0o644)
        except OSError as e:
            raise OriginError(f"origin {self.ref.url}: {path}: {e.strerror}") from None

    def list(self, prefix: str) -> Iterator[tuple[str, int]]:
        base = self.root / prefix
        if not base.exists():
            return
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if name.startswith("."):
                    continue  # write_atomic's temp files
                full = Path(dirpath) / name
                try:
                    yield str(full.relative_to(self.root)), full.stat().st_size
                except OSError:
                    continue
