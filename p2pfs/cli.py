"""The ``p2pfs`` command line: parse, call one layer, print; user errors are one quiet line."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import select
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from . import __version__, appliance_cli, control, estate_cli
from .chunker import ChunkParams
from .errors import EXIT_ERROR, NotFound, NotRunning, P2pfsError, UsageError
from .estate import Estate
from .home import Home, default_home

log = logging.getLogger("p2pfs")

MOUNT_TIMEOUT = 60.0
UMOUNT_TIMEOUT = 30.0


def _size(text: str) -> int:
    units = {"k": 1024, "m": 1024**2, "g": 1024**3}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    mult = units.get(t[-1:], 1)
    try:
        return int(t[:-1] if t[-1:] in units else t) * mult
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 64K, 1M)") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="p2pfs", description="A peer-to-peer, content-addressed FUSE cache."
    )
    p.add_argument(
        "--home", type=Path, help="node home (default: $P2PFS_HOME or ~/.local/share/p2pfs)"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("--version", action="version", version=f"p2pfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("init", help="create this node's identity and home")

    vol = sub.add_parser("volume", help="create and list volumes")
    vsub = vol.add_subparsers(dest="volume_command", required=True, metavar="ACTION")
    vc = vsub.add_parser("create", help="create a volume published by this node; prints its id")
    vc.add_argument("name")
    defaults = ChunkParams()
    vc.add_argument("--min-chunk", type=_size, default=defaults.min_size, metavar="SIZE")
    vc.add_argument("--avg-chunk", type=_size, default=defaults.avg_size, metavar="SIZE")
    vc.add_argument("--max-chunk", type=_size, default=defaults.max_size, metavar="SIZE")
    vl = vsub.add_parser("list", help="list the volumes of this node")
    vl.add_argument("--json", action="store_true")

    im = sub.add_parser("import", help="import a directory tree as the volume's next snapshot")
    im.add_argument("source", type=Path)
    im.add_argument("volume")
    im.add_argument("--json", action="store_true", help="print the report as JSON")

    mo = sub.add_parser("mount", help="start the node's daemon, mounted; returns once usable")
    mo.add_argument("mountpoint", type=Path)
    mo.add_argument(
        "--read-only", action="store_true", help="mount even the volumes published here read-only"
    )
    appliance_cli.add_mount_arguments(mo)

    um = sub.add_parser("umount", help="unmount and stop the node's daemon")
    um.add_argument("mountpoint", type=Path)

    da = sub.add_parser("daemon", help="run the node in the foreground (for systemd)")
    da.add_argument("--mount", type=Path, dest="mountpoint", metavar="MOUNTPOINT")
    da.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)
    da.add_argument("--debug-faults", action="store_true", help=argparse.SUPPRESS)
    da.add_argument("--read-only", action="store_true", help="no writable volumes")

    co = sub.add_parser(
        "commit", help="make the changes written to a volume's mount its next snapshot, now"
    )
    co.add_argument("volume")
    co.add_argument("--json", action="store_true")

    st = sub.add_parser("status", help="what this node holds, serves and has seen go wrong")
    st.add_argument("--json", action="store_true")

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

    lg = sub.add_parser("log", help="a volume's snapshots, newest first")
    lg.add_argument("volume")
    lg.add_argument("-n", "--limit", type=int, default=100)
    lg.add_argument("--json", action="store_true")

    ps = sub.add_parser("pins", help="what is pinned, how big, whether complete")
    ps.add_argument("--json", action="store_true")

    pe = sub.add_parser("peers", help="the peers this node knows and how it reaches them")
    pe.add_argument("--json", action="store_true")

    COMMANDS.update(estate_cli.add_commands(sub))
    COMMANDS.update(appliance_cli.add_commands(sub))
    return p


def _home(args: argparse.Namespace) -> Home:
    return Home((args.home or default_home()).absolute())


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=True))


# -- commands ---------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    home = _home(args)
    node_id, created = home.init()
    word = "initialized" if created else "already initialized"
    print(f"{word} node {node_id.hex()} at {home.root}")
    return 0


def cmd_volume(args: argparse.Namespace) -> int:
    from .volumes import VolumeRegistry

    home = _home(args).require()
    registry = VolumeRegistry(home)
    if args.volume_command == "create":
        params = ChunkParams(args.min_chunk, args.avg_chunk, args.max_chunk)
        # On the admin node, the estate endorses the new volume's key at once, so every
        # member will follow it; elsewhere the volume stays local to this node.
        estate = Estate.load(home)
        endorse = estate.endorse if estate is not None and estate.is_admin else None
        record = registry.create(args.name, params, endorse=endorse)
        print(record.id.hex())
        if endorse is None:
            print(
                f"note: volume {args.name!r} is not endorsed by an estate: peers will not follow it",
                file=sys.stderr,
            )
        _tell_daemon(home)
        return 0
    rows = [registry.get(n) for n in registry.names()]
    if args.json:
        _print_json(
            [
                {
                    "name": r.name,
                    "id": r.id.hex(),
                    "seq": r.seq,
                    "head": r.head.hex() if r.head else None,
                }
                for r in rows
            ]
        )
    else:
        for r in rows:
            print(f"{r.name}\t{r.id.hex()}\tseq {r.seq}")
    return 0


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int, int], None] | None]:
    if not enabled:
        yield None
        return
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    files = 0
    with Progress(
        TextColumn("[bold]importing"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TextColumn("{task.fields[files]} files"),
        TimeRemainingColumn(),
        transient=True,
    ) as bar:
        task = bar.add_task("import", total=total or None, files=0)

        def advance(nfiles: int, nbytes: int) -> None:
            nonlocal files
            files += nfiles
            bar.update(task, advance=nbytes, files=files)

        yield advance


def cmd_import(args: argparse.Namespace) -> int:
    from .importer import Importer
    from .store import Store
    from .volumes import VolumeRegistry

    home = _home(args).require()
    registry = VolumeRegistry(home)
    registry.get(args.volume)  # unknown volume: fail before touching the source
    if not args.source.exists():
        raise NotFound(f"cannot import {args.source}: no such directory")
    store = Store(home.store_dir)
    try:
        importer = Importer(store, registry, args.volume)
        root = importer.scan(args.source)
        with _progress(sys.stderr.isatty() and not args.json, importer.total_bytes) as progress:
            importer.progress = progress
            importer.scan = lambda source: root  # type: ignore[method-assign]
            report = importer.run(args.source)
    finally:
        store.close()
    with contextlib.suppress(NotRunning):
        control.call(home.control_socket, "reload")
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    for e in report.errors:
        print(f"error: {e}", file=sys.stderr)
    if args.json:
        _print_json(report.as_dict())
    else:
        print(f"snapshot {report.snapshot_id.hex()} (volume {report.volume}, seq {report.seq})")
        print(
            f"files: {report.files} ({report.reused_files} unchanged), dirs: {report.dirs}, symlinks: {report.symlinks}"
        )
        print(f"bytes: {report.bytes}")
        print(f"new chunks: {report.new_chunks} ({report.new_bytes} bytes)")
        print(f"dedup ratio: {report.dedup_ratio:.2f}")
    return EXIT_ERROR if report.errors else 0


def cmd_daemon(args: argparse.Namespace) -> int:
    from .daemon import Daemon

    home = _home(args)
    mp = args.mountpoint.absolute() if args.mountpoint else None
    return Daemon(
        home, mp, ready_fd=args.ready_fd, debug_faults=args.debug_faults, read_only=args.read_only
    ).run()


def cmd_mount(args: argparse.Namespace) -> int:
    from .daemon import check_mountpoint

    if args.appliance or args.token:  # a desktop's thin mount of its appliance
        return appliance_cli.cmd_mount_thin(args)
    home = _home(args).require()
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
    pid = start_until_ready(cmd, log_path, "the daemon")
    print(f"mounted {home.root} on {mp} (daemon pid {pid}, log {log_path})")
    return 0


def start_until_ready(cmd: list[str], log_path: Path, what: str) -> int:
    """Start ``cmd`` (plus ``--ready-fd N``) detached, logging to ``log_path``, and wait
    for the line it writes once its mount is usable; its pid, or its error raised here."""
    r, w = os.pipe()
    with open(log_path, "ab") as logf:
        proc = subprocess.Popen(
            [*cmd, "--ready-fd", str(w)],
            stdin=subprocess.DEVNULL,
            stdout=logf,
            stderr=logf,
            pass_fds=(w,),
            start_new_session=True,
        )
    os.close(w)
    line = _read_line(r, MOUNT_TIMEOUT)
    os.close(r)
    if line == "ok":
        return proc.pid
    if line.startswith("error "):
        _, code, msg = line.split(" ", 2)
        err = P2pfsError(msg)
        err.exit_code = int(code)
        raise err
    rc = proc.poll()
    if rc is None:
        proc.terminate()
        raise P2pfsError(
            f"{what} did not become ready within {MOUNT_TIMEOUT:.0f} s; see {log_path}"
        )
    raise P2pfsError(f"{what} exited with code {rc} before mounting; see {log_path}")


def _read_line(fd: int, timeout: float) -> str:
    buf = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            break
        data = os.read(fd, 4096)
        if not data:
            break
        buf += data
    return buf.decode(errors="replace").strip()


def cmd_umount(args: argparse.Namespace) -> int:
    home = _home(args)
    mp = args.mountpoint.absolute()
    if (thin := appliance_cli.umount_thin(mp)) is not None:
        return thin
    try:
        st = control.call(home.control_socket, "status", timeout=10)
    except NotRunning:
        # A dead daemon's mount fails stat (ENOTCONN), so ask the mount table.
        if _is_p2pfs_mount(mp):
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
    deadline = time.monotonic() + UMOUNT_TIMEOUT
    while time.monotonic() < deadline:
        if not _alive(pid) and not os.path.ismount(mp):
            print(f"unmounted {mp}")
            return 0
        time.sleep(0.05)
    raise P2pfsError(f"the daemon (pid {pid}) did not stop within {UMOUNT_TIMEOUT:.0f} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except (OSError, IndexError):
        return False


def _is_p2pfs_mount(mp: Path) -> bool:
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                fields = line.split()
                # The mount table escapes spaces and such as octal (\040).
                where = fields[1].encode().decode("unicode_escape").encode("latin-1")
                if where == os.fsencode(mp) and fields[2] == "fuse.p2pfs":
                    return True
            return False
    except OSError:
        return False


def cmd_status(args: argparse.Namespace) -> int:
    home = _home(args).require()
    try:
        st = control.call(home.control_socket, "status", timeout=10)
    except NotRunning:
        st = _offline_status(home)
    from .appliance_seed import seed_status

    if (seed := seed_status(home)) is not None:
        st["seed"] = seed  # an appliance: what its first boot made of the seed disk
    if args.json:
        _print_json(st)
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
        quota = _mib(c["quota"]) if c["quota"] is not None else "no quota"
        print(
            f"cache: {_mib(c['bytes'])} of {quota}, {_mib(c['pinned_bytes'])} pinned "
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
    home = _home(args).require()
    answer = control.call(home.control_socket, "peers", timeout=10)
    if args.json:
        _print_json(answer["peers"])
        return 0
    if answer["estate"] is None:
        print("this node has joined no estate")
        return 0
    for p in sorted(answer["peers"], key=lambda p: p["node_id"]):
        vols = ",".join(p["volumes"]) or "-"
        print(f"{p['node_id']}  {p['address'] or '-':<22} {p['state']:<12} volumes {vols}")
    return 0


def _tell_daemon(home: Home) -> None:
    """Ask a running daemon to pick up what a command changed on disk."""
    with contextlib.suppress(NotRunning):
        control.call(home.control_socket, "reload", timeout=30)


def _offline_status(home: Home) -> dict[str, Any]:
    from .store import Store
    from .volumes import VolumeRegistry

    registry = VolumeRegistry(home)
    store = Store(home.store_dir)
    try:
        stats = store.statistics()
    finally:
        store.close()
    volumes = []
    for name in registry.names():
        r = registry.get(name)
        if r.head is not None:
            volumes.append({"name": name, "id": r.id.hex(), "seq": r.seq, "snapshot": r.head.hex()})
    return {
        "node_id": home.node_id().hex(),
        "home": str(home.root),
        "daemon": None,
        "volumes": volumes,
        "store": {
            "chunks": stats.chunks,
            "bytes": stats.bytes,
            "corrupt_chunks": stats.corrupt_chunks,
            "quarantined": stats.quarantined,
        },
        "peers": [],
        "bytes_from": {"local": 0, "peers": 0, "origin": 0},
        "bytes_served": 0,
        "corrupt_chunks_rejected": 0,
        "quarantined_peers": 0,
    }


def cmd_scrub(args: argparse.Namespace) -> int:
    from .store import Store

    home = _home(args).require()
    try:
        # The daemon heals what it finds from peers or the origin.
        r = control.call(home.control_socket, "scrub", timeout=24 * 3600)
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
        _print_json(r)
    else:
        print(
            f"verified {r['chunks_checked']} chunks: {r['corrupt_found']} corrupt (quarantined), "
            f"{r['healed']} healed from peers, {r['unhealed']} not healed"
        )
        for cid in r["bad"]:
            print(f"corrupt: {cid}")
    return EXIT_ERROR if r["unhealed"] else 0


def cmd_fsck(args: argparse.Namespace) -> int:
    from .store import Store

    home = _home(args).require()
    try:
        r = control.call(home.control_socket, "fsck", timeout=24 * 3600, repair=args.repair)
    except NotRunning:
        store = Store(home.store_dir)
        try:
            report = store.fsck(repair=args.repair)
        finally:
            store.close()
        r = {"clean": report.clean, "lines": report.lines()}
    if args.json:
        _print_json(r)
    else:
        for line in r["lines"]:
            print(line)
    return 0 if r["clean"] or args.repair else EXIT_ERROR


def _pin_target(home: Home, text: str) -> tuple[str, str]:
    """A path inside the node's mount, or VOLUME:/path, as (volume, path)."""
    from .pins import normalize_path, parse_target

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


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def cmd_pin(args: argparse.Namespace) -> int:
    home = _home(args).require()
    targets = [_pin_target(home, t) for t in args.paths]
    results = []
    for volume, path in targets:
        req = {"volume": volume, "path": path}
        job = control.call(home.control_socket, "pin", timeout=600, follow=args.follow, **req)
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
                f"pinned {job['name']}: {job['chunks_total']} chunks, {_mib(job['bytes_total'])}"
                + (f" ({job['error']})" if job["error"] else "")
            )
    if args.json:
        _print_json(results)
    return 0 if all(j["state"] == "complete" for j in results) else EXIT_ERROR


