"""``p2pfs doctor``: the checks of what breaks an install, each a record saying what to do.

Every check is a function returning one ``Check``; ``run`` calls them in order and
turns a failure to look (a home not readable, a file gone) into a failed check
naming it, so one broken part never hides the others. Nothing here changes the
home: the store is not opened (SQLite would create files), the daemon is only asked
for its status.

Clock skew against peers is not measurable: neither hello nor ping carries a
time (docs/protocol.md). What can be seen is said instead: whether this clock lies
inside the certificates' validity windows, whether a peer was refused as "not valid
now" (the sign of a skewed clock on one side), and whether systemd says it is
synchronized.
"""

from __future__ import annotations

import errno
import ipaddress
import os
import shutil
import stat
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from p2pfs import config as config_mod
from p2pfs.chunking import chunker
from p2pfs.errors import NotRunning, P2pfsError
from p2pfs.fsutil import ext4_has_journal, filesystem_of
from p2pfs.home import Home
from p2pfs.sizes import format_size
from p2pfs.trust.certs import CLOCK_SKEW, EXPIRY_WARNING, utc_now
from p2pfs.trust.estate import Estate
from p2pfs.volume.registry import VolumeRegistry

from . import control

Status = Literal["ok", "warn", "fail", "skip"]

FUSE_DEVICE = Path("/dev/fuse")
FUSE_CONF = Path("/etc/fuse.conf")
PROC_ROUTE = Path("/proc/net/route")
SYS_NET = Path("/sys/class/net")
STATUS_TIMEOUT = 5.0
MDNS_ADDRESS = "224.0.0.251"  # the group every mDNS query and answer goes to

_RTF_UP = 0x1
_IFF_UP = 0x1
_IFF_MULTICAST = 0x1000

RENEW = (
    "renew it: 'p2pfs request-join --out req.pem' here, 'p2pfs estate approve req.pem "
    "--out bundle' on the admin node, 'p2pfs join bundle' here"
)


@dataclass(frozen=True)
class Check:
    check: str
    status: Status
    detail: str
    fix: str | None = None

    @property
    def ok(self) -> bool:
        """Whether the install works as far as this check sees: a warning still works."""
        return self.status != "fail"

    def to_json(self) -> dict[str, Any]:
        return {
            "check": self.check,
            "ok": self.ok,
            "status": self.status,
            "detail": self.detail,
            "fix": self.fix,
        }


@dataclass(frozen=True)
class Setup:
    """What the checks look at: the home, the mountpoint meant, whether others must see it."""

    home: Home
    mountpoint: Path | None = None
    allow_other: bool = False

    @property
    def user(self) -> int:
        """The invoking user: the home, the keys and /dev/fuse must be right for it."""
        return os.geteuid()


@dataclass(frozen=True)
class DaemonView:
    """A running daemon's status, or why there is none to ask."""

    status: dict[str, Any] | None
    why_not: str

    @classmethod
    def ask(cls, home: Home) -> DaemonView:
        try:
            st = control.call(home.control_socket, "status", timeout=STATUS_TIMEOUT)
        except NotRunning:
            return cls(None, f"no daemon is running for {home.root}")
        except PermissionError:
            return cls(None, f"the control socket of {home.root} is not open to this user")
        except (P2pfsError, OSError) as e:
            return cls(None, f"the daemon of {home.root} did not answer ({e})")
        if not isinstance(st, dict):
            return cls(None, f"the daemon of {home.root} sent no status")
        return cls(st, "")

    def peers(self) -> list[dict[str, Any]]:
        return list((self.status or {}).get("peers") or [])


# -- FUSE -----------------------------------------------------------------------------


