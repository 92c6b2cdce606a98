"""``p2pfs doctor``: what breaks an install, one line per check (the checks: node/doctor.py)."""

from __future__ import annotations

import argparse
from pathlib import Path

from p2pfs.errors import EXIT_ERROR, EXIT_OK
from p2pfs.node import doctor

from .common import Handler, Subparsers, node_home, print_json

MARKS = {"ok": "ok", "warn": "WARN", "fail": "FAIL", "skip": "skip"}


def add_commands(sub: Subparsers) -> dict[str, Handler]:
    dr = sub.add_parser(
        "doctor",
        help="check what breaks an install (FUSE, mountpoint, home, disk, estate, network)",
    )
    dr.add_argument(
        "--mount", type=Path, dest="mountpoint", metavar="PATH", help="also check this mountpoint"
    )
    dr.add_argument(
        "--allow-other",
        action="store_true",
        help="the mount must be open to other users (Samba, fstab's allow_other)",
    )
    dr.add_argument(
        "--json", action="store_true", help="a list of {check, ok, status, detail, fix}"
    )
    return {"doctor": cmd_doctor}


def render(c: doctor.Check) -> str:
    line = f"{MARKS[c.status]:<4}  {c.check:<12} {c.detail}"
    if c.fix and c.status in ("fail", "warn"):
        line += f" -- fix: {c.fix}"
    return line


def cmd_doctor(args: argparse.Namespace) -> int:
    setup = doctor.Setup(
        node_home(args),
        args.mountpoint.absolute() if args.mountpoint else None,
        allow_other=args.allow_other,
    )
    checks = doctor.run(setup)
    if args.json:
        print_json([c.to_json() for c in checks])
    else:
        for c in checks:
            print(render(c))
    return EXIT_OK if all(c.ok for c in checks) else EXIT_ERROR
