"""Appliance-mode commands of the ``p2pfs`` command line (docs/appliance.md).

On the appliance (admin, with its node home): ``appliance token add|remove|list``.
On a desktop (no home, only a token file): ``mount --appliance ADDR --token FILE``
(hooked into ``cli/mounts.py``), ``umount`` of such a mount (hooked into
``cli/mounts.py``), and ``appliance status|peers|pin|unpin --token FILE``, which speak
the user API over the desktop link (``status`` and ``peers`` as lines, or ``--json``). ``thin-mount`` is the foreground process
behind ``mount --appliance`` (for a systemd unit or a test).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import trio

from p2pfs.appliance.link_client import ApplianceLink, with_link
from p2pfs.appliance.thin_fs import DEFAULT_DEADLINE, ThinMount, read_state, state_dir, state_file
from p2pfs.errors import NotFound, UsageError
from p2pfs.fsutil import write_atomic
from p2pfs.net.link import parse_address
from p2pfs.sizes import format_size
from p2pfs.trust.desktop import ApplianceKeys, load_token

from . import image as image_cli
from .common import Handler, Subparsers, node_home, start_until_ready, wait_stopped

log = logging.getLogger(__name__)


def add_commands(sub: Subparsers) -> dict[str, Handler]:
    ap = sub.add_parser("appliance", help="appliance mode: desktop tokens; the desktop side")
    asub = ap.add_subparsers(dest="appliance_command", required=True, metavar="ACTION")
    tok = asub.add_parser("token", help="(admin, on the appliance) desktop tokens")
    tsub = tok.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    ta = tsub.add_parser("add", help="make a desktop's token file (replaces its old token)")
    ta.add_argument("desktop")
    ta.add_argument("--out", required=True, type=Path, metavar="FILE")
    ta.add_argument("--address", help="the appliance's address as desktops reach it")
    tr = tsub.add_parser("remove", help="shut a desktop out")
    tr.add_argument("desktop")
    tl = tsub.add_parser("list", help="the desktops holding a token")
    tl.add_argument("--json", action="store_true")
    for name, helptext in (
        ("status", "(desktop) the appliance's status over the desktop link"),
        ("peers", "(desktop) the appliance's peers (no addresses)"),
        ("pin", "(desktop) pin VOLUME:/path on the appliance, if its policy allows"),
        ("unpin", "(desktop) unpin VOLUME:/path on the appliance"),
    ):
        p = asub.add_parser(name, help=helptext)
        _desktop_args(p)
        if name not in ("status", "peers"):
            p.add_argument("target", metavar="VOLUME:/PATH")
        if name == "pin":
            p.add_argument("--follow", action="store_true")
        p.add_argument("--json", action="store_true")
    image_cli.add_actions(asub)  # build, seed, firstboot: the VM image (cli/image.py)

    tm = sub.add_parser("thin-mount", help="(desktop) the thin client in the foreground")
    tm.add_argument("mountpoint", type=Path)
    _desktop_args(tm)
    tm.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    return {"appliance": cmd_appliance, "thin-mount": cmd_thin_mount}


def _desktop_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", required=True, type=Path, metavar="FILE")
    p.add_argument("--appliance", metavar="ADDR", help="default: the address in the token file")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, metavar="SECONDS")


def add_mount_arguments(mo: argparse.ArgumentParser) -> None:
    """``p2pfs mount --appliance ADDR --token FILE``: the desktop's thin mount."""
    mo.add_argument("--appliance", metavar="ADDR", help="(desktop) mount this appliance's volumes")
    mo.add_argument("--token", type=Path, metavar="FILE", help="(desktop) this desktop's token")
    mo.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE, metavar="SECONDS")


def _address(args: argparse.Namespace) -> tuple[Any, Any]:
    token = load_token(args.token)
    text = args.appliance or token.appliance
    if not text:
        raise UsageError("name the appliance with --appliance ADDR (the token file has none)")
    if not 0.1 <= args.deadline <= 3600:
        raise UsageError("--deadline must be 0.1 to 3600 seconds")
    return parse_address(text), token


# -- admin: tokens ------------------------------------------------------------


def cmd_appliance(args: argparse.Namespace) -> int:
    if args.appliance_command == "token":
        return _cmd_token(args)
    if args.appliance_command in image_cli.ACTIONS:
        return image_cli.cmd_action(args)
    return _cmd_desktop(args)