def check_fuse_device(setup: Setup, daemon: DaemonView) -> Check:
    name = "fuse-device"
    try:
        st = os.stat(FUSE_DEVICE)
    except FileNotFoundError:
        return Check(
            name,
            "fail",
            f"{FUSE_DEVICE} does not exist",
            "load the module: 'modprobe fuse' (in a container: pass --device /dev/fuse)",
        )
    if not stat.S_ISCHR(st.st_mode):
        return Check(
            name,
            "fail",
            f"{FUSE_DEVICE} is not a character device",
            "recreate it: 'mknod -m 0666 /dev/fuse c 10 229'",
        )
    try:
        fd = os.open(FUSE_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        mode = stat.filemode(st.st_mode)
        return Check(
            name,
            "fail",
            f"{FUSE_DEVICE} ({mode}, uid {st.st_uid} gid {st.st_gid}) does not open read-write "
            f"for uid {setup.user}: {e.strerror}",
            "'chmod 0666 /dev/fuse' (Debian's udev default) or a udev rule giving the "
            "user's group access",
        )
    os.close(fd)
    return Check(name, "ok", f"{FUSE_DEVICE} opens read-write for uid {setup.user}")


def check_fusermount(setup: Setup, daemon: DaemonView) -> Check:
    name = "fusermount3"
    path = shutil.which("fusermount3")
    if path is None:
        return Check(name, "fail", "fusermount3 is not on PATH", "'apt-get install fuse3'")
    st = os.stat(path)
    if st.st_uid == 0 and st.st_mode & stat.S_ISUID:
        return Check(name, "ok", f"{path} is setuid root")
    if setup.user == 0:
        # Root mounts and unmounts with the system calls; fusermount3 is not used.
        return Check(
            name,
            "warn",
            f"{path} is not setuid root: only root can mount",
            f"'chmod u+s {path}' (as the fuse3 package installs it) for users' mounts",
        )
    return Check(
        name,
        "fail",
        f"{path} is not setuid root: uid {setup.user} cannot mount",
        f"'chown root {path} && chmod u+s {path}', or reinstall fuse3",
    )


def user_allow_other(text: str) -> bool:
    return any(line.split("#", 1)[0].strip() == "user_allow_other" for line in text.splitlines())


def check_fuse_conf(setup: Setup, daemon: DaemonView) -> Check:
    name = "fuse-conf"
    if not setup.allow_other:
        return Check(name, "skip", "allow_other is not asked for (--allow-other)")
    if setup.user == 0:
        return Check(name, "ok", "root mounts with allow_other without user_allow_other")
    try:
        text = FUSE_CONF.read_text(errors="replace")
    except FileNotFoundError:
        text = ""
    if user_allow_other(text):
        return Check(name, "ok", f"{FUSE_CONF} has user_allow_other")
    return Check(
        name,
        "fail",
        f"allow_other is asked for, and {FUSE_CONF} lacks user_allow_other",
        f"add the line 'user_allow_other' to {FUSE_CONF}",
    )


def check_mountpoint(setup: Setup, daemon: DaemonView) -> Check:
    name = "mountpoint"
    mp = setup.mountpoint
    if mp is None:
        return Check(name, "skip", "no mountpoint given (--mount PATH)")
    mounted = (daemon.status or {}).get("daemon", {}) or {}
    if mounted.get("mountpoint") and Path(mounted["mountpoint"]) == mp:
        return Check(name, "ok", f"{mp} is mounted by this node's daemon (pid {mounted['pid']})")
    try:
        st = os.stat(mp)
    except FileNotFoundError:
        return Check(name, "fail", f"{mp} does not exist", f"'mkdir -p {mp}'")
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            return Check(
                name,
                "fail",
                f"{mp} holds a stale mount (its daemon died)",
                f"'p2pfs umount {mp}' or 'fusermount3 -u {mp}'",
            )
        raise
    if not stat.S_ISDIR(st.st_mode):
        return Check(name, "fail", f"{mp} is not a directory", "choose a directory")
    if os.path.ismount(mp):
        return Check(
            name,
            "fail",
            f"something is already mounted on {mp}",
            f"unmount it ('umount {mp}') or choose another mountpoint",
        )
    if setup.user != 0 and st.st_uid != setup.user and not os.access(mp, os.W_OK):
        return Check(
            name,
            "fail",
            f"{mp} is neither owned by nor writable for uid {setup.user} (fusermount3 refuses)",
            f"'chown {setup.user} {mp}'",
        )
    if any(True for _ in os.scandir(mp)):
        return Check(
            name,
            "warn",
            f"{mp} is not empty: the mount will hide what it holds",
            "move its files away, or choose an empty directory",
        )
    return Check(name, "ok", f"{mp} is an empty directory, nothing mounted on it")


# -- the home -------------------------------------------------------------------------


def key_files(home: Home) -> Iterable[Path]:
    """The private keys a home may hold (the store is not walked: chunks are no keys)."""
    root = home.root
    for d in (root, home.estate_dir, root / "appliance"):
        if d.is_dir():
            yield from sorted(d.glob("*.key"))
    if home.volumes_dir.is_dir():
        yield from sorted(home.volumes_dir.glob("*/*.key"))


def check_home(setup: Setup, daemon: DaemonView) -> Check:
    name = "home"
    home = setup.home
    if not home.root.exists():
        return Check(
            name, "fail", f"{home.root} does not exist", f"'p2pfs --home {home.root} init'"
        )
    if not home.is_initialized():
        return Check(
            name,
            "fail",
            f"{home.root} is not an initialized node home",
            f"'p2pfs --home {home.root} init'",
        )
    problems: list[str] = []
    dirs = [home.root, home.volumes_dir, home.store_dir, home.run_dir, home.log_dir]
    dirs.append(home.estate_dir)
    for d in dirs:
        if not d.exists():
            continue
        st = os.lstat(d)
        if st.st_uid != setup.user:
            problems.append(f"{d} is owned by uid {st.st_uid}")
        if st.st_mode & 0o022:
            problems.append(f"{d} is group- or world-writable ({stat.filemode(st.st_mode)})")
    loose = []
    for key in key_files(home):
        st = os.lstat(key)
        if st.st_uid != setup.user:
            problems.append(f"{key} is owned by uid {st.st_uid}")
        if stat.S_IMODE(st.st_mode) & 0o077:
            loose.append(key)
            problems.append(f"{key} is mode {stat.S_IMODE(st.st_mode):04o}, not 0600")
    if not problems:
        return Check(
            name,
            "ok",
            f"{home.root} is owned by uid {setup.user}, not writable by others; keys 0600",
        )
    fixes = [f"'chown -R {setup.user} {home.root}'"] if any("owned" in p for p in problems) else []
    if any("writable" in p for p in problems):
        fixes.append(f"'chmod go-w {home.root} {home.root}/*'")
    if loose:
        fixes.append("'chmod 600 " + " ".join(str(k) for k in loose) + "'")
    return Check(name, "fail", "; ".join(problems), ", ".join(fixes))


def check_free_space(setup: Setup, daemon: DaemonView) -> Check:
    name = "free-space"
    home = setup.home
    cfg = config_mod.load(home.config_file)
    where = home.store_dir if home.store_dir.exists() else home.root
    st = os.statvfs(where)
    free = st.f_bavail * st.f_frsize
    floor = cfg.cache_min_free_bytes
    cache = (daemon.status or {}).get("cache") or {}
    stored = int(cache.get("bytes") or 0)
    room = free - floor
    facts = (
        f"{format_size(free)} free on the home's filesystem, floor min_free {format_size(floor)}"
    )
    if room <= 0:
        return Check(
            name,
            "fail",
            f"{facts}: the store cannot take a chunk (it evicts instead)",
            f"free disk space, move {home.root} to a larger disk, or lower [cache] min_free "
            f"in {home.config_file}",
        )
    limit = cfg.cache_max_bytes
    if limit is not None and stored + room < limit:
        return Check(
            name,
            "warn",
            f"{facts}: the quota max_bytes {format_size(limit)} cannot be reached "
            f"(the store holds {format_size(stored)}, {format_size(room)} more fit)",
            f"lower [cache] max_bytes in {home.config_file} or free disk space",
        )
    quota = f", quota {format_size(limit)}" if limit is not None else ", no quota"
    return Check(name, "ok", f"{facts}{quota}")


def check_store_filesystem(setup: Setup, daemon: DaemonView) -> Check:
    name = "store-fs"
    home = setup.home
    where = home.store_dir if home.store_dir.exists() else home.root
    fstype, device = filesystem_of(where)
    if fstype == "tmpfs":
        return Check(
            name,
            "warn",
            f"the store is on tmpfs ({where}): the cache and every pinned file are gone at "
            "the next reboot",
            f"move {home.root} to a disk (--home or P2PFS_HOME) to keep pins for offline use",
        )
    if fstype == "ext4" and ext4_has_journal(device) is False:
        return Check(
            name,
            "warn",
            f"the store is on an ext4 without a journal (/dev/{device}): each file created "
            "there passes over every inode freed in the last minutes, one by one, so caching "
            "and imports slow down while the cache evicts",
            f"add a journal ('tune2fs -O has_journal /dev/{device}' while it is unmounted) "
            f"or move {home.root} to another file system",
        )
    return Check(name, "ok", f"the store is on {fstype or 'an unknown file system'} ({where})")


# -- the estate -----------------------------------------------------------------------


def _timedatectl_synchronized() -> bool | None:
    """systemd's word on the clock (None: no systemd to ask, as in a container)."""
    exe = shutil.which("timedatectl")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "show", "-p", "NTPSynchronized", "--value"],
            capture_output=True,
            text=True,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    answer = out.stdout.strip()
    return {"yes": True, "no": False}.get(answer) if out.returncode == 0 else None


