"""The commands a lab is built from: ``ip``, ``tc``, ``nsenter`` and sysctls inside
network namespaces, with the one error they raise (see ``netns.py`` for the layout)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Sequence
from pathlib import Path

from p2pfs.errors import P2pfsError

NETNS_DIR = Path("/run/netns")
MULTICAST_ROUTE = "224.0.0.0/4"
CMD_TIMEOUT_S = 30.0


class LabError(P2pfsError):
    """The lab could not be built or changed (missing tool, kernel feature, permission)."""


def run_cmd(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=CMD_TIMEOUT_S, stdin=subprocess.DEVNULL
    )
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def ip_cmd(*args: str, netns: str | None = None, check: bool = True) -> str:
    argv = ["ip"] + (["-n", netns] if netns else []) + list(args)
    return run_cmd(argv, check=check).stdout


def nsenter_argv(netns: str) -> list[str]:
    return ["nsenter", f"--net={NETNS_DIR / netns}", "--"]


def write_sysctl(netns: str, path: str, value: str) -> None:
    """A per-namespace sysctl, written from inside the namespace (``/proc/sys/net`` is per netns)."""
    f = f"/proc/sys/{path}"
    run_cmd([*nsenter_argv(netns), "sh", "-c", f"[ ! -e {f} ] || echo {value} > {f}"])


def new_netns(netns: str) -> None:
    """An empty namespace: IPv6 off (the lab is IPv4, like discovery), ``lo`` up."""
    run_cmd(["ip", "netns", "add", netns])
    write_sysctl(netns, "net/ipv6/conf/all/disable_ipv6", "1")
    write_sysctl(netns, "net/ipv6/conf/default/disable_ipv6", "1")
    ip_cmd("link", "set", "lo", "up", netns=netns)


def new_switch(netns: str) -> None:
    """A namespace holding ``br0``: no STP (ports forward at once), no multicast snooping
    (mDNS floods to every port)."""
    new_netns(netns)
    ip_cmd(
        "link", "add", "br0", "type", "bridge", "stp_state", "0", "mcast_snooping", "0", netns=netns
    )
    ip_cmd("link", "set", "br0", "up", netns=netns)


def shape_ends(ends: Sequence[tuple[str, str]], rate_mbit: float, delay_ms: float = 0) -> None:
    """Shape the egress of every (namespace, device): ``tbf`` for a rate, ``netem`` with a delay."""
    if rate_mbit <= 0 or delay_ms < 0:
        raise LabError(f"bad shape: rate {rate_mbit} Mbit/s, delay {delay_ms} ms")
    if delay_ms > 0:
        qdisc = ["netem", "delay", f"{delay_ms:g}ms", "rate", f"{rate_mbit:g}mbit"]
        qdisc += ["limit", "100000"]
    else:
        # 10 ms worth of bytes (at least 64 KiB so GSO segments pass unsplit).
        burst = max(64 * 1024, int(rate_mbit * 1e6 / 8 / 100))
        qdisc = ["tbf", "rate", f"{rate_mbit:g}mbit", "burst", str(burst), "latency", "200ms"]
    for ns, dev in ends:
        proc = run_cmd(
            ["tc", "-n", ns, "qdisc", "replace", "dev", dev, "root", *qdisc], check=False
        )
        if proc.returncode != 0:
            if "unknown" in proc.stderr.lower() and qdisc[0] == "netem":
                raise LabError(
                    "a delay needs the netem qdisc, which this kernel lacks "
                    "(CONFIG_NET_SCH_NETEM); shape with a rate only"
                )
            raise LabError(f"tc qdisc on {ns}/{dev} failed: {proc.stderr.strip()}")


def unshape_ends(ends: Sequence[tuple[str, str]]) -> None:
    for ns, dev in ends:
        run_cmd(["tc", "-n", ns, "qdisc", "del", "dev", dev, "root"], check=False)


def link_bytes(netns: str, dev: str) -> tuple[int, int]:
    """(rx, tx) byte counters of ``dev`` in ``netns`` (``ip -s -j link``)."""
    info = json.loads(ip_cmd("-s", "-j", "link", "show", "dev", dev, netns=netns))
    stats = info[0].get("stats64") or info[0]["stats"]
    return int(stats["rx"]["bytes"]), int(stats["tx"]["bytes"])