def _cmd_token(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    keys = ApplianceKeys(home)
    if args.token_command == "add":
        if args.address:
            parse_address(args.address)
        token = keys.add(args.desktop, args.address)
        write_atomic(args.out, token.encode(), 0o600)
        print(f"token for desktop {args.desktop} written to {args.out} (give it to that desktop)")
        return 0
    if args.token_command == "remove":
        keys.remove(args.desktop)
        print(f"desktop {args.desktop} can no longer connect")
        return 0
    rows = keys.desktops()
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        for r in rows:
            print(r["desktop"])
    return 0


# -- desktop: user operations over the link --------------------------------------


def _cmd_desktop(args: argparse.Namespace) -> int:
    address, token = _address(args)
    op = args.appliance_command
    kw: dict[str, Any] = {}
    if op not in ("status", "peers"):
        volume, sep, path = args.target.partition(":")
        if not sep or not volume:
            raise UsageError(f"{args.target!r} is not VOLUME:/path")
        kw = {"volume": volume, "path": path or "/"}
        if op == "pin":
            kw["follow"] = bool(args.follow)

    async def call(link: ApplianceLink) -> Any:
        result = await link.call(op, **kw)
        if op == "pin":
            while result["state"] in ("resolving", "fetching"):
                await trio.sleep(0.2)
                result = await link.call("pin-status", **kw)
        return result

    result = trio.run(with_link, address, token, args.deadline, call)
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
    elif op == "status":
        print("\n".join(status_lines(result)))
    elif op == "peers":
        print("\n".join(peer_lines(result)))
    elif op == "pin":
        print(f"pinned {result['name']}: {result['state']}")
    else:
        print(f"unpinned {result['unpinned']}")
    if op == "pin" and result["state"] != "complete":
        return 1
    return 0


def status_lines(st: dict[str, Any]) -> list[str]:
    """``appliance status`` for a person: the desktop's view (node/desktop_view.py)."""
    lines = [f"appliance {st['appliance']}: {st['health']}"]
    lines += [f"  problem: {p}" for p in st["problems"]]
    lines.append(f"estate: {st['estate'] or 'none'}")
    for v in st["volumes"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v["snapshot_time"]))
        lines.append(f"volume {v['name']}: snapshot {v['seq']} of {when}")
    if not st["volumes"]:
        lines.append("volumes: none yet")
    pins = st["pins"]
    ready = "ready" if st["offline_ready"] else "not ready"
    lines.append(
        f"offline: {ready} ({pins['complete']} of {pins['count']} pins complete, "
        f"{format_size(pins['bytes'])})"
    )
    peers = st["peers"]
    lines.append(f"peers: {peers['connected']} connected of {peers['known']} known")
    cache = st["cache"]
    quota = format_size(cache["quota"]) if cache["quota"] is not None else "no quota"
    lines.append(f"cache: {format_size(cache['used'])} of {quota}")
    b = st["bytes_from"]
    lines.append(
        f"read from: {format_size(b['local'])} local, {format_size(b['peers'])} peers, "
        f"{format_size(b['origin'])} origin; {st['corrupt_chunks_rejected']} corrupt chunks "
        "rejected"
    )
    if st["uptime_s"] is not None:
        lines.append(f"up {st['uptime_s']:.0f} s")
    policy = st["policy"]
    lines.append(
        f"policy: pin from desktops {'allowed' if policy['pin'] else 'refused'}, "
        f".snapshots {'shown' if policy['snapshots'] else 'hidden'}"
    )
    return lines


def peer_lines(result: dict[str, Any]) -> list[str]:
    """``appliance peers`` for a person: one line per peer, no address."""
    lines = [f"{result['connected']} connected of {result['known']} known"]
    for p in result["peers"]:
        lines.append(f"{p['peer']}  {p['state']:<12} {format_size(p['bytes_from'])} from it")
    return lines


# -- desktop: the thin mount --------------------------------------------------------


def cmd_thin_mount(args: argparse.Namespace) -> int:
    address, token = _address(args)
    mp = args.mountpoint.absolute()
    return ThinMount(address, token, mp, deadline=args.deadline, ready_fd=args.ready_fd).run()


def cmd_mount_thin(args: argparse.Namespace) -> int:
    """``p2pfs mount --appliance ADDR --token FILE MOUNTPOINT``: detached, once usable."""
    if args.token is None:
        raise UsageError("a mount of an appliance needs --token FILE (and --appliance ADDR)")
    _address(args)  # a bad token file or address fails here, in the foreground
    mp = args.mountpoint.absolute()
    state_dir().mkdir(parents=True, exist_ok=True, mode=0o700)
    log_path = state_file(mp).with_suffix(".log")
    cmd = [sys.executable, "-m", "p2pfs", *(["-v"] * args.verbose), "thin-mount", str(mp)]
    cmd += ["--token", str(args.token.absolute()), "--deadline", str(args.deadline)]
    if args.appliance:
        cmd += ["--appliance", args.appliance]
    pid = start_until_ready(cmd, log_path, "the thin client")
    print(f"mounted the appliance's volumes on {mp} (pid {pid}, log {log_path})")
    return 0


def umount_thin(mp: Path) -> int | None:
    """Unmount a thin mount on ``mp`` and stop its process; None if ``mp`` is not one."""
    state = read_state(mp)
    if state is None:
        return None
    pid = int(state["pid"])
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        # The thin client died and left its mount behind: clear it.
        state_file(mp).unlink(missing_ok=True)
        if os.path.ismount(mp) or _stale(mp):
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)
            print(f"removed a stale thin mount from {mp}")
            return 0
        raise NotFound(f"no thin mount on {mp}") from None
    wait_stopped(pid, mp, "the thin client")
    print(f"unmounted {mp}")
    return 0


def _stale(mp: Path) -> bool:
    try:
        os.stat(mp)
    except OSError:
        return True
    return False
