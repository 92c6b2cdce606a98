"""What the user pinned: paths inside volumes, kept for offline use.

``HOME/pins.json`` lists each pinned path (volume, path inside it, whether it
follows new snapshots, the snapshot it was resolved in). The chunk ids each pin
holds live in the store's pin sets, under the pin's name ``VOLUME:/path``; this
file is what a user asked for, the store what that meant in chunks.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path, PurePosixPath

from p2pfs.errors import NotFound, P2pfsError, UsageError
from p2pfs.fsutil import write_atomic
from p2pfs.home import Home
from p2pfs.names import check_volume_name

MAX_PINS = 10_000
MAX_PATH = 4096


def normalize_path(path: str) -> str:
    """'/a/b' form; no '.' or '..' components, no empty names."""
    if len(path.encode()) > MAX_PATH or "\0" in path:
        raise UsageError(f"path {path[:80]!r}... is too long or has a NUL byte")
    parts = [p for p in PurePosixPath("/" + path).parts[1:] if p != "."]
    if ".." in parts:
        raise UsageError(f"path {path!r} may not contain '..'")
    return "/" + "/".join(parts)


def parse_target(text: str) -> tuple[str, str]:
    """``VOLUME:/path`` -> (volume, normalized path)."""
    volume, sep, path = text.partition(":")
    if not sep:
        raise UsageError(f"{text!r} is neither VOLUME:/path nor a path inside the mount")
    check_volume_name(volume)
    return volume, normalize_path(path)


@dataclass(frozen=True)
class PinRecord:
    volume: str
    path: str
    follow: bool
    seq: int  # the snapshot the pin was resolved in
    created: float

    @property
    def name(self) -> str:
        return f"{self.volume}:{self.path}"


class PinRegistry:
    def __init__(self, home: Home) -> None:
        self.path: Path = home.root / "pins.json"

    def all(self) -> list[PinRecord]:
        try:
            doc = json.loads(self.path.read_bytes())
            return [PinRecord(**item) for item in doc["pins"]]
        except FileNotFoundError:
            return []
        except (ValueError, KeyError, TypeError) as e:
            raise P2pfsError(f"{self.path} is damaged ({e}): restore it or remove it") from None

    def _save(self, pins: list[PinRecord]) -> None:
        doc = {"format": 1, "pins": [asdict(p) for p in pins]}
        write_atomic(self.path, json.dumps(doc, indent=2).encode() + b"\n")

    def get(self, volume: str, path: str) -> PinRecord | None:
        return next((p for p in self.all() if (p.volume, p.path) == (volume, path)), None)

    def put(self, volume: str, path: str, *, follow: bool, seq: int) -> PinRecord:
        pins = [p for p in self.all() if (p.volume, p.path) != (volume, path)]
        if len(pins) >= MAX_PINS:
            raise P2pfsError(f"too many pins ({MAX_PINS}); unpin some first")
        record = PinRecord(volume, path, follow, seq, time.time())
        self._save([*pins, record])
        return record

    def remove(self, volume: str, path: str) -> PinRecord:
        pins = self.all()
        keep = [p for p in pins if (p.volume, p.path) != (volume, path)]
        if len(keep) == len(pins):
            raise NotFound(f"{volume}:{path} is not pinned")
        self._save(keep)
        return next(p for p in pins if (p.volume, p.path) == (volume, path))
