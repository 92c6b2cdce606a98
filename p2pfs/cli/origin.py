"""``p2pfs origin``: a volume's object-storage and HTTP origins, and ``volume restore``."""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path
from typing import Any

from p2pfs.errors import NotFound, P2pfsError, UsageError
from p2pfs.home import Home

from .common import Handler, Subparsers, node_home, print_json, tell_daemon
from .progress import transfer_bar


def add_commands(sub: Subparsers) -> dict[str, Handler]:
    og = sub.add_parser(
        "origin", help="where a volume's objects are kept: S3 buckets, HTTP mirrors"
    )
    osub = og.add_subparsers(dest="origin_command", required=True, metavar="ACTION")
    add = osub.add_parser(
        "add", help="(publisher) announce an origin of the volume and upload to it"
    )
    add.add_argument("volume")
    add.add_argument("url", help="s3://BUCKET/PREFIX or https://HOST/PATH/")
    add.add_argument("--endpoint", help="the S3 API's URL (MinIO, Ceph RGW; none for AWS)")
    add.add_argument("--region", help="the bucket's region")
    add.add_argument(
        "--dir",
        type=Path,
        help="(HTTP origin) the directory its web server publishes, written here",
    )
    sy = osub.add_parser("sync", help="(publisher) upload what the volume's origins lack")
    sy.add_argument("volume")
    sy.add_argument("--json", action="store_true")
    ls = osub.add_parser("list", help="each origin: reachable, its snapshot, bytes, lag")
    ls.add_argument("volume", nargs="?")
    ls.add_argument("--json", action="store_true")
    rm = osub.add_parser("remove", help="(publisher) stop announcing an origin")
    rm.add_argument("volume")
    rm.add_argument("url")
    return {"origin": cmd_origin}


def add_restore(vsub: Subparsers) -> None:
    rs = vsub.add_parser(
        "restore", help="(new admin) take a volume's newest snapshot back from an origin"
    )
    rs.add_argument("name")
    rs.add_argument("--from", dest="source", required=True, metavar="URL")
    rs.add_argument("--endpoint")
    rs.add_argument("--region")
    rs.add_argument("--json", action="store_true")


def _ref(url: str, endpoint: str | None, region: str | None) -> Any:
    from p2pfs.errors import DecodeError
    from p2pfs.objects.origins import OriginRef

    try:
        return OriginRef(url, endpoint, region)
    except DecodeError as e:
        raise UsageError(str(e)) from None


def _secret_of(home: Home, volume_id: bytes) -> Any:
    from p2pfs.trust.estate import Estate, node_key

    estate = Estate.load(home)
    if estate is None:
        return None
    return lambda epoch: estate.access.secret(volume_id, epoch, node_key(home), estate.node_id)


def _announce(home: Home, volume: str, change: Any) -> Any:
    from p2pfs.origin.announce import announce
    from p2pfs.store.cas import Store
    from p2pfs.volume.registry import VolumeRegistry

    registry = VolumeRegistry(home)
    record = registry.get(volume)
    store = Store(home.store_dir)
    try:
        head = registry.load_head(store, record)
        refs = change(head.origins if head else ())
        return announce(registry, store, volume, refs, secret_of=_secret_of(home, record.id))
    finally:
        store.close()


def cmd_origin(args: argparse.Namespace) -> int:
    home = node_home(args).require()
    return {"add": _add, "sync": _sync, "list": _list, "remove": _remove}[args.origin_command](
        home, args
    )


def _add(home: Home, args: argparse.Namespace) -> int:
    from p2pfs.origin import settings
    from p2pfs.origin.kinds import open_backend
    from p2pfs.origin.sync import read_latest

    ref = _ref(args.url, args.endpoint, args.region)
    if args.dir is not None and ref.kind != "http":
        raise UsageError("--dir is for an HTTP origin: the directory its web server publishes")
    local = args.dir.absolute() if args.dir is not None else None
    backend = open_backend(ref, local_dir=local)
    read_latest(backend)  # reachable, and holding nothing of another volume's
    known = settings.load(home, args.volume)

    def change(refs: tuple[Any, ...]) -> tuple[Any, ...]:
        if any(r.url == ref.url for r in refs):
            raise P2pfsError(f"volume {args.volume!r} already announces origin {ref.url}")
        return (*refs, ref)

    _record, snapshot, _sid = _announce(home, args.volume, change)
    known[ref.url] = settings.LocalOrigin(ref.url, local)
    settings.save(home, args.volume, known)
    tell_daemon(home)
    print(
        f"volume {args.volume}: origin {ref.url} added; snapshot {snapshot.seq} announces "
        f"{len(snapshot.origins)} origin(s)"
    )
    if backend.writable:
        print(f"upload: 'p2pfs origin sync {args.volume}' (a running daemon uploads by itself)")
    else:
        print("this node does not write it: fill it from another origin's files (or give --dir)")
    return 0


def _remove(home: Home, args: argparse.Namespace) -> int:
    from p2pfs.origin import settings

    def change(refs: tuple[Any, ...]) -> tuple[Any, ...]:
        if not any(r.url == args.url for r in refs):
            raise NotFound(f"volume {args.volume!r} announces no origin {args.url}")
        return tuple(r for r in refs if r.url != args.url)

    _record, snapshot, _sid = _announce(home, args.volume, change)
    known = settings.load(home, args.volume)
    known.pop(args.url, None)
    settings.save(home, args.volume, known)
    tell_daemon(home)
    print(
        f"volume {args.volume}: origin {args.url} removed (snapshot {snapshot.seq}); "
        "its objects stay there until you delete them"
    )
    return 0