def check_clock(setup: Setup, daemon: DaemonView) -> Check:
    name = "clock"
    now = utc_now()
    unmeasurable = "skew against peers is not measurable (hello and ping carry no time)"
    estate = Estate.load(setup.home)
    if estate is not None:
        start, end = estate.node_cert_validity
        if now < start - CLOCK_SKEW:
            return Check(
                name,
                "fail",
                f"this clock ({now:%Y-%m-%d %H:%M} UTC) is before this node's certificate "
                f"begins ({start:%Y-%m-%d %H:%M}): it runs behind",
                "synchronize it: 'timedatectl set-ntp true' (or chrony/ntpsec)",
            )
        if now > end:
            return Check(
                name,
                "warn",
                f"this clock ({now:%Y-%m-%d %H:%M} UTC) is past the end of this node's "
                f"certificate ({end:%Y-%m-%d %H:%M}): it expired, or the clock runs ahead",
                "compare the clock with 'date -u' on another machine; see the certificate line",
            )
    for p in daemon.peers():
        err = str(p.get("last_error") or "")
        if "not valid now" in err:
            return Check(
                name,
                "fail",
                f"peer {str(p.get('node_id'))[:16]} was refused: {err} (one of the two clocks "
                f"is off, or its certificate expired)",
                "compare both clocks with 'date -u'; synchronize them with NTP",
            )
    synced = _timedatectl_synchronized()
    inside = (
        "this clock lies inside this node's certificate validity"
        if estate is not None
        else "this node has no certificate to compare it with"
    )
    if synced is False:
        return Check(
            name,
            "warn",
            f"systemd says the clock is not NTP-synchronized; {inside}; {unmeasurable}",
            "'timedatectl set-ntp true' (or configure chrony)",
        )
    said = "NTP-synchronized, " if synced else ""
    return Check(name, "ok", f"{said}{inside}; {unmeasurable}")


