"""The doctor's and the mount helper's pure parts: mount(8)'s options, routes, fuse.conf."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from p2pfs.cli.mount_helper import helper_argv, mount_flags
from p2pfs.errors import UsageError
from p2pfs.home import Home
from p2pfs.node import doctor

pytestmark = pytest.mark.unit

# /proc/net/route of a host with a default route and an explicit multicast route.
ROUTE = """Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT
eth0\t00000000\t010200C0\t0003\t0\t0\t0\t00000000\t0\t0\t0
eth0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0
br0\t000000E0\t00000000\t0001\t0\t0\t0\t000000F0\t0\t0\t0
down0\t000000E0\t00000000\t0000\t0\t0\t0\t000000F0\t0\t0\t0
"""
UP_MULTICAST = 0x1003


def test_fstab_options_map_to_mount_flags() -> None:
    opts = ["ro,_netdev,x-systemd.automount,allow_other", "nofail,defaults,nosuid,nodev,noexec"]
    assert mount_flags(opts) == ["--read-only", "--allow-other"]
    assert mount_flags(["rw,suid,dev,exec,auto,noauto,comment=systemd.x"]) == []


def test_unknown_mount_option_is_named() -> None:
    with pytest.raises(UsageError, match="unknown mount option 'uid=5'"):
        mount_flags(["ro,uid=5"])


def test_helper_argv_is_p2pfs_mount() -> None:
    argv = helper_argv(["/srv/home", "/p2pfs", "-o", "ro,_netdev", "-n", "-t", "fuse.p2pfs"])
    assert argv == ["--home", "/srv/home", "mount", "/p2pfs", "--read-only"]
    assert helper_argv(["/srv/home", "/p2pfs", "-f", "-o", "allow_other"]) is None
    # Sloppy (-s): what the helper lacks is dropped, not refused.
    assert helper_argv(["/h", "/m", "-s", "-o", "uid=5,ro"]) == [
        "--home",
        "/h",
        "mount",
        "/m",
        "--read-only",
    ]
    with pytest.raises(UsageError, match=r"not 'fuse\.sshfs'"):
        helper_argv(["/h", "/m", "-t", "fuse.sshfs"])


def test_routes_and_the_interface_mdns_leaves_by() -> None:
    table = doctor.routes(ROUTE)
    assert ("eth0", ipaddress.IPv4Network("0.0.0.0/0")) in table
    assert ("br0", ipaddress.IPv4Network("224.0.0.0/4")) in table
    assert all(iface != "down0" for iface, _ in table)  # not up
    flags = {"eth0": UP_MULTICAST, "br0": UP_MULTICAST}
    usable = doctor.multicast_interfaces(table, flags.get)
    assert usable[0] == ("br0", ipaddress.IPv4Network("224.0.0.0/4"))  # most specific first
    assert doctor.multicast_interfaces(table, {"eth0": 0x1003, "br0": 0x1}.get) == [
        ("eth0", ipaddress.IPv4Network("0.0.0.0/0"))
    ]
    assert doctor.multicast_interfaces(table, lambda _: 0x0003) == []  # no IFF_MULTICAST


def test_user_allow_other_in_fuse_conf() -> None:
    assert doctor.user_allow_other("# mount_max = 1000\nuser_allow_other\n")
    assert not doctor.user_allow_other("#user_allow_other\n")
    assert doctor.user_allow_other("  user_allow_other   # for Samba\n")


def test_doctor_on_a_fresh_home_without_daemon(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.init()
    checks = {c.check: c for c in doctor.run(doctor.Setup(home, tmp_path / "nowhere"))}
    assert list(checks) == [name for name, _ in doctor.CHECKS]
    assert checks["home"].status == "ok"
    assert checks["certificate"].status == "skip"
    assert checks["peers"].status == "skip" and "no daemon" in checks["peers"].detail
    assert checks["chunker"].status == "ok"
    mp = checks["mountpoint"]
    assert not mp.ok and mp.fix == f"'mkdir -p {tmp_path / 'nowhere'}'"
    assert mp.to_json() == {
        "check": "mountpoint",
        "ok": False,
        "status": "fail",
        "detail": f"{tmp_path / 'nowhere'} does not exist",
        "fix": mp.fix,
    }


def test_doctor_names_a_loose_key(tmp_path: Path) -> None:
    home = Home(tmp_path / "home")
    home.init()
    home.node_key.chmod(0o644)
    home.root.chmod(0o777)
    check = doctor.check_home(doctor.Setup(home), doctor.DaemonView(None, "none"))
    assert check.status == "fail"
    assert f"{home.node_key} is mode 0644, not 0600" in check.detail
    assert "world-writable" in check.detail
    assert check.fix is not None and f"'chmod 600 {home.node_key}'" in check.fix
