"""A node's settings: HOME/config.toml, every key optional, every key and type checked.

```toml
[node]
name = "ws-0412"            # how the estate view names this node (default: the host name)

[network]
site = "berlin"             # where this node is (default: none); chunk homes are chosen among
                            # the peers of its own site, so a site fetches each chunk from
                            # outside once; `static_peers` reach the peers of other sites. The
                            # estate view shows it. (`[node] site`, the last release's spelling,
                            # is still read; both set and different: refused.)
port = 7420                 # TCP port for peers (0: any free port)
listen = "0.0.0.0"
static_peers = ["10.0.0.5:7420"]   # peers mDNS does not reach
discovery = true            # mDNS on the local segment
peer_fetch = true           # false: fetch only from the origin (a baseline for benchmarks)
frame_timeout_s = 30.0      # a frame that has begun must arrive within this
keepalive_s = 2.0           # a silent connection is pinged after this; silent 3 times as long: closed

[fetch]
deadline_s = 5.0            # a read fails with EIO once nothing arrived from anyone for this long
hedge_after_s = 0.5         # ask a second peer when the first is this slow
peers_without_digest = 3    # k: peers asked even though their digest says no
origin_poll_s = 60.0        # how often a follower asks its volumes' origins for a newer
                            # snapshot (their `latest`, conditionally: docs/origins.md)

[cache]
max_bytes = "20G"           # hard quota of the local store (default: no quota)
min_free = "2G"             # free disk space the store never takes (default 1G)
memory = "1G"               # verified chunks read at random kept in memory (default: 1/16
                            # of RAM, 256M-2G; sequential reads use 64M of their own)
scrub_interval_h = 24       # background verification of every stored chunk (0: off)
scrub_rate_mb_s = 50        # its speed limit

[publish]
settle_s = 2.0              # the publisher commits this long after the last change (0: only
                            # `p2pfs commit`)
max_delay_s = 30.0          # ... and at the latest this long after the first one

[appliance]                 # appliance mode: the desktop link (docs/appliance.md)
user_listen = ["192.168.122.2:7421"]   # where desktops reach the user API (TCP, or vsock:CID:PORT)
desktop_pin = false         # may desktops pin and unpin?
desktop_snapshots = true    # VOLUME/.snapshots/<seq>/ on the desktop link and the mount SMB shares
volumes = ["tools"]         # follow only these volumes (default: every endorsed volume)

[metrics]                   # Prometheus text format on http://LISTEN/metrics (docs/monitoring.md)
listen = "127.0.0.1:9742"   # absent: no metrics endpoint
allow_remote = false        # true: LISTEN may be an address other than loopback (read-only
                            # data, but it shows volume names, peers and traffic to whoever
                            # reaches it: firewall it)
```

The file is decoded straight into typed records (``msgspec``: a well-kept, small,
fast library whose TOML decoder refuses unknown keys and checks types and bounds
while it decodes). A typo such as ``max_byte = "20G"`` is not ignored: every
unknown key, wrong type or out-of-range value is one line naming the file, the
key and what is expected (UsageError, exit 2), so a daemon never runs on
settings other than those the admin meant.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec

from p2pfs.errors import UsageError
from p2pfs.sizes import parse_size

DEFAULT_PORT = 7420
T = TypeVar("T", bound=msgspec.Struct)

Seconds = float
Size = int | str  # a byte count, or "20G", "512M" (sizes.parse_size)


def _range(lo: float, hi: float) -> msgspec.Meta:
    return msgspec.Meta(ge=lo, le=hi)


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


# A label people give a node (its name, its site): the whole string must match, so
# ``\Z``, not ``$`` (which lets a trailing newline through, and a peer would then
# refuse the hello that carries it).
LABEL = r"[A-Za-z0-9][A-Za-z0-9._ -]{0,63}"
LABEL_RULE = "1-64 letters, digits, ' ', '.', '_' or '-', starting with a letter or digit"
_LABEL = msgspec.Meta(min_length=1, max_length=64, pattern=rf"^{LABEL}\Z")


def is_label(value: object) -> bool:
    """Whether ``value`` is a label (a site, a node's name), by the one rule config uses."""
    return isinstance(value, str) and re.fullmatch(LABEL, value) is not None


class NodeSection(_Section):
    name: Annotated[str, _LABEL] | None = None
    site: Annotated[str, _LABEL] | None = None  # the last release's spelling of [network] site


class NetworkSection(_Section):
    site: Annotated[str, _LABEL] | None = None
    port: Annotated[int, _range(0, 65535)] = DEFAULT_PORT
    listen: str = "0.0.0.0"
    static_peers: list[str] = []
    discovery: bool = True
    peer_fetch: bool = True
    frame_timeout_s: Annotated[Seconds, _range(0.1, 3600)] = 30.0
    keepalive_s: Annotated[Seconds, _range(0.1, 3600)] = 2.0


class FetchSection(_Section):
    deadline_s: Annotated[Seconds, _range(0.1, 3600)] = 5.0
    hedge_after_s: Annotated[Seconds, _range(0.01, 600)] = 0.5
    peers_without_digest: Annotated[int, _range(0, 64)] = 3
    origin_poll_s: Annotated[Seconds, _range(0.5, 86400)] = 60.0


class CacheSection(_Section):
    max_bytes: Size | None = None
    min_free: Size = 1 << 30
    memory: Size | None = None
    scrub_interval_h: Annotated[float, _range(0, 24 * 365)] = 24.0
    scrub_rate_mb_s: Annotated[float, _range(0.1, 100_000)] = 50.0


class PublishSection(_Section):
    settle_s: Annotated[Seconds, _range(0, 86400)] = 2.0
    max_delay_s: Annotated[Seconds, _range(0.1, 86400)] = 30.0


class ApplianceSection(_Section):
    user_listen: str | list[str] = []
    desktop_pin: bool = False
    desktop_snapshots: bool = True
    volumes: list[str] = []


class MetricsSection(_Section):
    listen: str | None = None
    allow_remote: bool = False


class ConfigFile(_Section):
    """config.toml as written: one record per table."""

    node: NodeSection = msgspec.field(default_factory=NodeSection)
    network: NetworkSection = msgspec.field(default_factory=NetworkSection)
    fetch: FetchSection = msgspec.field(default_factory=FetchSection)
    cache: CacheSection = msgspec.field(default_factory=CacheSection)
    publish: PublishSection = msgspec.field(default_factory=PublishSection)
    appliance: ApplianceSection = msgspec.field(default_factory=ApplianceSection)
    metrics: MetricsSection = msgspec.field(default_factory=MetricsSection)


def default_memory_cache() -> int:
    """1/16 of RAM, within 256 MiB..2 GiB: random reads of a file that fits are then
    served from verified memory instead of re-reading and re-hashing whole chunks."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        ram = 4 << 30
    return int(min(2 << 30, max(256 << 20, ram // 16)))


def default_node_name() -> str:
    """The host name, cut to a label the estate view shows."""
    name = re.sub(r"[^A-Za-z0-9._-]", "-", os.uname().nodename)[:64].lstrip("._-")
    return name or "node"


@dataclass(frozen=True)
class Config:
    """The settings as the node uses them (units applied, sizes parsed)."""

    port: int = DEFAULT_PORT
    listen: str = "0.0.0.0"
    static_peers: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    discovery: bool = True
    peer_fetch: bool = True
    frame_timeout_s: float = 30.0
    keepalive_s: float = 2.0
    fetch_deadline_s: float = 5.0
    hedge_after_s: float = 0.5
    peers_without_digest: int = 3
    origin_poll_s: float = 60.0
    cache_max_bytes: int | None = None
    cache_min_free_bytes: int = 1 << 30
    memory_cache_bytes: int = field(default_factory=lambda: default_memory_cache())
    scrub_interval_s: float = 24 * 3600.0
    scrub_rate_bytes_s: float = 50e6
    settle_s: float = 2.0
    max_delay_s: float = 30.0
    appliance_listen: tuple[str, ...] = field(default_factory=tuple)
    desktop_pin: bool = False
    desktop_snapshots: bool = True
    follow_volumes: tuple[str, ...] = field(default_factory=tuple)
    metrics_listen: tuple[str, int] | None = None  # (host, port) of the metrics endpoint
    node_name: str = field(default_factory=lambda: default_node_name())
    site: str | None = None  # [network] site (or the old [node] site)


def parse_peer(text: str, where: str = "peer", *, any_port: bool = False) -> tuple[str, int]:
    """HOST:PORT (``[v6]:PORT`` too); with ``any_port``, port 0 (the kernel picks one)."""
    host, sep, port = text.rpartition(":")
    # isdecimal, not isdigit: "²" is a digit that int() refuses (ValueError).
    lowest = 0 if any_port else 1
    if not sep or not host or not port.isdecimal() or not lowest <= int(port) < 65536:
        raise UsageError(f"{where}: {text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a name: it may resolve to anything, so only the one we know
        return host == "localhost"


def metrics_address(section: MetricsSection, where: str) -> tuple[str, int] | None:
    """[metrics] listen as (host, port); a non-loopback address only with allow_remote."""
    if section.listen is None:
        return None
    host, port = parse_peer(section.listen, f"{where}: [metrics] listen")
    if section.allow_remote:
        return host, port
    if not is_loopback(host):
        raise UsageError(
            f"{where}: [metrics] listen: {host} is not a loopback address; metrics show "
            "volume names, peers and traffic to anyone who reaches it: set "
            "allow_remote = true to serve them there"
        )
    return host, port


_AT = re.compile(r"^(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", re.S)
_UNKNOWN = re.compile(r"Object contains unknown field `(?P<key>[^`]*)`")


def decode_error(where: str, error: msgspec.MsgspecError, root: type[msgspec.Struct]) -> str:
    """One line for a file's decode error: the file, the table and key, what is expected.

    msgspec says ``Expected `int` <= 65535 - at `$.network.port``` or ``Object contains
    unknown field `max_byte` - at `$.cache```; this says ``FILE: [network] port:
    expected `int` <= 65535`` or ``FILE: [cache] has no key `max_byte` (keys: ...)``.
    """
    text = str(error)
    if isinstance(error, msgspec.DecodeError) and not isinstance(error, msgspec.ValidationError):
        return f"{where} is not valid TOML: {text}"
    m = _AT.match(text)
    what, path = (m.group("what"), m.group("path") or "") if m else (text, "")
    parts = [p for p in re.split(r"\.|\[\d+\]", path) if p]
    struct: Any = root
    for p in parts:
        fields = (
            {f.name: f.type for f in msgspec.structs.fields(struct)} if _is_struct(struct) else {}
        )
        struct = fields.get(p)
    table = f"[{'.'.join(parts[:1])}]" if parts else "the file"
    key = ".".join(parts[1:])
    unknown = _UNKNOWN.match(what)
    if unknown:
        known = [f.name for f in msgspec.structs.fields(struct)] if _is_struct(struct) else []
        kind = "table" if not parts else "key"
        return f"{where}: {table} has no {kind} `{unknown.group('key')}`" + (
            f" (it knows {', '.join(known)})" if known else ""
        )
    what = what[:1].lower() + what[1:]
    return f"{where}: {table}{' ' + key if key else ''}: {what}"


def _is_struct(t: object) -> bool:
    return isinstance(t, type) and issubclass(t, msgspec.Struct)


def read(path: Path) -> ConfigFile:
    """config.toml as records; defaults when the file is missing. UsageError if bad."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return ConfigFile()
    except OSError as e:
        raise UsageError(f"{path} is unreadable: {e.strerror}") from None
    return decode(data, str(path), ConfigFile)


def decode(data: bytes, where: str, record: type[T]) -> T:
    """TOML ``data`` as ``record``; UsageError with one line from ``decode_error``."""
    # Decoded here, not by msgspec: how it reports bad UTF-8 differs between its versions.
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(
            f"{where} is not valid TOML: not UTF-8 ({e.reason} at byte {e.start})"
        ) from None
    try:
        return msgspec.toml.decode(text, type=record)
    except msgspec.MsgspecError as e:
        raise UsageError(decode_error(where, e, record)) from None
    except RecursionError:  # tomllib recurses once per nested array or inline table
        raise UsageError(f"{where} is not valid TOML: nested too deeply") from None


def load(path: Path) -> Config:
    """The node's settings from ``path``; UsageError (exit 2) naming what is wrong."""
    doc = read(path)
    where = str(path)
    net, fetch, cache, publish, appl = doc.network, doc.fetch, doc.cache, doc.publish, doc.appliance
    metrics = metrics_address(doc.metrics, where)
    listen = [appl.user_listen] if isinstance(appl.user_listen, str) else appl.user_listen
    if not all(listen):
        raise UsageError(f'{where}: [appliance] user_listen: expected "ADDR:PORT" strings')
    if not all(appl.volumes):
        raise UsageError(f"{where}: [appliance] volumes: expected volume names")

    def size(value: Size, key: str) -> int:
        return parse_size(value, f"{where}: [cache] {key}")

    return Config(
        port=net.port,
        listen=net.listen,
        static_peers=tuple(
            parse_peer(p, f"{where}: [network] static_peers") for p in net.static_peers
        ),
        discovery=net.discovery,
        peer_fetch=net.peer_fetch,
        frame_timeout_s=net.frame_timeout_s,
        keepalive_s=net.keepalive_s,
        fetch_deadline_s=fetch.deadline_s,
        hedge_after_s=fetch.hedge_after_s,
        peers_without_digest=fetch.peers_without_digest,
        origin_poll_s=fetch.origin_poll_s,
        cache_max_bytes=None if cache.max_bytes is None else size(cache.max_bytes, "max_bytes"),
        cache_min_free_bytes=size(cache.min_free, "min_free"),
        memory_cache_bytes=(
            default_memory_cache() if cache.memory is None else size(cache.memory, "memory")
        ),
        scrub_interval_s=cache.scrub_interval_h * 3600,
        scrub_rate_bytes_s=cache.scrub_rate_mb_s * 1e6,
        settle_s=publish.settle_s,
        max_delay_s=publish.max_delay_s,
        appliance_listen=tuple(listen),
        desktop_pin=appl.desktop_pin,
        desktop_snapshots=appl.desktop_snapshots,
        follow_volumes=tuple(appl.volumes),
        metrics_listen=metrics,
        node_name=doc.node.name or default_node_name(),
        site=site_of(doc, where),
    )


def site_of(doc: ConfigFile, where: str) -> str | None:
    """``[network] site``, or ``[node] site`` as the last release spelled it; both set and
    different is a mistake to name, not one to settle by guessing which the admin meant."""
    new, old = doc.network.site, doc.node.site
    if new is not None and old is not None and new != old:
        raise UsageError(
            f"{where}: [network] site = {new!r} and [node] site = {old!r} differ: "
            "keep [network] site (the old [node] site means the same) and remove the other"
        )
    return new if new is not None else old