def check_certificate(setup: Setup, daemon: DaemonView) -> Check:
    name = "certificate"
    estate = Estate.load(setup.home)
    if estate is None:
        return Check(name, "skip", "this node has joined no estate (local volumes only)")
    expiry = estate.node_cert_expiry
    left = expiry - utc_now()
    if estate.is_revoked(estate.node_id):
        return Check(
            name,
            "fail",
            "this node is revoked by its estate: every peer refuses it",
            "ask the admin: a revoked node id stays revoked; re-init the node and join again",
        )
    if left.total_seconds() <= 0:
        return Check(
            name,
            "fail",
            f"this node's certificate expired on {expiry:%Y-%m-%d %H:%M} UTC: every peer refuses it",
            RENEW,
        )
    if left < EXPIRY_WARNING:
        return Check(
            name,
            "warn",
            f"this node's certificate expires on {expiry:%Y-%m-%d} (in {left.days} days)",
            RENEW,
        )
    return Check(name, "ok", f"valid until {expiry:%Y-%m-%d} ({left.days} days)")


# -- the network ----------------------------------------------------------------------


def routes(text: str) -> list[tuple[str, ipaddress.IPv4Network]]:
    """(interface, destination) of each route in /proc/net/route's text that is up."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 8:
            continue
        iface, dest, flags, mask = fields[0], fields[1], fields[3], fields[7]
        try:
            if not int(flags, 16) & _RTF_UP:
                continue
            # The kernel prints addresses as host-order (little-endian) hex.
            d = ipaddress.IPv4Address(int(dest, 16).to_bytes(4, "little"))
            m = ipaddress.IPv4Address(int(mask, 16).to_bytes(4, "little"))
            net = ipaddress.IPv4Network(f"{d}/{m}", strict=False)
        except ValueError:
            continue
        out.append((iface, net))
    return out


def multicast_interfaces(
    table: list[tuple[str, ipaddress.IPv4Network]], flags_of: Callable[[str], int | None]
) -> list[tuple[str, ipaddress.IPv4Network]]:
    """The routes that carry mDNS (224.0.0.251) out of an interface up and multicast-capable,
    most specific first (an explicit 224.0.0.0/4 before the default route)."""
    group = ipaddress.IPv4Address(MDNS_ADDRESS)
    usable = []
    for iface, net in table:
        if iface == "lo" or group not in net:
            continue
        flags = flags_of(iface)
        if flags is not None and flags & _IFF_UP and flags & _IFF_MULTICAST:
            usable.append((iface, net))
    return sorted(usable, key=lambda r: -r[1].prefixlen)


def interface_flags(iface: str) -> int | None:
    try:
        return int((SYS_NET / iface / "flags").read_text().strip(), 16)
    except (OSError, ValueError):
        return None


def check_mdns(setup: Setup, daemon: DaemonView) -> Check:
    name = "mdns"
    cfg = config_mod.load(setup.home.config_file)
    if not cfg.discovery:
        return Check(name, "skip", "discovery = false in config.toml: peers come from static_peers")
    usable = multicast_interfaces(routes(PROC_ROUTE.read_text()), interface_flags)
    if not usable:
        return Check(
            name,
            "fail",
            f"no route carries multicast ({MDNS_ADDRESS}) out of an interface that is up and "
            "multicast-capable: mDNS finds no peer",
            "'ip route add 224.0.0.0/4 dev IFACE', or list peers in [network] static_peers",
        )
    iface, net = usable[0]
    how = "the default route" if net.prefixlen == 0 else f"the route {net}"
    return Check(name, "ok", f"multicast leaves by {how} on {iface}")


def check_peers(setup: Setup, daemon: DaemonView) -> Check:
    name = "peers"
    if daemon.status is None:
        return Check(name, "skip", f"not measurable: {daemon.why_not}")
    if daemon.status.get("estate") is None:
        return Check(name, "skip", "this node has joined no estate: it has no peers")
    peers = daemon.peers()
    connected = [p for p in peers if p.get("state") == "connected"]
    port = daemon.status.get("port", config_mod.DEFAULT_PORT)
    if connected:
        return Check(name, "ok", f"{len(connected)} of {len(peers)} known peers connected")
    if not peers:
        return Check(
            name,
            "warn",
            "no peer is known: none seen by mDNS, none in static_peers (fine for a lone node)",
            "check the mdns line, or add [network] static_peers",
        )
    states: dict[str, int] = {}
    for p in peers:
        states[str(p.get("state"))] = states.get(str(p.get("state")), 0) + 1
    errors = sorted({str(p["last_error"]) for p in peers if p.get("last_error")})
    said = ", ".join(f"{n} {s}" for s, n in sorted(states.items()))
    last = f"; last error: {errors[0]}" if errors else ""
    return Check(
        name,
        "fail",
        f"none of the {len(peers)} known peers is connected ({said}){last}",
        f"let TCP port {port} in and out in the firewall; 'p2pfs peers' shows each",
    )


def check_origins(setup: Setup, daemon: DaemonView) -> Check:
    name = "origins"
    registry = VolumeRegistry(setup.home)
    followed = []
    for vol in registry.names():
        rec = registry.get(vol)
        if rec.origin is not None:
            followed.append((vol, rec.origin.hex()))
    if not followed:
        return Check(name, "ok", "no volume here is published by another node")
    if daemon.status is None:
        return Check(name, "skip", f"not measurable: {daemon.why_not}")
    state = {str(p.get("node_id")): str(p.get("state")) for p in daemon.peers()}
    away = [
        f"{vol} (origin {origin[:16]}: {state.get(origin, 'not known')})"
        for vol, origin in followed
        if state.get(origin) != "connected"
    ]
    if not away:
        return Check(name, "ok", f"the origins of all {len(followed)} followed volumes connected")
    return Check(
        name,
        "fail",
        f"origin not connected for {len(away)} of {len(followed)} volumes: " + ", ".join(away),
        "start the publishers' daemons and let them reach this node; meanwhile chunks no "
        "peer holds fail to read (EIO)",
    )


def check_chunker(setup: Setup, daemon: DaemonView) -> Check:
    name = "chunker"
    try:
        chunker.self_test()
    except RuntimeError as e:
        return Check(
            name,
            "fail",
            str(e),
            "reinstall p2pfs: its native chunker is built wrong for this machine",
        )
    return Check(name, "ok", "the native FastCDC scan matches its pure twin and pinned digest")


CHECKS: tuple[tuple[str, Callable[[Setup, DaemonView], Check]], ...] = (
    ("fuse-device", check_fuse_device),
    ("fusermount3", check_fusermount),
    ("fuse-conf", check_fuse_conf),
    ("mountpoint", check_mountpoint),
    ("home", check_home),
    ("free-space", check_free_space),
    ("store-fs", check_store_filesystem),
    ("clock", check_clock),
    ("certificate", check_certificate),
    ("mdns", check_mdns),
    ("peers", check_peers),
    ("origins", check_origins),
    ("chunker", check_chunker),
)


def run(setup: Setup) -> list[Check]:
    """Every check, in order (blocking: reads files, asks the daemon)."""
    daemon = DaemonView.ask(setup.home)
    out = []
    for name, fn in CHECKS:
        try:
            out.append(fn(setup, daemon))
        except (P2pfsError, OSError) as e:
            out.append(Check(name, "fail", f"could not check: {e}", _fix_for(e)))
    return out


def _fix_for(e: BaseException) -> str | None:
    if isinstance(e, PermissionError):
        return "run doctor as the user the daemon runs as"
    return None
