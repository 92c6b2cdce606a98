"""A node's settings: HOME/config.toml, every key optional, bad values named clearly.

```toml
[network]
port = 7420                 # TCP port for peers (0: any free port)
listen = "0.0.0.0"
static_peers = ["10.0.0.5:7420"]   # peers mDNS does not reach
discovery = true            # mDNS on the local segment
peer_fetch = true           # false: fetch only from the origin (a baseline for benchmarks)
frame_timeout_s = 30.0      # a frame that has begun must arrive within this
keepalive_s = 15.0          # a silent connection is pinged after this; no answer in as long: closed

[fetch]
deadline_s = 5.0            # a read that cannot get its chunk by then fails with EIO
hedge_after_s = 0.5         # ask a second peer when the first is this slow
peers_without_digest = 3    # k: peers asked even though their digest says no

[cache]
max_bytes = "20G"           # hard quota of the local store (default: no quota)
min_free = "2G"             # free disk space the store never takes (default 1G)
memory = "1G"               # verified chunks kept in memory (default: 1/16 of RAM, 256M-2G)
scrub_interval_h = 24       # background verification of every stored chunk (0: off)
scrub_rate_mb_s = 50        # its speed limit

[publish]
settle_s = 2.0              # the publisher commits this long after the last change (0: only
                            # `p2pfs commit`)
max_delay_s = 30.0          # ... and at the latest this long after the first one

[appliance]                 # appliance mode: the desktop link (docs/appliance.md)
user_listen = ["192.168.122.2:7421"]   # where desktops reach the user API (TCP, or vsock:CID:PORT)
desktop_pin = false         # may desktops pin and unpin?
volumes = ["tools"]         # follow only these volumes (default: every endorsed volume)
```
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfs.errors import P2pfsError
from p2pfs.sizes import parse_size

DEFAULT_PORT = 7420


@dataclass(frozen=True)
class Config:
    port: int = DEFAULT_PORT
    listen: str = "0.0.0.0"
    static_peers: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    discovery: bool = True
    peer_fetch: bool = True
    frame_timeout_s: float = 30.0
    keepalive_s: float = 15.0
    fetch_deadline_s: float = 5.0
    hedge_after_s: float = 0.5
    peers_without_digest: int = 3
    cache_max_bytes: int | None = None
    cache_min_free_bytes: int = 1 << 30
    memory_cache_bytes: int = field(default_factory=lambda: default_memory_cache())
    scrub_interval_s: float = 24 * 3600.0
    scrub_rate_bytes_s: float = 50e6
    settle_s: float = 2.0
    max_delay_s: float = 30.0
    appliance_listen: tuple[str, ...] = field(default_factory=tuple)
    desktop_pin: bool = False
    follow_volumes: tuple[str, ...] = field(default_factory=tuple)


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


def default_memory_cache() -> int:
    """1/16 of RAM, within 256 MiB..2 GiB: random reads of a file that fits are then
    served from verified memory instead of re-reading and re-hashing whole chunks."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 4 << 30
    return int(min(2 << 30, max(256 << 20, ram // 16)))


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
    values: dict[str, Any] = {}
    net = doc.get("network", {})
    fetch = doc.get("fetch", {})
    cache = doc.get("cache", {})
    publish = doc.get("publish", {})
    if not all(isinstance(t, dict) for t in (net, fetch, cache, publish)):
        raise P2pfsError(f"{where}: [network], [fetch], [cache] and [publish] must be tables")
    if (st := _num(publish, "settle_s", 0, 86400, where)) is not None:
        values["settle_s"] = st
    if (md := _num(publish, "max_delay_s", 0.1, 86400, where)) is not None:
        values["max_delay_s"] = md
    if "max_bytes" in cache:
        values["cache_max_bytes"] = parse_size(cache["max_bytes"], f"{where}: [cache] max_bytes")
    if "memory" in cache:
        values["memory_cache_bytes"] = parse_size(cache["memory"], f"{where}: [cache] memory")
    if "min_free" in cache:
        values["cache_min_free_bytes"] = parse_size(cache["min_free"], f"{where}: [cache] min_free")
    if (si := _num(cache, "scrub_interval_h", 0, 24 * 365, where)) is not None:
        values["scrub_interval_s"] = si * 3600
    if (sr := _num(cache, "scrub_rate_mb_s", 0.1, 100_000, where)) is not None:
        values["scrub_rate_bytes_s"] = sr * 1e6
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
    if (ka := _num(net, "keepalive_s", 0.1, 3600, where)) is not None:
        values["keepalive_s"] = ka
    if (d := _num(fetch, "deadline_s", 0.1, 3600, where)) is not None:
        values["fetch_deadline_s"] = d
    if (h := _num(fetch, "hedge_after_s", 0.01, 600, where)) is not None:
        values["hedge_after_s"] = h
    if (k := _num(fetch, "peers_without_digest", 0, 64, where)) is not None:
        values["peers_without_digest"] = int(k)
    values.update(_appliance(doc.get("appliance", {}), where))
    return Config(**values)


def _appliance(section: object, where: str) -> dict[str, Any]:
    """The [appliance] table: where desktops reach the user API, and what they may do."""
    if not isinstance(section, dict):
        raise P2pfsError(f"{where}: [appliance] must be a table")
    values: dict[str, Any] = {}
    listen = section.get("user_listen", [])
    if isinstance(listen, str):
        listen = [listen]
    if not isinstance(listen, list) or not all(isinstance(a, str) and a for a in listen):
        raise P2pfsError(f'{where}: [appliance] user_listen must be "ADDR:PORT" or a list of them')
    values["appliance_listen"] = tuple(listen)
    if (pin := _bool(section, "desktop_pin", where)) is not None:
        values["desktop_pin"] = pin
    follow = section.get("volumes", [])
    if not isinstance(follow, list) or not all(isinstance(v, str) and v for v in follow):
        raise P2pfsError(f"{where}: [appliance] volumes must be a list of volume names")
    values["follow_volumes"] = tuple(follow)
    return values