def _head(home: Home, volume: str) -> Any:
    from p2pfs.store.cas import Store
    from p2pfs.volume.registry import VolumeRegistry

    registry = VolumeRegistry(home)
    store = Store(home.store_dir)
    try:
        return registry.load_head(store, registry.get(volume))
    finally:
        store.close()


def _backends(home: Home, volume: str) -> list[Any]:
    from p2pfs.origin import settings
    from p2pfs.origin.kinds import open_backend

    head = _head(home, volume)
    local = settings.load(home, volume)
    out = []
    for ref in head.origins if head else ():
        d = local[ref.url].dir if ref.url in local else None
        out.append(open_backend(ref, local_dir=d))
    return out


def _sync(home: Home, args: argparse.Namespace) -> int:
    import trio

    from p2pfs.fsutil import locked
    from p2pfs.origin import settings
    from p2pfs.origin.sync import sync
    from p2pfs.store.cas import Store
    from p2pfs.volume.content import Content
    from p2pfs.volume.registry import VolumeRegistry

    registry = VolumeRegistry(home)
    if not registry.is_publisher(args.volume):
        raise P2pfsError(f"this node does not publish {args.volume!r}: only its publisher uploads")
    backends = [b for b in _backends(home, args.volume) if b.writable]
    if not backends:
        raise NotFound(
            f"volume {args.volume!r} has no origin this node writes: p2pfs origin add {args.volume} URL"
        )
    reports = []
    store = Store(home.store_dir)
    try:
        content = Content(store)
        with locked(settings.sync_lock(home, args.volume)):  # after the daemon's, if one runs
            for backend in backends:
                shown = sys.stderr.isatty() and not args.json
                with transfer_bar(shown, f"{args.volume} -> {backend.ref.url}") as update:
                    job = functools.partial(
                        sync, backend, content, store, registry, args.volume, progress=update
                    )
                    reports.append(trio.run(job))
    finally:
        store.close()
    if args.json:
        print_json([r.as_dict() for r in reports])
        return 0
    for r in reports:
        print(
            f"{r.url}: seq {r.seq}: {r.uploaded} objects uploaded ({r.uploaded_bytes} bytes), "
            f"{r.present} already there"
        )
    return 0


def _describe(volume: str, head: Any, backend: Any) -> dict[str, Any]:
    from p2pfs.origin.layout import OBJECTS
    from p2pfs.origin.sync import read_latest

    row: dict[str, Any] = {
        "volume": volume,
        "url": backend.ref.url,
        "kind": backend.ref.kind,
        "writable_here": backend.writable,
        "reachable": False,
        "seq": None,
        "objects": None,
        "bytes": None,
        "lag": None,
        "error": None,
    }
    try:
        latest = read_latest(backend)
        row["reachable"] = True
        if latest is not None and latest.volume_id == head.volume_id:
            row["seq"] = latest.seq
            row["lag"] = max(0, head.seq - latest.seq)
        if backend.writable:
            sizes = [size for _key, size in backend.list(OBJECTS)]
            row["objects"], row["bytes"] = len(sizes), sum(sizes)
    except P2pfsError as e:
        row["error"] = str(e)
    return row


def _list(home: Home, args: argparse.Namespace) -> int:
    from p2pfs.volume.registry import VolumeRegistry

    names = [args.volume] if args.volume else VolumeRegistry(home).names()
    rows = []
    for name in names:
        head = _head(home, name)
        rows += [_describe(name, head, b) for b in _backends(home, name)]
    if args.json:
        print_json(rows)
        return 0
    if not rows:
        print("no origins: p2pfs origin add VOLUME URL")
    for r in rows:
        state = "reachable" if r["reachable"] else f"unreachable ({r['error']})"
        seq = "none" if r["seq"] is None else f"seq {r['seq']} (lag {r['lag']})"
        size = "" if r["bytes"] is None else f", {r['objects']} objects, {r['bytes']} bytes"
        print(f"{r['volume']}\t{r['url']}\t{state}\t{seq}{size}")
    return 0


def cmd_volume_restore(args: argparse.Namespace) -> int:
    from p2pfs.origin import settings
    from p2pfs.origin.kinds import open_backend
    from p2pfs.origin.restore import restore
    from p2pfs.store.cas import Store
    from p2pfs.volume.registry import VolumeRegistry

    home = node_home(args).require()
    ref = _ref(args.source, args.endpoint, args.region)
    registry = VolumeRegistry(home)
    store = Store(home.store_dir)
    try:
        snapshot, moved = restore(registry, store, open_backend(ref), args.name)
    finally:
        store.close()
    known = settings.load(home, args.name)
    for r in snapshot.origins:
        known.setdefault(r.url, settings.LocalOrigin(r.url))
    settings.save(home, args.name, known)
    tell_daemon(home)
    if args.json:
        print_json(
            {
                "volume": args.name,
                "seq": snapshot.seq,
                "moved": moved,
                "origins": [r.url for r in snapshot.origins],
            }
        )
    else:
        state = "restored" if moved else "already at"
        print(
            f"volume {args.name}: {state} snapshot {snapshot.seq} from {ref.url}; "
            f"the next import or commit makes {snapshot.seq + 1}"
        )
    return 0
