"""Commands that mount: mount, umount, daemon (the node; a desktop's thin mount too)."""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
from pathlib import Path

from p2pfs.errors import NotFound, NotRunning, P2pfsError
from p2pfs.fs.mount import check_mountpoint, is_p2pfs_mount
from p2pfs.node import control

from . import appliance as appliance_cli
from .common import Handler, Subparsers, node_home, start_until_ready, wait_stopped

ALLOW_OTHER_HELP = (
    "let other users use the mount (always so for root; a user needs user_allow_other in "
    "/etc/fuse.conf)"
)


def add_commands(sub: Subparsers) -> dict[str, Handler]:
    mo = sub.add_parser("mount", help="start the node's daemon, mounted; returns once usable")
    mo.add_argument("mountpoint", type=Path)
    mo.add_argument(
        "--read-only", action="store_true", help="mount even the volumes published here read-only"
    )
    mo.add_argument("--allow-other", action="store_true", help=ALLOW_OTHER_HELP)
    appliance_cli.add_mount_arguments(mo)

    um = sub.add_parser("umount", help="unmount and stop the node's daemon")
    um.add_argument("mountpoint", type=Path)

    da = sub.add_parser("daemon", help="run the node in the foreground (for systemd)")
    da.add_argument("--mount", type=Path, dest="mountpoint", metavar="MOUNTPOINT")
    da.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    da.add_argument("--debug-faults", action="store_true", help=argparse.SUPPRESS)
    da.add_argument("--read-only", action="store_true", help="no writable volumes")
    da.add_argument("--allow-other", action="store_true", help=ALLOW_OTHER_HELP)
    return {"mount": cmd_mount, "umount": cmd_umount, "daemon": cmd_daemon}


def cmd_daemon(args: argparse.Namespace) -> int:
    from p2pfs.node.daemon import Daemon

    home = node_home(args)
    mp = args.mountpoint.absolute() if args.mountpoint else None
    return Daemon(
        home,
        mp,
        ready_fd=args.ready_fd,
        debug_faults=args.debug_faults,
        read_only=args.read_only,
        allow_other=args.allow_other,
    ).run()


def cmd_mount(args: argparse.Namespace) -> int:
    if args.appliance or args.token:  # a desktop's thin mount of its appliance
        return appliance_cli.cmd_mount_thin(args)
    home = node_home(args).require()
    mp = args.mountpoint.absolute()
    check_mountpoint(mp)
    with contextlib.suppress(NotRunning):
        st = control.call(home.control_socket, "status", timeout=5)
        raise P2pfsError(
            f"the daemon of {home.root} is already running (pid {st['daemon']['pid']}, "
            f"mounted on {st['daemon']['mountpoint']}): one node has one mount"
        )
    home.log_dir.mkdir(parents=True, exist_ok=True)
    log_path = home.log_dir / "daemon.log"
    cmd = [sys.executable, "-m", "p2pfs", "--home", str(home.root)]
    cmd += ["-v"] * args.verbose
    cmd += ["daemon", "--mount", str(mp)]
    cmd += ["--read-only"] if args.read_only else []
    cmd += ["--allow-other"] if args.allow_other else []
    pid = start_until_ready(cmd, log_path, "the daemon")
    print(f"mounted {home.root} on {mp} (daemon pid {pid}, log {log_path})")
    return 0


def cmd_umount(args: argparse.Namespace) -> int:
    home = node_home(args)
    mp = args.mountpoint.absolute()
    if (thin := appliance_cli.umount_thin(mp)) is not None:
        return thin
    try:
        st = control.call(home.control_socket, "status", timeout=10)
    except NotRunning:
        # A dead daemon's mount fails stat (ENOTCONN), so ask the mount table.
        if is_p2pfs_mount(mp):
            # The daemon died and left its mount behind: clear it.
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
            print(f"removed a stale p2pfs mount from {mp}")
            return 0
        raise NotFound(f"nothing of {home.root} is mounted on {mp}") from None
    mounted = st["daemon"]["mountpoint"]
    if mounted is None or Path(mounted) != mp:
        raise NotFound(f"the daemon of {home.root} is not mounted on {mp} (mounted on: {mounted})")
    pid = int(st["daemon"]["pid"])
    control.call(home.control_socket, "stop", timeout=10)
    wait_stopped(pid, mp, "the daemon")
    print(f"unmounted {mp}")
    return 0
