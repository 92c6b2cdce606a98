"""``p2pfs appliance build|seed|firstboot``: the appliance VM image and its seed disk
(what the commands do lives in ``p2pfs.appliance.image`` and ``.seed``)."""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from p2pfs.appliance.image import (
    DEFAULT_MIRROR,
    DEFAULT_SIZE,
    FORMATS,
    build_cached,
    cache_dir,
    convert,
    format_of,
)
from p2pfs.appliance.seed import firstboot, make_seed_tree, pack_seed
from p2pfs.errors import UsageError

from .common import Subparsers, node_home


def add_actions(asub: Subparsers) -> None:
    b = asub.add_parser("build", help="(admin, root) build the appliance VM image")
    b.add_argument("--out", required=True, type=Path, metavar="FILE")
    b.add_argument("--format", choices=sorted(FORMATS), help="default: from --out's suffix")
    b.add_argument("--size", default=DEFAULT_SIZE, help="the disk's virtual size (default 8G)")
    b.add_argument("--mirror", default=DEFAULT_MIRROR, help="the Debian mirror for debootstrap")
    b.add_argument("--kernel", action="store_true", help="also write FILE.vmlinuz, FILE.initrd")
    b.add_argument(
        "--wheels",
        type=Path,
        metavar="DIR",
        help="p2pfs and its dependencies as wheels (default: built from this checkout)",
    )

    s = asub.add_parser("seed", help="(admin) make an appliance's seed disk (a secret)")
    s.add_argument("--bundle", required=True, type=Path, help="the appliance node's join bundle")
    s.add_argument("--volumes", default="", help="volumes to follow, comma separated (all)")
    s.add_argument("--cache", help="the store's quota, like 20G (default: none)")
    s.add_argument("--listen", required=True, metavar="ADDR[/PREFIX][:PORT]")
    s.add_argument("--desktop", action="append", default=[], metavar="NAME", required=True)
    s.add_argument("--lan", default="dhcp", help="the LAN NIC: dhcp or ADDR/PREFIX")
    s.add_argument("--gateway", help="the LAN's default gateway (with a static --lan)")
    s.add_argument("--peer", action="append", default=[], metavar="HOST:PORT")
    s.add_argument("--no-discovery", action="store_true", help="no mDNS on the LAN")
    s.add_argument("--desktop-pin", action="store_true", help="desktops may pin and unpin")
    s.add_argument(
        "--no-desktop-snapshots",
        action="store_true",
        help="hide VOLUME/.snapshots/ from desktops (the link and the SMB share)",
    )
    s.add_argument("--out", required=True, type=Path, metavar="FILE")
    s.add_argument("--format", choices=sorted(FORMATS), default="raw")

    f = asub.add_parser("firstboot", help="(inside the appliance) apply the seed disk")
    f.add_argument("--label", default="P2PFS-SEED")
    f.add_argument("--wait", type=float, default=20.0, metavar="SECONDS")


ACTIONS = ("build", "seed", "firstboot")


def cmd_action(args: argparse.Namespace) -> int:
    if args.appliance_command == "build":
        return _cmd_build(args)
    if args.appliance_command == "seed":
        return _cmd_seed(args)
    home = node_home(args)
    return firstboot(home, label=args.label, wait_s=args.wait)


def _cmd_build(args: argparse.Namespace) -> int:
    fmt = format_of(args.out, args.format)
    wheels = args.wheels.absolute() if args.wheels else None
    built = build_cached(args.mirror, args.size, wheels)
    convert(built.disk, args.out, fmt)
    if args.kernel:
        shutil.copyfile(built.kernel, f"{args.out}.vmlinuz")
        shutil.copyfile(built.initrd, f"{args.out}.initrd")
    print(f"wrote {args.out} ({fmt}, image {built.key}; cache {cache_dir()})")
    return 0


def _cmd_seed(args: argparse.Namespace) -> int:
    staging = node_home(args).require()
    try:
        bundle = args.bundle.read_bytes()
    except OSError as e:
        raise UsageError(f"--bundle {args.bundle}: {e.strerror}") from None
    volumes = [v for v in args.volumes.split(",") if v]
    out = args.out.absolute()
    with tempfile.TemporaryDirectory(prefix="p2pfs-seed-") as tmp:
        tokens = make_seed_tree(
            staging,
            bundle,
            Path(tmp) / "seed",
            volumes=volumes,
            cache=args.cache,
            listen=args.listen,
            desktops=args.desktop,
            lan=args.lan,
            gateway=args.gateway,
            peers=args.peer,
            discovery=not args.no_discovery,
            desktop_pin=args.desktop_pin,
            desktop_snapshots=not args.no_desktop_snapshots,
            token_dir=out.parent,
        )
        if args.format == "raw":
            pack_seed(Path(tmp) / "seed", out)
        else:
            raw = Path(tmp) / "seed.img"
            pack_seed(Path(tmp) / "seed", raw)
            convert(raw, out, args.format)
            out.chmod(0o600)
    print(f"wrote the seed {out} (a secret: it holds the node key; delete it after first boot)")
    for name, path in tokens.items():
        print(f"desktop {name}: token {path}, SMB account {path.with_suffix('.smb')}")
    return 0
