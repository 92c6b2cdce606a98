"""``mount -t fuse.p2pfs HOME MOUNTPOINT`` and fstab: the ``mount.fuse.p2pfs`` helper.

mount(8) runs ``/sbin/mount.fuse.p2pfs HOME MOUNTPOINT [-sfnv] [-N NS] [-o OPTIONS]``
(man mount, "External helpers") and waits for it to exit, so the helper is
``p2pfs mount``: it starts the daemon detached and returns once the mount answers.
``umount MOUNTPOINT`` needs no helper: the daemon sees its session end and exits.

The console script is ``cli/main.mount_helper``; pip puts it in the environment's bin directory, where mount(8) does
not look: ``p2pfs install-mount-helper`` links it into /sbin.
"""

from __future__ import annotations

import argparse
import os
import sys
import sysconfig
from collections.abc import Sequence
from pathlib import Path

from p2pfs.errors import EXIT_OK, NotFound, P2pfsError, UsageError

from .common import Handler, Subparsers

HELPER = "mount.fuse.p2pfs"
HELPER_DIR = Path("/sbin")

# What fstab lines carry for mount(8), systemd or the kernel's generic flags, and which
# a FUSE daemon has nothing to do with (FUSE mounts are nosuid,nodev anyway).
IGNORED = frozenset(
    {
        "defaults",
        "rw",
        "auto",
        "noauto",
        "nofail",
        "_netdev",
        "suid",
        "nosuid",
        "dev",
        "nodev",
        "exec",
        "noexec",
    }
)
IGNORED_PREFIXES = ("x-", "comment=")
# Options that become a flag of ``p2pfs mount``.
MAPPED = {"ro": "--read-only", "allow_other": "--allow-other"}


def mount_flags(options: Sequence[str]) -> list[str]:
    """The ``p2pfs mount`` flags for mount(8)'s ``-o`` lists; UsageError on one it lacks."""
    flags: list[str] = []
    for group in options:
        for opt in group.split(","):
            opt = opt.strip()
            if not opt or opt in IGNORED or opt.startswith(IGNORED_PREFIXES):
                continue
            if opt not in MAPPED:
                known = ", ".join([*MAPPED, *sorted(IGNORED), "x-*"])
                raise UsageError(f"unknown mount option {opt!r} for fuse.p2pfs (known: {known})")
            if MAPPED[opt] not in flags:
                flags.append(MAPPED[opt])
    return flags


def helper_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=HELPER,
        description="mount(8)'s helper for fuse.p2pfs: mount the node home SOURCE on MOUNTPOINT",
    )
    p.add_argument("source", type=Path, help="the node home")
    p.add_argument("mountpoint", type=Path)
    p.add_argument("-o", dest="options", action="append", default=[], metavar="OPTIONS")
    p.add_argument("-t", dest="type", default="fuse.p2pfs")
    p.add_argument("-s", action="store_true", help="sloppy: unknown options are ignored")
    p.add_argument("-f", action="store_true", help="fake: check the options, mount nothing")
    p.add_argument("-n", action="store_true", help="no mtab (there is none to write)")
    p.add_argument("-v", action="count", default=0, help="more log output")
    p.add_argument("-N", dest="namespace", help=argparse.SUPPRESS)
    return p


def helper_argv(argv: Sequence[str]) -> list[str] | None:
    """The ``p2pfs`` command line a helper invocation stands for (None: -f, nothing to do)."""
    args = helper_parser().parse_args(argv)
    if args.type not in ("fuse.p2pfs", "p2pfs"):
        raise UsageError(f"{HELPER} mounts type fuse.p2pfs, not {args.type!r}")
    if args.namespace is not None:
        raise UsageError(f"{HELPER} cannot mount into another namespace (-N {args.namespace})")
    if args.s:
        kept = [o for group in args.options for o in group.split(",") if _known(o)]
        flags = mount_flags(kept)
    else:
        flags = mount_flags(args.options)
    if args.f:
        return None
    source = args.source.absolute()
    return [
        "--home",
        str(source),
        *(["-v"] * args.v),
        "mount",
        str(args.mountpoint.absolute()),
        *flags,
    ]


def _known(opt: str) -> bool:
    try:
        mount_flags([opt])
    except UsageError:
        return False
    return True


# -- p2pfs install-mount-helper -------------------------------------------------------


def add_commands(sub: Subparsers) -> dict[str, Handler]:
    ih = sub.add_parser(
        "install-mount-helper",
        help=f"link {HELPER} into /sbin so that mount -t fuse.p2pfs and fstab lines work (root)",
    )
    ih.add_argument("--dir", type=Path, default=HELPER_DIR, help="where mount(8) looks (/sbin)")
    ih.add_argument("--remove", action="store_true", help="remove the link instead")
    return {"install-mount-helper": cmd_install_helper}


def installed_script() -> Path:
    """The console script pip made next to this environment's python."""
    for where in (Path(sysconfig.get_path("scripts")), Path(sys.executable).parent):
        if (where / HELPER).is_file():
            return where / HELPER
    raise NotFound(
        f"{HELPER} is not installed next to {sys.executable}: reinstall the p2pfs package"
    )


def cmd_install_helper(args: argparse.Namespace) -> int:
    link = args.dir.absolute() / HELPER
    if args.remove:
        if not link.is_symlink():
            if link.exists():
                raise P2pfsError(f"{link} is not a link this command made: not removing it")
            print(f"{link} is not installed")
            return EXIT_OK
        link.unlink()
        print(f"removed {link}")
        return EXIT_OK
    target = installed_script()
    if not args.dir.is_dir():
        raise NotFound(f"{args.dir} is not a directory")
    if link.is_symlink() and Path(os.readlink(link)) == target:
        print(f"{link} -> {target} (already installed)")
        return EXIT_OK
    if link.exists() or link.is_symlink():
        raise P2pfsError(
            f"{link} exists and points elsewhere ({os.path.realpath(link)}): remove it first "
            f"('p2pfs install-mount-helper --remove')"
        )
    try:
        link.symlink_to(target)
    except PermissionError:
        raise P2pfsError(f"cannot create {link} (permission denied): run it as root") from None
    print(f"{link} -> {target}")
    return EXIT_OK
