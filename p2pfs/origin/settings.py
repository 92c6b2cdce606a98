"""What this node keeps of a volume's origins beyond the announced entries.

The announced list is in the head snapshot (signed; every reader sees it). The
publisher alone also knows where it writes an HTTP origin's files (``dir``), kept in
``HOME/volumes/NAME/origins.json``; and each sync's outcome, for ``origin list``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from p2pfs.errors import P2pfsError
from p2pfs.fsutil import read_bounded, write_atomic
from p2pfs.home import Home
from p2pfs.names import check_volume_name

FILE = "origins.json"
MAX_FILE = 64 * 1024


@dataclass(frozen=True)
class LocalOrigin:
    url: str
    dir: Path | None = None  # where this node writes an HTTP origin's files


def _path(home: Home, volume: str) -> Path:
    check_volume_name(volume)
    return home.volumes_dir / volume / FILE


def load(home: Home, volume: str) -> dict[str, LocalOrigin]:
    path = _path(home, volume)
    if not path.exists():
        return {}
    try:
        doc = json.loads(read_bounded(path, MAX_FILE, "the origins file"))
        out = {}
        for item in doc["origins"]:
            d = item.get("dir")
            out[str(item["url"])] = LocalOrigin(str(item["url"]), Path(d) if d else None)
        return out
    except (ValueError, KeyError, TypeError) as e:
        raise P2pfsError(f"{path} is damaged ({e}): remove it and add the origins again") from None


def save(home: Home, volume: str, origins: dict[str, LocalOrigin]) -> None:
    doc = {
        "origins": [
            {"url": o.url} | ({"dir": str(o.dir)} if o.dir else {}) for o in origins.values()
        ]
    }
    write_atomic(_path(home, volume), json.dumps(doc, indent=2).encode() + b"\n", 0o600)


def sync_lock(home: Home, volume: str) -> Path:
    """The lock one sync of a volume holds (the daemon's after a commit, or the CLI's)."""
    return home.volumes_dir / volume / ".origin-sync.lock"
