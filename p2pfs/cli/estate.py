"""The estate commands of the ``p2pfs`` command line: enrolment, revocation, show, and
the estate backup and its restore (docs/recovery.md).

``cli/main.py`` registers them through ``add_commands``. Every
handler takes the parsed arguments, calls one function of ``estate.py``, prints,
and returns the exit code; user errors are raised as ``P2pfsError`` and printed
by ``cli.main`` as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import getpass
import json
import logging
import sys
from pathlib import Path
from typing import Any

from p2pfs.errors import Busy, DecodeError, NotFound, NotRunning, P2pfsError, UsageError
from p2pfs.fsutil import read_bounded, write_atomic
from p2pfs.home import Home
from p2pfs.node import control
from p2pfs.trust import backup, certs, enrolment, estate, revocation

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
    bk = esub.add_parser(
        "backup", help="(admin) write the CA, volume keys and access lists, under a passphrase"
    )
    bk.add_argument("--out", required=True, metavar="FILE", help="the backup file to write")
    bk.add_argument("--force", action="store_true", help="replace an existing FILE")
    rs = esub.add_parser(
        "restore", help="make this new node the estate's admin from an estate backup"
    )
    rs.add_argument("backup", metavar="FILE", help="the file 'estate backup' wrote")
    for p in (bk, rs):
        p.add_argument(
            "--passphrase-file",
            type=Path,
            metavar="FILE",
            help="the passphrase is FILE's first line (else it is asked on the terminal)",
        )

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
    if action == "backup":
        return _backup(home, args)
    if action == "restore":
        return _restore(home, args)
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


# -- backup and restore -----------------------------------------------------------

MIN_PASSPHRASE = 8  # characters, for a passphrase typed at a backup
_MAX_PASSPHRASE_FILE = 64 * 1024


def _passphrase(args: argparse.Namespace, *, confirm: bool) -> bytes:
    """From ``--passphrase-file`` (its first line), else asked on the terminal (twice
    with ``confirm``, for a backup)."""
    if args.passphrase_file is not None:
        data = read_bounded(args.passphrase_file, _MAX_PASSPHRASE_FILE, "passphrase file")
        line = data.split(b"\n", 1)[0].removesuffix(b"\r")
        if not line:
            raise UsageError(
                f"the passphrase file {args.passphrase_file} starts with an empty line"
            )
        return line
    if sys.stdin is None or not sys.stdin.isatty():
        raise UsageError("no terminal to ask the passphrase on: give --passphrase-file FILE")
    try:
        first = getpass.getpass("estate backup passphrase: ")
        if confirm:
            if len(first) < MIN_PASSPHRASE:
                raise UsageError(f"a passphrase needs at least {MIN_PASSPHRASE} characters")
            if getpass.getpass("the same again: ") != first:
                raise UsageError("the two passphrases differ; nothing written")
    except EOFError:
        raise UsageError("no passphrase given") from None
    if not first:
        raise UsageError("no passphrase given")
    return first.encode("utf-8")


def _backup(home: Home, args: argparse.Namespace) -> int:
    out = Path(args.out).absolute()
    if out.is_dir():
        raise P2pfsError(f"{out} is a directory")
    if not out.parent.is_dir():
        raise NotFound(f"cannot write {out}: {out.parent} is not a directory")
    if out.exists() and not args.force:
        raise P2pfsError(f"{out} exists; not overwriting it (--force replaces it)")
    held = backup.collect(home)  # before the passphrase: a non-admin is refused at once
    data = backup.seal_backup(backup.encode_contents(held), _passphrase(args, confirm=True))
    try:
        write_atomic(out, data, 0o600, overwrite=args.force)
    except FileExistsError:
        raise P2pfsError(f"{out} exists; not overwriting it (--force replaces it)") from None
    except PermissionError:
        raise P2pfsError(f"cannot write {out} (permission denied)") from None
    names = [v.name for v in held.volumes]
    volumes = f"{len(names)} volume{'' if len(names) == 1 else 's'}"
    print(
        f"estate {held.estate_id.hex()}: CA, {volumes}"
        + (f" ({', '.join(names)})" if names else "")
        + f", access list {held.access.number} ({len(held.secrets)} private), "
        f"revocation list {held.revocations.number} -> {args.out}"
    )
    print(
        "keep the file and its passphrase apart: together they admit any machine to the estate",
        file=sys.stderr,
    )
    return 0


def _restore(home: Home, args: argparse.Namespace) -> int:
    if _daemon_running(home):
        raise Busy("the daemon of this node is running: stop it before restoring an estate")
    backup.check_fresh(home)  # before the passphrase is asked
    data = read_bounded(args.backup, backup.MAX_BACKUP, "estate backup", too_large=DecodeError)
    backup.read_header(data)
    held = backup.open_backup(data, _passphrase(args, confirm=False))
    done = backup.restore(home, held)
    print(
        f"restored estate {done.estate_id.hex()}: this node {done.node_id.hex()} is its admin "
        "(CA key, a node certificate issued by it)"
    )
    access = (
        f"access list {done.access_number} (this node reads every private volume)"
        if done.access_number
        else "no private volumes"
    )
    print(f"revocation list {done.revocation_number}; {access}")
    for r in done.volumes:
        private = ", private" if held.is_private(r.id) else ""
        print(f"volume {r.name}: this node publishes it, seq {r.seq}{private}")
    made = datetime.datetime.fromtimestamp(held.made, datetime.UTC)
    print(
        f"next: run 'p2pfs volume restore NAME --from URL' to take each volume's newest "
        f"snapshot from an origin; the backup was made {made:%Y-%m-%d %H:%M} UTC by admin "
        f"node {done.old_admin.hex()}: if that machine is gone, "
        f"'p2pfs estate revoke {done.old_admin.hex()}'"
    )
    return 0
