"""N hosts on one machine: network namespaces joined by a bridge, for tests, benchmarks and demos.

Layout (see docs/lab.md)::

    <prefix><id>-sw  (switch namespace)     <prefix><id>-h0, -h1, ...  (host namespaces)
    br0 ── <prefix><id>v0  ═══veth═══  eth0 10.213.k.1/24
        ── <prefix><id>v1  ═══veth═══  eth0 10.213.k.2/24
        ── ...

Nothing is created in this machine's own network namespace: the bridge and the
switch side of every veth live in the switch namespace, the other side in a host
namespace. A host has ``lo``, ``eth0`` with one address, a route to the lab subnet
and a multicast route (so mDNS crosses the bridge), and nothing else: it can reach
the other lab hosts and no one outside.

Processes run in a host with ``nsenter --net`` only, so they keep this machine's
mount namespace: a FUSE mount made by a daemon in a host is visible to the caller
(``ip netns exec`` would hide it). Everything a lab creates is recorded in a state
file under ``/run/p2pfs-lab/`` (with the owner's pid) before it is created, and
removed at exit, on failure, on Ctrl-C and, as a last resort, by ``atexit``; the next
lab to start removes the leftovers of labs whose owner died (``cleanup_stale``).
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import string
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from p2pfs.fsutil import locked
from p2pfs.fsutil import process_start as _process_start

from .plumbing import (
    MULTICAST_ROUTE,
    NETNS_DIR,
    LabError,
    ip_cmd,
    link_bytes,
    new_netns,
    new_switch,
    nsenter_argv,
    run_cmd,
    shape_ends,
    unshape_ends,
)

log = logging.getLogger(__name__)

STATE_DIR = Path("/run/p2pfs-lab")
SUBNET = "10.213.{k}.0/24"
HOST_ADDRESS = "10.213.{k}.{i}"
MAX_HOSTS = 250
ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LEN = 4
TERM_GRACE_S = 5.0


def _names_pattern(prefix: str) -> re.Pattern[str]:
    """Namespaces of any lab with this prefix: group 1 is the lab id."""
    return re.compile(rf"^{re.escape(prefix)}([0-9a-z]{{{ID_LEN}}})-(?:sw\d*|h\d+|wan)$")


def _is_host_netns(netns: str) -> bool:
    """A host's namespace (``-h<i>``), not a switch's (``-sw``, ``-sw<j>``) or a router's."""
    return re.search(r"-h\d+$", netns) is not None


def _check_prefix(prefix: str) -> None:
    # Interface names are at most 15 characters: <prefix><id>v<index> must fit.
    if not re.fullmatch(r"[a-z][a-z0-9]{0,5}", prefix):
        raise LabError(f"lab prefix {prefix!r} must be 1-6 lowercase letters or digits")


# -- commands ---------------------------------------------------------------------


def _list_netns() -> list[str]:
    proc = run_cmd(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in proc.stdout.splitlines() if line.strip()]


def _netns_pids(netns: str) -> list[int]:
    proc = run_cmd(["ip", "netns", "pids", netns], check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit() and int(p) != os.getpid()]


