"""Commands about who may read private volumes: volume grant/revoke/access/rekey, group."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from p2pfs.errors import NotFound, P2pfsError
from p2pfs.home import Home
from p2pfs.trust import grants
from p2pfs.trust.estate import Estate

from .common import Handler, Subparsers, node_home, print_json, tell_daemon

if TYPE_CHECKING:
    from p2pfs.seal import EpochSecret
    from p2pfs.volume.importer import ImportReport


def add_volume_actions(vsub: Subparsers) -> None:
    """``volume grant|revoke|access|rekey`` (the admin's, but ``access`` anywhere)."""
    gr = vsub.add_parser("grant", help="(admin) let nodes or groups read a private volume")
    gr.add_argument("name")
    gr.add_argument("principals", nargs="+", metavar="NODE_ID|@GROUP")
    gr.add_argument(
        "--cache-only",
        action="store_true",
        help="may hold and serve its ciphertext, never read it",
    )
    rv = vsub.add_parser(
        "revoke", help="(admin) take a grant away: what is published from now on is sealed anew"
    )
    rv.add_argument("name")
    rv.add_argument("principals", nargs="+", metavar="NODE_ID|@GROUP")
    ac = vsub.add_parser("access", help="who may read a private volume, and who may cache it")
    ac.add_argument("name")
    ac.add_argument("--json", action="store_true")
    rk = vsub.add_parser("rekey", help="(admin) start a new key epoch for a private volume")
    rk.add_argument("name")
    rk.add_argument(
        "--full",
        action="store_true",
        help="also seal the whole head snapshot again under the new epoch",
    )
    rk.add_argument("--json", action="store_true")


def add_commands(sub: Subparsers) -> dict[str, Handler]:
    gp = sub.add_parser("group", help="(admin) groups of nodes that grants may name")
    gsub = gp.add_subparsers(dest="group_command", required=True, metavar="ACTION")
    ga = gsub.add_parser("add", help="add nodes to a group (made if new)")
    ga.add_argument("group")
    ga.add_argument("node_ids", nargs="+", metavar="NODE_ID")
    gl = gsub.add_parser("list", help="the groups and their nodes")
    gl.add_argument("--json", action="store_true")
    return {"group": cmd_group}


def _volume_id(home: Home, name: str) -> bytes:
    from p2pfs.volume.registry import VolumeRegistry

    return VolumeRegistry(home).get(name).id


def _access_doc(home: Home, name: str) -> dict[str, object]:
    estate = Estate.load(home)
    if estate is None:
        raise NotFound(f"{home.root} holds no estate: every volume here is local and public")
    found = [va for va in estate.access.volumes.values() if va.name == name]
    if not found:
        return {"volume": name, "private": False, "access_list": estate.access.number}
    va = found[0]
    doc: dict[str, object] = {
        "volume": name,
        "id": va.volume_id.hex(),
        "private": True,
        "access_list": estate.access.number,
        "epoch": va.epoch,
        "readers": sorted(n.hex() for n in va.readers),
        "cache_only": sorted(n.hex() for n in va.cachers),
    }
    if estate.is_admin:
        given = grants.grants_of(home, va.volume_id)
        if given is not None:
            doc["granted"] = {"readers": list(given.readers), "cache_only": list(given.cachers)}
    return doc


def cmd_volume_access(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    action = args.volume_command
    if action == "access":
        doc = _access_doc(home, args.name)
        if args.json:
            print_json(doc)
        elif not doc["private"]:
            print(f"volume {args.name}: public (every member of the estate reads it)")
        else:
            print(f"volume {args.name}: private, key epoch {doc['epoch']}")
            print(f"access list: {doc['access_list']}")
            for role, key in (("read", "readers"), ("cache", "cache_only")):
                nodes = doc[key]
                assert isinstance(nodes, list)
                for node in nodes:
                    print(f"{role}\t{node}")
            if "granted" in doc:
                g = doc["granted"]
                assert isinstance(g, dict)
                print(f"granted: read {', '.join(g['readers'])}")
                if g["cache_only"]:
                    print(f"granted: cache {', '.join(g['cache_only'])}")
        return 0
    vid = _volume_id(home, args.name)
    if action == "grant":
        number = grants.grant(home, vid, args.name, args.principals, cache_only=args.cache_only)
        what = "may cache" if args.cache_only else "may read"
        print(f"{' '.join(args.principals)} {what} volume {args.name} (access list {number})")
    elif action == "revoke":
        number = grants.revoke(home, vid, args.name, args.principals)
        print(
            f"{' '.join(args.principals)} may no longer read or cache volume {args.name} "
            f"(access list {number}); what is published from now on is sealed in a new epoch"
        )
    elif action == "rekey":
        number = grants.rekey(home, vid, args.name)
        report = _reseal(home, args.name) if args.full else None
        epoch = _access_doc(home, args.name)["epoch"]
        if args.json:
            print_json(
                {
                    "volume": args.name,
                    "epoch": epoch,
                    "access_list": number,
                    "resealed": report.as_dict() if report is not None else None,
                }
            )
        else:
            print(f"volume {args.name}: key epoch {epoch} (access list {number})")
            if report is not None:
                print(
                    f"sealed again: snapshot {report.seq} ({report.files} files, "
                    f"{report.new_chunks} chunks, {report.bytes} bytes)"
                )
    else:  # pragma: no cover - argparse allows only the actions above
        raise P2pfsError(f"unknown action {action!r}")
    tell_daemon(home)
    return 0


def _reseal(home: Home, name: str) -> ImportReport:
    from p2pfs.objects.model import Snapshot
    from p2pfs.store.cas import Store
    from p2pfs.trust.estate import node_key
    from p2pfs.volume.registry import VolumeRegistry
    from p2pfs.volume.reseal import reseal

    estate = Estate.load(home)
    assert estate is not None
    store = Store(home.store_dir)
    try:
        sealing = sealing_of(home, estate, name)
        assert sealing is not None
        key = node_key(home)

        def root_of(snap: Snapshot) -> bytes:
            return estate.access.root_of(snap, key, estate.node_id)

        return reseal(store, VolumeRegistry(home), name, sealing, root_of)
    finally:
        store.close()


def sealing_of(home: Home, estate: Estate | None, name: str) -> EpochSecret | None:
    """The epoch and secret a new snapshot of volume ``name`` is sealed in; None if public."""
    from p2pfs.seal import EpochSecret
    from p2pfs.trust.estate import node_key
    from p2pfs.volume.registry import VolumeRegistry

    if estate is None:
        return None
    vid = VolumeRegistry(home).get(name).id
    va = estate.access.of(vid)
    if va is None:
        return None
    secret = estate.access.secret(vid, va.epoch, node_key(home), estate.node_id)
    return EpochSecret(va.epoch, secret)


def cmd_group(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    if args.group_command == "add":
        number = grants.group_add(home, args.group, args.node_ids)
        print(f"group {args.group}: {' '.join(args.node_ids)} added (access list {number})")
        tell_daemon(home)
        return 0
    found = grants.groups(home)
    if args.json:
        print_json(found)
    else:
        for name, members in sorted(found.items()):
            print(f"{name}\t{' '.join(members) or '(empty)'}", file=sys.stdout)
    return 0
