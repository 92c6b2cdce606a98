"""Commands about what this node keeps: pin, unpin, pins, scrub, fsck."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

from p2pfs.errors import EXIT_ERROR, NotRunning, P2pfsError, UsageError
from p2pfs.home import Home
from p2pfs.node import control
from p2pfs.sizes import format_size

from .common import Handler, Subparsers, call_long, node_home, print_json
from .progress import transfer_bar


def add_commands(sub: Subparsers) -> dict[str, Handler]:
    sc = sub.add_parser("scrub", help="verify every stored chunk; quarantine and heal the bad ones")
    sc.add_argument("--json", action="store_true")

    fs = sub.add_parser("fsck", help="check that the store's index and chunk files agree")
    fs.add_argument("--repair", action="store_true", help="make the index match the files")
    fs.add_argument("--json", action="store_true")

    pi = sub.add_parser("pin", help="fetch everything under paths and keep it for offline use")
    pi.add_argument(
        "paths", nargs="+", metavar="PATH", help="a path inside the mount, or VOLUME:/path"
    )
    pi.add_argument(
        "--follow", action="store_true", help="keep it complete as new snapshots arrive"
    )
    pi.add_argument("--json", action="store_true")

    up = sub.add_parser("unpin", help="release pinned paths (their chunks become evictable)")
    up.add_argument("paths", nargs="+", metavar="PATH")

    ps = sub.add_parser("pins", help="what is pinned, how big, whether complete")
    ps.add_argument("--json", action="store_true")
    return {
        "scrub": cmd_scrub,
        "fsck": cmd_fsck,
        "pin": cmd_pin,
        "unpin": cmd_unpin,
        "pins": cmd_pins,
    }


def cmd_scrub(args: argparse.Namespace) -> int:
    from p2pfs.store.cas import Store

    home = node_home(args).require()
    try:
        # The daemon heals what it finds from peers or the origin.
        r = call_long(
            home,
            "scrub",
            label="scrub",
            quiet=args.json,
            on_interrupt="the daemon stopped the scrub; what it checked is counted in 'p2pfs status'",
        )
    except NotRunning:
        store = Store(home.store_dir)
        try:
            good, bad_ids = store.scrub()
        finally:
            store.close()
        bad = [c.hex() for c in bad_ids]
        r = {"chunks_checked": good + len(bad), "corrupt_found": len(bad), "healed": 0, "bad": bad}
        r["unhealed"] = len(bad)
    if args.json:
        print_json(r)
    else:
        print(
            f"verified {r['chunks_checked']} chunks: {r['corrupt_found']} corrupt (quarantined), "
            f"{r['healed']} healed from peers, {r['unhealed']} not healed"
        )
        for cid in r["bad"]:
            print(f"corrupt: {cid}")
    return EXIT_ERROR if r["unhealed"] else 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from p2pfs.store.cas import Store

    home = node_home(args).require()
    try:
        r = call_long(
            home,
            "fsck",
            repair=args.repair,
            label="fsck",
            quiet=args.json,
            on_interrupt="the daemon finishes the check it started (its report is in its log)",
        )
    except NotRunning:
        store = Store(home.store_dir)
        try:
            report = store.fsck(repair=args.repair)
        finally:
            store.close()
        r = {"clean": report.clean, "lines": report.lines()}
    if args.json:
        print_json(r)
    else:
        for line in r["lines"]:
            print(line)
    return 0 if r["clean"] or args.repair else EXIT_ERROR


def _pin_target(home: Home, text: str) -> tuple[str, str]:
    """A path inside the node's mount, or VOLUME:/path, as (volume, path)."""
    from p2pfs.volume.pins import normalize_path, parse_target

    candidate = Path(text)
    if not candidate.is_absolute() and ":" in text and not candidate.exists():
        return parse_target(text)
    st = control.call(home.control_socket, "status", timeout=10)
    mountpoint = st["daemon"]["mountpoint"]
    if mountpoint is None:
        raise UsageError(f"the daemon of {home.root} is not mounted: name the path as VOLUME:/path")
    try:
        rel = Path(os.path.abspath(text)).relative_to(mountpoint)
    except ValueError:
        raise UsageError(f"{text} is not inside the mount {mountpoint}") from None
    if not rel.parts:
        raise UsageError("pin a volume or a path inside one, not the whole mount")
    return rel.parts[0], normalize_path("/".join(rel.parts[1:]))


def cmd_pin(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    targets = [_pin_target(home, t) for t in args.paths]
    results = []
    for volume, path in targets:
        req: dict[str, Any] = {"volume": volume, "path": path}
        job = call_long(
            home,
            "pin",
            follow=args.follow,
            **req,
            label=f"pin {volume}:{path}",
            quiet=args.json,
            on_interrupt=f"the daemon stopped resolving {volume}:{path}; run it again to resume",
        )
        show = sys.stderr.isatty() and not args.json
        try:
            job = _watch_pin(home, req, job, show)
        except KeyboardInterrupt:
            control.call(home.control_socket, "pin-cancel", timeout=30, **req)
            print(f"p2pfs: pin of {volume}:{path} stopped; run it again to resume", file=sys.stderr)
            return 130
        results.append(job)
        if not args.json:
            print(
                f"pinned {job['name']}: {job['chunks_total']} chunks, {format_size(job['bytes_total'])}"
                + (f" ({job['error']})" if job["error"] else "")
            )
    if args.json:
        print_json(results)
    return 0 if all(j["state"] == "complete" for j in results) else EXIT_ERROR


def _watch_pin(home: Home, req: dict[str, Any], job: dict[str, Any], show: bool) -> dict[str, Any]:
    with transfer_bar(show, f"pin {job['name']}") as update:
        while job["state"] in ("resolving", "fetching"):
            time.sleep(0.2)
            job = control.call(home.control_socket, "pin-status", timeout=30, **req)
            update(job["bytes_total"], job["bytes_done"])
    if job["state"] != "complete":
        raise P2pfsError(f"pin of {job['name']} {job['state']}: {job['error']}")
    return job


def cmd_unpin(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    for text in args.paths:
        volume, path = _pin_target(home, text)
        r = control.call(home.control_socket, "unpin", timeout=60, volume=volume, path=path)
        print(f"unpinned {r['unpinned']}")
    return 0


def cmd_pins(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    r = control.call(home.control_socket, "pins", timeout=30)
    if args.json:
        print_json(r)
        return 0
    for p in r["pins"]:
        state = "complete" if p["complete"] else f"incomplete ({p['present']}/{p['ids']} ids)"
        follow = " follow" if p["follow"] else ""
        print(f"{p['name']}\t{format_size(p['bytes'])}\tsnapshot {p['seq']}{follow}\t{state}")
    print(f"offline ready: {'yes' if r['offline_ready'] else 'no'}")
    return 0
