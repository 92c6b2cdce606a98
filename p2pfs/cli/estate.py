"""The estate commands of the ``p2pfs`` command line: enrolment, revocation, show.

``cli/main.py`` registers them through ``add_commands``. Every
handler takes the parsed arguments, calls one function of ``estate.py``, prints,
and returns the exit code; user errors are raised as ``P2pfsError`` and printed
by ``cli.main`` as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from typing import Any

from p2pfs.errors import NotRunning, P2pfsError, UsageError
from p2pfs.home import Home
from p2pfs.node import control
from p2pfs.trust import certs, enrolment, estate, revocation

from .common import STDIO, Handler, Subparsers, node_home, read_input, write_output

log = logging.getLogger(__name__)


def add_commands(sub: Subparsers) -> dict[str, Handler]:
    """Register ``estate ...``, ``request-join`` and ``join``; return their handlers."""
    es = sub.add_parser("estate", help="the estate: its CA, approvals and revocations")
    esub = es.add_subparsers(dest="estate_command", required=True, metavar="ACTION")
    esub.add_parser("init", help="(admin) create the estate CA and enrol this node")
    ap = esub.add_parser("approve", help="(admin) issue a node's certificate from its request")
    ap.add_argument("request", help="the join request file ('-' for stdin)")
    ap.add_argument("--out", required=True, metavar="BUNDLE", help="bundle file ('-': stdout)")
    rv = esub.add_parser("revoke", help="(admin) revoke a node; peers refuse it from then on")
    rv.add_argument("node_id", metavar="NODE_ID")
    sh = esub.add_parser("show", help="estate id, role, certificate expiry, revocations")
    sh.add_argument("--json", action="store_true")

    rj = sub.add_parser("request-join", help="write this node's join request for the admin")
    rj.add_argument("--out", required=True, metavar="FILE", help="request file ('-': stdout)")
    jo = sub.add_parser("join", help="join the estate with the bundle the admin approved")
    jo.add_argument("bundle", help="the bundle file ('-' for stdin)")
    return {"estate": cmd_estate, "request-join": cmd_request_join, "join": cmd_join}


def _daemon_running(home: Home) -> bool:
    try:
        control.call(home.control_socket, "status", timeout=5)
    except NotRunning:
        return False
    except P2pfsError:
        return True
    return True


def _parse_node_id(text: str) -> bytes:
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        raise UsageError(f"node id {text!r} is not hexadecimal") from None
    if len(raw) != revocation.NODE_ID_SIZE:
        raise UsageError(f"node id {text!r} must be {revocation.NODE_ID_SIZE * 2} hex digits")
    return raw


# -- commands -------------------------------------------------------------------


def cmd_request_join(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    request = enrolment.request_join(home)
    write_output(args.out, request)
    if args.out != STDIO:
        print(
            f"wrote the join request of node {home.node_id().hex()} to {args.out}: "
            "give it to the estate admin ('p2pfs estate approve')",
            file=sys.stderr,
        )
    return 0


def cmd_join(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    member = enrolment.join(home, read_input(args.bundle, enrolment.MAX_BUNDLE, "bundle"))
    print(f"joined estate {member.estate_id.hex()} as node {member.node_id.hex()}")
    if _daemon_running(home):
        print("note: restart the daemon of this node to connect to the estate", file=sys.stderr)
    return 0


def cmd_estate(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    action = args.estate_command
    if action == "init":
        created = enrolment.init_estate(home)
        print(created.estate_id.hex())
        return 0
    if action == "approve":
        request = read_input(args.request, certs.MAX_REQUEST, "join request")
        node_id, _ = certs.parse_request(request)
        bundle = enrolment.approve(home, request)
        write_output(args.out, bundle)
        print(node_id.hex(), file=sys.stderr if args.out == STDIO else sys.stdout)
        return 0
    if action == "revoke":
        target = _parse_node_id(args.node_id)
        member = estate.Estate.load(home)
        was_revoked = member is not None and member.is_revoked(target)
        number = enrolment.revoke(home, target)
        if was_revoked:
            print(f"node {target.hex()} was already revoked (revocation list {number})")
        else:
            print(f"revoked node {target.hex()}: revocation list {number}")
        # A running daemon applies the new list and spreads it to its peers.
        with contextlib.suppress(NotRunning):
            control.call(home.control_socket, "reload", timeout=30)
        return 0
    return _show(home, args.json)


def _show(home: Home, as_json: bool) -> int:
    member = estate.Estate.load(home)
    info: dict[str, Any]
    if member is None:
        info = {"estate_id": None, "node_id": home.node_id().hex()}
    else:
        info = {
            "estate_id": member.estate_id.hex(),
            "node_id": member.node_id.hex(),
            "is_admin": member.is_admin,
            "certificate_expires": member.node_cert_expiry.isoformat(),
            "revocation_number": member.revocation_number,
            "revoked": [n.hex() for n in member.revoked],
        }
    if as_json:
        print(json.dumps(info, indent=2, sort_keys=True))
        return 0
    if member is None:
        print(f"node {info['node_id']} has joined no estate")
        return 0
    role = "admin (holds the estate CA key)" if member.is_admin else "member"
    print(f"estate {info['estate_id']}")
    print(f"node {info['node_id']}: {role}")
    print(f"certificate expires {member.node_cert_expiry:%Y-%m-%d %H:%M} UTC")
    print(f"revocation list {member.revocation_number}: {len(member.revoked)} revoked")
    for n in info["revoked"]:
        print(f"revoked: {n}")
    return 0