def _watch_pin(home: Home, req: dict[str, str], job: dict[str, Any], show: bool) -> dict[str, Any]:
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    with contextlib.ExitStack() as stack:
        bar = None
        if show:
            progress = stack.enter_context(
                Progress(
                    "{task.description}",
                    BarColumn(),
                    DownloadColumn(),
                    TransferSpeedColumn(),
                    TimeRemainingColumn(),
                    transient=True,
                )
            )
            bar = progress.add_task(f"pin {job['name']}", total=None)
        while job["state"] in ("resolving", "fetching"):
            time.sleep(0.2)
            job = control.call(home.control_socket, "pin-status", timeout=30, **req)
            if bar is not None:
                progress.update(bar, total=job["bytes_total"] or None, completed=job["bytes_done"])
    if job["state"] != "complete":
        raise P2pfsError(f"pin of {job['name']} {job['state']}: {job['error']}")
    return job


def cmd_unpin(args: argparse.Namespace) -> int:
    home = _home(args).require()
    for text in args.paths:
        volume, path = _pin_target(home, text)
        r = control.call(home.control_socket, "unpin", timeout=60, volume=volume, path=path)
        print(f"unpinned {r['unpinned']}")
    return 0


def cmd_log(args: argparse.Namespace) -> int:
    home = _home(args).require()
    r = control.call(home.control_socket, "log", timeout=120, volume=args.volume, limit=args.limit)
    if args.json:
        _print_json(r["snapshots"])
        return 0
    for snap in r["snapshots"]:
        if not snap["available"]:
            print(f"seq {snap['seq']:>6}  {snap['id'][:16]}  (not available: {snap['error']})")
            continue
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(snap["time"]))
        print(f"seq {snap['seq']:>6}  {snap['id'][:16]}  {when}")
    return 0


