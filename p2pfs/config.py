"""A node's settings: HOME/config.toml, every key optional, bad values named clearly.

```toml
[network]
port = 7420                 # TCP port for peers (0: any free port)
listen = "0.0.0.0"
static_peers = ["10.0.0.5:7420"]   # peers mDNS does not reach
discovery = true            # mDNS on the local segment
peer_fetch = true           # false: fetch only from the origin (a baseline for benchmarks)
frame_timeout_s = 30.0      # a frame that has begun must arrive within this

[fetch]
deadline_s = 10.0           # a read that cannot get its chunk by then fails with EIO
hedge_after_s = 0.5         # ask a second peer when the first is this slow
peers_without_digest = 3    # k: peers asked even though their digest says no
```
"""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import P2pfsError

DEFAULT_PORT = 7420


@dataclass(frozen=True)
class Config:
    port: int = DEFAULT_PORT
    listen: str = "0.0.0.0"
    static_peers: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    discovery: bool = True
    peer_fetch: bool = True
    frame_timeout_s: float = 30.0
    fetch_deadline_s: float = 10.0
    hedge_after_s: float = 0.5
    peers_without_digest: int = 3


def _num(section: dict[str, Any], key: str, lo: float, hi: float, where: str) -> float | None:
    if key not in section:
        return None
    value = section[key]
    if isinstance(value, bool) or not isinstance(value, int | float) or not lo <= value <= hi:
        raise P2pfsError(f"{where}: {key} must be a number from {lo:g} to {hi:g}")
    return float(value)


def _bool(section: dict[str, Any], key: str, where: str) -> bool | None:
    if key not in section:
        return None
    if not isinstance(section[key], bool):
        raise P2pfsError(f"{where}: {key} must be true or false")
    return bool(section[key])


def parse_peer(text: str, where: str = "peer") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise P2pfsError(f"{where}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def load(path: Path) -> Config:
    try:
        doc = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return Config()
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise P2pfsError(f"{path} is not valid TOML: {e}") from None
    where = str(path)
    net = doc.get("network", {})
    fetch = doc.get("fetch", {})
    if not isinstance(net, dict) or not isinstance(fetch, dict):
        raise P2pfsError(f"{where}: [network] and [fetch] must be tables")
    values: dict[str, Any] = {}
    if (port := _num(net, "port", 0, 65535, where)) is not None:
        values["port"] = int(port)
    if "listen" in net:
        if not isinstance(net["listen"], str):
            raise P2pfsError(f"{where}: listen must be an address")
        values["listen"] = net["listen"]
    peers = net.get("static_peers", [])
    if not isinstance(peers, list) or not all(isinstance(p, str) for p in peers):
        raise P2pfsError(f'{where}: static_peers must be a list of "HOST:PORT" strings')
    values["static_peers"] = tuple(parse_peer(p, where) for p in peers)
    for key in ("discovery", "peer_fetch"):
        if (b := _bool(net, key, where)) is not None:
            values[key] = b
    if (ft := _num(net, "frame_timeout_s", 0.1, 3600, where)) is not None:
        values["frame_timeout_s"] = ft
    if (d := _num(fetch, "deadline_s", 0.1, 3600, where)) is not None:
        values["fetch_deadline_s"] = d
    if (h := _num(fetch, "hedge_after_s", 0.01, 600, where)) is not None:
        values["hedge_after_s"] = h
    if (k := _num(fetch, "peers_without_digest", 0, 64, where)) is not None:
        values["peers_without_digest"] = int(k)
    return Config(**values)
