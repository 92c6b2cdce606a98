"""Commands about volumes: init, volume create/list, import, commit, log (and, through
``access.py``, volume grant/revoke/access/rekey)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from p2pfs.chunking.params import ChunkParams
from p2pfs.errors import EXIT_ERROR, NotFound, UsageError
from p2pfs.sizes import parse_size
from p2pfs.trust.estate import Estate

from . import access, origin
from .common import Handler, Subparsers, call_long, node_home, print_json, tell_daemon
from .progress import import_bar


def _size(text: str) -> int:
    try:
        return parse_size(text, "a size")
    except UsageError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64K, 1M)") from None


def add_commands(sub: Subparsers) -> dict[str, Handler]:
    sub.add_parser("init", help="create this node's identity and home")

    vol = sub.add_parser("volume", help="create and list volumes")
    vsub = vol.add_subparsers(dest="volume_command", required=True, metavar="ACTION")
    vc = vsub.add_parser("create", help="create a volume published by this node; prints its id")
    vc.add_argument("name")
    defaults = ChunkParams()
    vc.add_argument("--min-chunk", type=_size, default=defaults.min_size, metavar="SIZE")
    vc.add_argument("--avg-chunk", type=_size, default=defaults.avg_size, metavar="SIZE")
    vc.add_argument("--max-chunk", type=_size, default=defaults.max_size, metavar="SIZE")
    vc.add_argument(
        "--private",
        action="store_true",
        help="(admin) only granted nodes read it; its content is encrypted",
    )
    vc.add_argument(
        "--keep-owners",
        action="store_true",
        help="carry every entry's uid and gid in the snapshots (followers show the numbers)",
    )
    vl = vsub.add_parser("list", help="list the volumes of this node")
    vl.add_argument("--json", action="store_true")
    access.add_volume_actions(vsub)
    origin.add_restore(vsub)

    im = sub.add_parser("import", help="import a directory tree as the volume's next snapshot")
    im.add_argument("source", type=Path)
    im.add_argument("volume")
    im.add_argument("--json", action="store_true", help="print the report as JSON")

    co = sub.add_parser(
        "commit", help="make the changes written to a volume's mount its next snapshot, now"
    )
    co.add_argument("volume")
    co.add_argument("--json", action="store_true")

    lg = sub.add_parser("log", help="a volume's snapshots, newest first")
    lg.add_argument("volume")
    lg.add_argument("-n", "--limit", type=int, default=100)
    lg.add_argument("--json", action="store_true")
    return {
        "init": cmd_init,
        "volume": cmd_volume,
        "import": cmd_import,
        "commit": cmd_commit,
        "log": cmd_log,
    }


def cmd_init(args: argparse.Namespace) -> int:
    home = node_home(args)
    node_id, created = home.init()
    word = "initialized" if created else "already initialized"
    print(f"{word} node {node_id.hex()} at {home.root}")
    return 0


def cmd_volume(args: argparse.Namespace) -> int:
    from p2pfs.volume.registry import VolumeRegistry

    if args.volume_command in ("grant", "revoke", "access", "rekey"):
        return access.cmd_volume_access(args)
    if args.volume_command == "restore":
        return origin.cmd_volume_restore(args)
    home = node_home(args).require()
    registry = VolumeRegistry(home)
    if args.volume_command == "create":
        params = ChunkParams(args.min_chunk, args.avg_chunk, args.max_chunk)
        # On the admin node, the estate endorses the new volume's key at once, so every
        # member will follow it; elsewhere the volume stays local to this node.
        estate = Estate.load(home)
        endorse = estate.endorse if estate is not None and estate.is_admin else None
        if args.private and endorse is None:
            raise UsageError(
                "a private volume is made on the estate's admin node (it holds the CA key "
                "that signs who may read it)"
            )
        record = registry.create(args.name, params, endorse=endorse, keep_owners=args.keep_owners)
        if args.private:
            from p2pfs.trust.grants import make_private

            make_private(home, record.id, record.name)
        print(record.id.hex())
        if endorse is None:
            print(
                f"note: volume {args.name!r} is not endorsed by an estate: peers will not follow it",
                file=sys.stderr,
            )
        tell_daemon(home)
        return 0
    rows = [registry.get(n) for n in registry.names()]
    if args.json:
        print_json(
            [
                {
                    "name": r.name,
                    "id": r.id.hex(),
                    "seq": r.seq,
                    "head": r.head.hex() if r.head else None,
                    "keep_owners": r.keep_owners,
                }
                for r in rows
            ]
        )
    else:
        for r in rows:
            print(f"{r.name}\t{r.id.hex()}\tseq {r.seq}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from p2pfs.store.cas import Store
    from p2pfs.volume.importer import Importer
    from p2pfs.volume.registry import VolumeRegistry

    home = node_home(args).require()
    registry = VolumeRegistry(home)
    registry.get(args.volume)  # unknown volume: fail before touching the source
    if not args.source.exists():
        raise NotFound(f"cannot import {args.source}: no such directory")
    store = Store(home.store_dir)
    try:
        sealing = access.sealing_of(home, Estate.load(home), args.volume)
        importer = Importer(store, registry, args.volume, sealing=sealing)
        root = importer.scan(args.source)
        with import_bar(sys.stderr.isatty() and not args.json, importer.total_bytes) as progress:
            importer.progress = progress
            importer.scan = lambda source: root  # type: ignore[method-assign]
            report = importer.run(args.source)
    finally:
        store.close()
    tell_daemon(home)
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in report.errors:
        print(f"error: {e}", file=sys.stderr)
    if args.json:
        print_json(report.as_dict())
    else:
        print(f"snapshot {report.snapshot_id.hex()} (volume {report.volume}, seq {report.seq})")
        print(
            f"files: {report.files} ({report.reused_files} unchanged), dirs: {report.dirs}, symlinks: {report.symlinks}"
        )
        print(f"bytes: {report.bytes}")
        print(f"new chunks: {report.new_chunks} ({report.new_bytes} bytes)")
        print(f"dedup ratio: {report.dedup_ratio:.2f}")
    return EXIT_ERROR if report.errors else 0


def cmd_commit(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    r = call_long(
        home,
        "commit",
        volume=args.volume,
        label=f"commit {args.volume}",
        quiet=args.json,
        on_interrupt=(
            "the daemon finishes the commit it started (a commit is not cut off); "
            f"see 'p2pfs log {args.volume}' or 'p2pfs status'"
        ),
    )
    if args.json:
        print_json(r)
    elif r["changed"]:
        print(
            f"snapshot {r['snapshot']} (volume {r['volume']}, seq {r['seq']}): "
            f"{r['files_chunked']} files chunked, {r['trees']} directories, {r['seconds']:.2f} s"
        )
    else:
        print(f"nothing to commit: volume {r['volume']} is at seq {r['seq']}")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    r = call_long(
        home,
        "log",
        volume=args.volume,
        limit=args.limit,
        label=f"log {args.volume}",
        quiet=args.json,
        on_interrupt="stopped reading the volume's snapshots",
    )
    if args.json:
        print_json(r["snapshots"])
        return 0
    for snap in r["snapshots"]:
        if not snap["available"]:
            print(f"seq {snap['seq']:>6}  {snap['id'][:16]}  (not available: {snap['error']})")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["time"]))
        print(f"seq {snap['seq']:>6}  {snap['id'][:16]}  {when}")
    return 0