def _kill_netns_processes(netns: str, grace: float) -> None:
    """Every process whose network namespace is ``netns``, even ones that left our process groups."""
    pids = _netns_pids(netns)
    if not pids:
        return
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _netns_pids(netns):
        time.sleep(0.05)
    for pid in _netns_pids(netns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _netns_pids(netns):
        time.sleep(0.05)


def _mounted(path: str) -> bool:
    """Whether something is mounted on ``path``, per the kernel's mount table.

    ``os.path.ismount`` is no use here: a FUSE mount whose daemon died fails stat()
    with ENOTCONN, and ismount then says False.
    """
    target = os.path.realpath(path) if os.path.isabs(path) else os.path.abspath(path)
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return os.path.ismount(path)
    for line in table.splitlines():
        fields = line.split()
        if len(fields) > 4:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
            if point in (target, path):
                return True
    return False


def _lazy_unmount(path: str) -> None:
    if _mounted(path) and shutil.which("fusermount3"):
        run_cmd(["fusermount3", "-u", "-z", path], check=False)
    if _mounted(path):
        run_cmd(["umount", "-l", path], check=False)


def _delete_netns(netns: str) -> None:
    if (NETNS_DIR / netns).exists():
        run_cmd(["ip", "netns", "del", netns], check=False)


# -- owners and state files -------------------------------------------------------


def _owner_alive(state: dict[str, Any]) -> bool:
    pid, started = state.get("pid"), state.get("start_time")
    return isinstance(pid, int) and started is not None and _process_start(pid) == str(started)


def _read_states() -> dict[str, dict[str, Any]]:
    """Lab id -> state, for every state file (the caller holds the lock)."""
    states: dict[str, dict[str, Any]] = {}
    for path in STATE_DIR.glob("*.json"):
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(state, dict) and isinstance(state.get("id"), str):
            states[state["id"]] = state
    return states


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    STATE_DIR.mkdir(parents=True, exist_ok=True, mode=0o755)
    with locked(STATE_DIR / ".lock"):
        yield


def _remove_lab(lab_id: str, prefix: str, state: dict[str, Any] | None) -> None:
    """Unmount, kill and delete everything of one lab (its owner is gone or closing)."""
    for mount in (state or {}).get("mounts", []):
        if isinstance(mount, str):
            _lazy_unmount(mount)
    mine = [ns for ns in _list_netns() if ns.startswith(f"{prefix}{lab_id}-")]
    for ns in mine:
        _kill_netns_processes(ns, grace=1.0)
    # Hosts first (their veths go with them), then the switches (and a router).
    for ns in sorted(mine, key=lambda n: not _is_host_netns(n)):
        _delete_netns(ns)
    shutil.rmtree(STATE_DIR / f"{lab_id}.d", ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        (STATE_DIR / f"{lab_id}.json").unlink()


def cleanup_stale(prefix: str = "p2l") -> list[str]:
    """Remove what labs with this prefix left behind when their owner died; return their ids.

    A lab's state file is written before any of its namespaces exist, so a
    namespace with the lab naming pattern and no live owner is a leftover.
    """
    removed: list[str] = []
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return removed
    pattern = _names_pattern(prefix)
    with _locked():
        states = {k: v for k, v in _read_states().items() if v.get("prefix") == prefix}
        dead = {k for k, v in states.items() if not _owner_alive(v)}
        for ns in _list_netns():
            m = pattern.match(ns)
            if m and m.group(1) not in states:
                dead.add(m.group(1))
            probe = re.fullmatch(rf"{re.escape(prefix)}probe(\d+)", ns)
            if probe and _process_start(int(probe.group(1))) is None:
                _delete_netns(ns)
        for lab_id in sorted(dead):
            log.info("removing the leftovers of dead lab %s%s", prefix, lab_id)
            _remove_lab(lab_id, prefix, states.get(lab_id))
            removed.append(lab_id)
    return removed


# -- availability -------------------------------------------------------------------

_unavailable: dict[str, str | None] = {}


def lab_unavailable(prefix: str = "p2l") -> str | None:
    """Why a lab cannot run here (not root, a tool missing, namespaces refused), or None."""
    if prefix in _unavailable:
        return _unavailable[prefix]
    reason = _probe(prefix)
    _unavailable[prefix] = reason
    return reason


def _probe(prefix: str) -> str | None:
    if os.geteuid() != 0:
        return "the lab needs root (network namespaces, bridges, veths)"
    for tool, package in (("ip", "iproute2"), ("tc", "iproute2"), ("nsenter", "util-linux")):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian package {package})"
    ns = f"{prefix}probe{os.getpid()}"
    try:
        run_cmd(["ip", "netns", "add", ns])
        ip_cmd("link", "add", "br0", "type", "bridge", netns=ns)
        ip_cmd("link", "add", "v0", "type", "veth", "peer", "name", "v1", netns=ns)
        ip_cmd("link", "set", "v0", "master", "br0", netns=ns)
        run_cmd([*nsenter_argv(ns), "true"])
    except (LabError, OSError, subprocess.SubprocessError) as e:
        return f"cannot build a network namespace with a bridge and veths: {e}"
    finally:
        _delete_netns(ns)
    return None


# -- building blocks (Lab here, SitesLab in sites.py) -----------------------------------


def plug_host(host: Host, routes: Sequence[tuple[str, str]] = ()) -> None:
    """Create ``host``'s namespace with ``eth0`` cabled to its switch's ``br0``.

    ``routes`` are (subnet, gateway) pairs beyond the host's own /24 and the multicast
    route; there is never a default route.
    """
    ns, sw = host.netns, host.switch_netns
    new_netns(ns)
    # Both ends are born in their namespaces: nothing appears in ours, even briefly.
    ip_cmd("link", "add", host.veth, "type", "veth", "peer", "name", "eth0", "netns", ns, netns=sw)
    ip_cmd("link", "set", host.veth, "master", "br0", netns=sw)
    ip_cmd("link", "set", host.veth, "up", netns=sw)
    ip_cmd("addr", "add", f"{host.address}/24", "dev", "eth0", netns=ns)
    ip_cmd("link", "set", "eth0", "multicast", "on", "up", netns=ns)
    ip_cmd("route", "add", MULTICAST_ROUTE, "dev", "eth0", netns=ns)
    for subnet, gateway in routes:
        ip_cmd("route", "add", subnet, "via", gateway, "dev", "eth0", netns=ns)


# -- hosts ----------------------------------------------------------------------------


class Host:
    """One machine of the lab: a network namespace with ``eth0`` on the lab's switch."""

    def __init__(self, lab: Lab, index: int, name: str) -> None:
        self.lab = lab
        self.index = index
        self.name = name
        self.netns = f"{lab.prefix}{lab.id}-h{index}"
        self.veth = f"{lab.prefix}{lab.id}v{index}"  # the switch side of the cable
        self.switch_netns = lab.switch_netns  # where that side is (a site's switch: sites.py)
        self.address = HOST_ADDRESS.format(k=lab.subnet_index, i=index + 1)

    def __repr__(self) -> str:
        return f"Host({self.name!r}, {self.netns}, {self.address})"

    def nsenter_prefix(self) -> list[str]:
        """Run a command in this host's network namespace, in this machine's mount namespace."""
        return nsenter_argv(self.netns)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen[Any]:
        """Start a process in this host; the lab kills it (and its process group) at exit."""
        kw.setdefault("start_new_session", True)
        kw.setdefault("stdin", subprocess.DEVNULL)
        proc: subprocess.Popen[Any] = subprocess.Popen([*self.nsenter_prefix(), *argv], **kw)
        # nsenter execs the command (no fork for a network namespace): proc.pid is the
        # command, and with a new session it leads its own process group.
        self.lab._track(proc, proc.pid if kw["start_new_session"] else None)
        return proc

    def run(
        self,
        argv: Sequence[str],
        *,
        input: Any = None,
        capture_output: bool = False,
        timeout: float | None = None,
        check: bool = False,
        **kw: Any,
    ) -> subprocess.CompletedProcess[Any]:
        """Like ``subprocess.run`` in this host; a timeout or an interrupt kills the process."""
        if capture_output:
            kw["stdout"] = kw["stderr"] = subprocess.PIPE
        if input is not None:
            kw["stdin"] = subprocess.PIPE
        proc = self.popen(argv, **kw)
        try:
            out, err = proc.communicate(input, timeout=timeout)
        except BaseException:
            self.lab._stop_process(proc, grace=0.0)
            raise
        result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            result.check_returncode()
        return result

    def track_mount(self, path: str | os.PathLike[str]) -> None:
        """A mountpoint a process of this host may leave behind: lazily unmounted at exit."""
        self.lab._track_mount(os.fspath(path))

    def shape(self, rate_mbit: float, delay_ms: float = 0) -> None:
        """Limit this host's cable to ``rate_mbit`` each way, with ``delay_ms`` added each way.

        Egress of ``eth0`` (what the host sends) and of the switch side of the veth
        (what it receives) are both shaped. A rate alone uses ``tbf``; a delay needs
        the kernel's ``netem`` qdisc.
        """
        shape_ends(self._cable_ends(), rate_mbit, delay_ms)

    def unshape(self) -> None:
        unshape_ends(self._cable_ends())

    def link_down(self) -> None:
        """Cut this host's cable at the switch: it keeps its address but reaches no one."""
        ip_cmd("link", "set", self.veth, "down", netns=self.switch_netns)

    def link_up(self) -> None:
        ip_cmd("link", "set", self.veth, "up", netns=self.switch_netns)

    def link_bytes(self) -> tuple[int, int]:
        """(received, sent): bytes through this host's ``eth0`` so far, per its kernel."""
        return link_bytes(self.netns, "eth0")

    def _cable_ends(self) -> list[tuple[str, str]]:
        return [(self.netns, "eth0"), (self.switch_netns, self.veth)]


# -- the lab ---------------------------------------------------------------------------


def _exit_on_sigterm() -> None:
    """Make SIGTERM unwind like Ctrl-C, so ``with Lab()`` blocks and atexit clean up.

    Python's default SIGTERM ends the process without either: a killed benchmark
    left its namespaces behind. Only when nobody else handles SIGTERM, and only
    from the main thread (where signal handlers can be set).
    """
    if threading.current_thread() is not threading.main_thread():
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


class Lab:
    """``n`` hosts (named a, b, c, ... or ``names``) on one switch, in network namespaces.

    Use as a context manager; ``start()``/``close()`` for longer-lived use. Root only.
    """

    def __init__(
        self,
        n: int | None = None,
        *,
        names: Sequence[str] | None = None,
        prefix: str = "p2l",
        subnet_index: int | None = None,
    ) -> None:
        _check_prefix(prefix)
        if names is not None:
            if n is not None and n != len(names):
                raise LabError(f"Lab({n}) given {len(names)} names")
            n = len(names)
        if n is None or not 0 <= n <= MAX_HOSTS:
            raise LabError(f"a lab has 0 to {MAX_HOSTS} hosts")
        if len(set(names or [])) != len(names or []):
            raise LabError(f"host names must be unique: {names}")
        if subnet_index is not None and not 0 <= subnet_index <= 255:
            raise LabError("subnet_index must be 0-255")
        self.prefix = prefix
        self._n = n
        self._names = list(names) if names is not None else None
        self._wanted_subnet = subnet_index
        self.id = ""
        self.subnet_index = -1
        self.subnet_indexes: list[int] = []  # subnet_index first, then any more (sites.py)
        self._subnet_count = 1
        self.hosts: list[Host] = []
        self._procs: dict[subprocess.Popen[Any], int | None] = {}  # process -> its group
        self._mounts: list[str] = []
        self._started = False
        self._closed = False
        self._owner = os.getpid()

    # -- lifecycle

    @property
    def switch_netns(self) -> str:
        return f"{self.prefix}{self.id}-sw"

    @property
    def subnet(self) -> str:
        return SUBNET.format(k=self.subnet_index)

    def __enter__(self) -> Lab:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def start(self) -> Lab:
        if self._started:
            return self
        reason = lab_unavailable(self.prefix)
        if reason:
            raise LabError(f"the lab cannot run here: {reason}")
        cleanup_stale(self.prefix)
        self._owner = os.getpid()
        self._started = True
        atexit.register(self.close)
        _exit_on_sigterm()
        try:
            self._allocate()
            self._build()
        except BaseException:
            self.close()
            raise
        log.info("lab %s%s up: %d hosts on %s", self.prefix, self.id, self._n, self.subnet)
        return self

    def close(self) -> None:
        """Unmount, kill, delete: everything the lab made is gone afterwards. Idempotent."""
        if not self._started or self._closed or os.getpid() != self._owner:
            return  # (a forked child inherits atexit handlers: the lab is not its to remove)
        self._closed = True
        atexit.unregister(self.close)
        for mount in self._mounts:
            _lazy_unmount(mount)
        self._stop_processes()
        if self.id:
            for host in self.hosts:
                _kill_netns_processes(host.netns, grace=TERM_GRACE_S)
            with _locked():
                _remove_lab(self.id, self.prefix, None)
        log.info("lab %s%s removed", self.prefix, self.id)

    def scratch_dir(self, name: str) -> Path:
        """A directory of the lab's own (server configs, logs), removed with the lab.

        Under the state directory, so ``cleanup_stale`` removes it with the lab's
        namespaces when the owner dies.
        """
        if not self._started or self._closed:
            raise LabError("scratch_dir on a lab that is not running")
        if not re.fullmatch(r"[A-Za-z0-9._-]+", name) or name.startswith("."):
            raise LabError(f"bad scratch directory name {name!r}")
        path = STATE_DIR / f"{self.id}.d" / name
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        return path

    # -- hosts

    def add_host(self, name: str | None = None) -> Host:
        """A host that joins later (the cable is plugged in now)."""
        if not self._started or self._closed:
            raise LabError("add_host on a lab that is not running")
        return self._add(name)

    def host(self, name: str) -> Host:
        for h in self.hosts:
            if h.name == name:
                return h
        raise KeyError(name)

    def __iter__(self) -> Iterator[Host]:
        return iter(self.hosts)

    def _add(self, name: str | None) -> Host:
        host = Host(self, *self._new_host_slot(name))
        self.hosts.append(host)
        self._save()  # recorded before it exists, so a crash leaves nothing unrecorded
        plug_host(host)
        return host

    def _new_host_slot(self, name: str | None) -> tuple[int, str]:
        """The next host's index and its name (given, or a, b, c, ...), checked unique."""
        index = len(self.hosts)
        if index >= MAX_HOSTS:
            raise LabError(f"a lab has at most {MAX_HOSTS} hosts")
        if name is None:
            name = string.ascii_lowercase[index] if index < 26 else f"h{index}"
        if any(h.name == name for h in self.hosts):
            raise LabError(f"a host named {name!r} already exists")
        return index, name

    # -- internals

    def _build(self) -> None:
        """The switch and the first hosts (a subclass builds another topology here)."""
        new_switch(self.switch_netns)
        for i in range(self._n):
            self._add(self._names[i] if self._names else None)

    def _allocate(self) -> None:
        with _locked():
            states = _read_states()
            used: set[int] = set()
            for st in states.values():
                if _owner_alive(st):
                    subnets = st.get("subnets") or [st.get("subnet_index")]
                    used.update(k for k in subnets if isinstance(k, int))
            free = [k for k in range(256) if k not in used]
            if self._wanted_subnet is not None:
                if self._wanted_subnet in used:
                    raise LabError(f"subnet 10.213.{self._wanted_subnet}.0/24 is in use")
                free = [self._wanted_subnet, *(k for k in free if k != self._wanted_subnet)]
            if len(free) < self._subnet_count:
                raise LabError(f"no {self._subnet_count} free lab subnets (256 in use)")
            self.subnet_indexes = free[: self._subnet_count]
            self.subnet_index = self.subnet_indexes[0]
            taken = set(states) | {
                m.group(1) for ns in _list_netns() if (m := _names_pattern(self.prefix).match(ns))
            }
            while True:
                lab_id = "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LEN))
                if lab_id not in taken:
                    break
            self.id = lab_id
            self._save()

    def _save(self) -> None:
        state = {
            "id": self.id,
            "prefix": self.prefix,
            "pid": os.getpid(),
            "start_time": _process_start(os.getpid()),
            "subnet_index": self.subnet_index,
            "subnets": self.subnet_indexes,
            "hosts": [h.netns for h in self.hosts],
            "mounts": self._mounts,
        }
        path = STATE_DIR / f"{self.id}.json"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(path)

    def _track(self, proc: subprocess.Popen[Any], pgid: int | None) -> None:
        self._procs = {p: g for p, g in self._procs.items() if p.poll() is None}
        self._procs[proc] = pgid

    def _track_mount(self, path: str) -> None:
        if path not in self._mounts:
            self._mounts.append(path)
            if not self._closed:
                self._save()

    def _stop_processes(self) -> None:
        """SIGTERM every group we started, wait a little, then SIGKILL what is left."""
        procs = list(self._procs)
        for proc in procs:
            self._signal(proc, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_S
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
        for proc in procs:
            self._stop_process(proc, grace=0.0)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self._procs.clear()

    def _stop_process(self, proc: subprocess.Popen[Any], grace: float) -> None:
        if grace > 0:
            self._signal(proc, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(grace)
        self._signal(proc, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(TERM_GRACE_S)

    def _signal(self, proc: subprocess.Popen[Any], sig: int) -> None:
        """Signal the process group the lab gave the process.

        Only while the leader is not reaped (a zombie still holds its pid, so the group
        id cannot have been reused); members that outlive it are found by namespace.
        """
        pgid = self._procs.get(proc)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if pgid is not None and proc.returncode is None and pgid != os.getpgid(0):
                os.killpg(pgid, sig)
            elif proc.poll() is None:
                proc.send_signal(sig)