def cmd_commit(args: argparse.Namespace) -> int:
    home = _home(args).require()
    r = control.call(home.control_socket, "commit", timeout=3600, volume=args.volume)
    if args.json:
        _print_json(r)
    elif r["changed"]:
        print(
            f"snapshot {r['snapshot']} (volume {r['volume']}, seq {r['seq']}): "
            f"{r['files_chunked']} files chunked, {r['trees']} directories, {r['seconds']:.2f} s"
        )
    else:
        print(f"nothing to commit: volume {r['volume']} is at seq {r['seq']}")
    return 0


def cmd_pins(args: argparse.Namespace) -> int:
    home = _home(args).require()
    r = control.call(home.control_socket, "pins", timeout=30)
    if args.json:
        _print_json(r)
        return 0
    for p in r["pins"]:
        state = "complete" if p["complete"] else f"incomplete ({p['present']}/{p['ids']} ids)"
        follow = " follow" if p["follow"] else ""
        print(f"{p['name']}\t{_mib(p['bytes'])}\tsnapshot {p['seq']}{follow}\t{state}")
    print(f"offline ready: {'yes' if r['offline_ready'] else 'no'}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "init": cmd_init,
    "volume": cmd_volume,
    "import": cmd_import,
    "mount": cmd_mount,
    "umount": cmd_umount,
    "daemon": cmd_daemon,
    "status": cmd_status,
    "scrub": cmd_scrub,
    "peers": cmd_peers,
    "fsck": cmd_fsck,
    "pin": cmd_pin,
    "unpin": cmd_unpin,
    "pins": cmd_pins,
    "log": cmd_log,
    "commit": cmd_commit,
}


def _configure_logging(args: argparse.Namespace) -> None:
    daemon = args.command == "daemon"
    level = logging.INFO if daemon else logging.WARNING
    if args.verbose:
        level = logging.DEBUG if args.verbose > 1 or daemon else logging.INFO
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if daemon else "p2pfs: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return COMMANDS[args.command](args)
    except P2pfsError as e:
        print(f"p2pfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("p2pfs: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
