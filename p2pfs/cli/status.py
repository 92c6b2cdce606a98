"""Commands that report: status, peers."""

from __future__ import annotations

import argparse
import time

from p2pfs.errors import NotRunning
from p2pfs.node import control
from p2pfs.node import status as node_status
from p2pfs.sizes import format_size

from .common import Handler, Subparsers, node_home, print_json


def add_commands(sub: Subparsers) -> dict[str, Handler]:
    st = sub.add_parser("status", help="what this node holds, serves and has seen go wrong")
    st.add_argument("--json", action="store_true")
    pe = sub.add_parser("peers", help="the peers this node knows and how it reaches them")
    pe.add_argument("--json", action="store_true")
    return {"status": cmd_status, "peers": cmd_peers}


def cmd_status(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    try:
        st = control.call(home.control_socket, "status", timeout=10)
    except NotRunning:
        st = node_status.offline(home).to_json()
    from p2pfs.appliance.seed import seed_status

    if (seed := seed_status(home)) is not None:
        st["seed"] = seed  # an appliance: what its first boot made of the seed disk
    if args.json:
        print_json(st)
        return 0
    if seed is not None and not seed.get("ok"):
        print(f"seed: ERROR: {seed.get('error')}")
    d = st["daemon"]
    print(f"node {st['node_id']} at {st['home']}")
    if d is None:
        print("daemon: not running")
    else:
        print(f"daemon: pid {d['pid']}, mounted on {d['mountpoint'] or 'nothing'}")
    for v in st["volumes"]:
        snap = v["snapshot"][:16] if v["snapshot"] else "none yet"
        line = f"volume {v['name']}: seq {v['seq']} snapshot {snap}"
        live = v.get("live")
        if live:
            state = "uncommitted changes" if live["uncommitted"] else "all committed"
            line += f" (writable here: {state}"
            if live["staged_files"]:
                line += f", {live['staged_files']} files staged"
            if live["auto_commit_in_s"] is not None:
                line += f", commit in {live['auto_commit_in_s']} s"
            line += ")"
            if live.get("failsafe"):
                line += "\n  FAILSAFE: writes refused after an integrity fault (see error)"
            if live["error"]:
                line += f"\n  error: {live['error']}"
        print(line)
    s = st["store"]
    print(
        f"store: {s['chunks']} chunks, {s['bytes']} bytes; corrupt chunks found: {s['corrupt_chunks']}"
    )
    b = st["bytes_from"]
    print(f"bytes from: local {b['local']}, peers {b['peers']}, origin {b['origin']}")
    c = st.get("cache")
    if c:
        quota = format_size(c["quota"]) if c["quota"] is not None else "no quota"
        print(
            f"cache: {format_size(c['bytes'])} of {quota}, {format_size(c['pinned_bytes'])} pinned "
            f"in {st.get('pins', 0)} pins; offline ready: {'yes' if st['offline_ready'] else 'no'}"
        )
    sc = st.get("scrub")
    if sc:
        when = (
            time.strftime("%Y-%m-%d %H:%M", time.localtime(sc["last_run"]))
            if sc["last_run"]
            else "never"
        )
        print(
            f"scrub: last {when}; {sc['chunks_checked']} checked, {sc['corrupt_found']} corrupt, "
            f"{sc['healed']} healed"
        )
    if st.get("estate"):
        up = sum(1 for p in st["peers"] if p["state"] == "connected")
        print(
            f"estate {st['estate']}: {up} of {len(st['peers'])} peers connected; "
            f"served {st['bytes_served']} bytes; corrupt chunks rejected "
            f"{st['corrupt_chunks_rejected']}; quarantined peers {st['quarantined_peers']}"
        )
    return 0


def cmd_peers(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    answer = control.call(home.control_socket, "peers", timeout=10)
    if args.json:
        print_json(answer["peers"])
        return 0
    if answer["estate"] is None:
        print("this node has joined no estate")
        return 0
    for p in sorted(answer["peers"], key=lambda p: p["node_id"]):
        vols = ",".join(p["volumes"]) or "-"
        site = f"site {p['site']}  " if p.get("site") else ""
        print(f"{p['node_id']}  {p['address'] or '-':<22} {p['state']:<12} {site}volumes {vols}")
    return 0
