"""The ``p2pfs`` command line: parse, call one layer, print; user errors are one quiet line.

Each command group lives in a module of its own (volumes, mounts, mount_helper,
status, cache, estate, appliance, doctor, web); each registers its subcommands with
``add_commands`` and returns their handlers. Exit codes: docs/cli.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from p2pfs import __version__
from p2pfs.errors import EXIT_INTERRUPTED, EXIT_OK, Interrupted, P2pfsError

from . import access, appliance, cache, doctor, estate, mounts, origin, status, volumes, web
from . import mount_helper as mount_helper_mod
from .common import Handler

log = logging.getLogger("p2pfs")

GROUPS = (
    volumes,
    access,
    origin,
    mounts,
    mount_helper_mod,
    status,
    cache,
    estate,
    appliance,
    doctor,
    web,
)


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, Handler]]:
    p = argparse.ArgumentParser(
        prog="p2pfs", description="A peer-to-peer, content-addressed FUSE cache."
    )
    p.add_argument(
        "--home", type=Path, help="node home (default: $P2PFS_HOME or ~/.local/share/p2pfs)"
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    p.add_argument("--version", action="version", version=f"p2pfs {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    handlers: dict[str, Handler] = {}
    for group in GROUPS:
        handlers.update(group.add_commands(sub))
    return p, handlers


def stderr_is_journal() -> bool:
    """stderr goes to journald: ``$JOURNAL_STREAM`` (DEV:INODE) names this very stream,
    not one a parent had (sd_journal_stream_fd(3))."""
    dev, _, ino = os.environ.get("JOURNAL_STREAM", "").partition(":")
    if not (dev.isdecimal() and ino.isdecimal()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


class JournalFormatter(logging.Formatter):
    """No timestamp (journald stamps every line) and a ``<N>`` syslog priority prefix, which
    journald reads as the line's priority (so ``journalctl -p warning`` works)."""

    PRIORITIES = (
        (logging.CRITICAL, 2),
        (logging.ERROR, 3),
        (logging.WARNING, 4),
        (logging.INFO, 6),
    )

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = next((p for level, p in self.PRIORITIES if record.levelno >= level), 7)
        # A traceback's lines continue the record: one prefix for the whole message.
        return f"<{priority}>{super().format(record)}"


def _configure_logging(args: argparse.Namespace) -> None:
    daemon = args.command == "daemon"
    level = logging.INFO if daemon else logging.WARNING
    if args.verbose:
        level = logging.DEBUG if args.verbose > 1 or daemon else logging.INFO
    if daemon and stderr_is_journal():
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JournalFormatter())
        logging.basicConfig(level=level, handlers=[handler])
        return
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if daemon else "p2pfs: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser, handlers = build_parser()
    args = parser.parse_args(argv)
    _configure_logging(args)
    try:
        return handlers[args.command](args)
    except Interrupted as e:
        print(f"p2pfs: interrupted: {e}", file=sys.stderr)
        return e.exit_code
    except P2pfsError as e:
        print(f"p2pfs: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("p2pfs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def mount_helper(argv: list[str] | None = None) -> int:
    """The console script ``mount.fuse.p2pfs``: mount(8)'s arguments as a ``p2pfs mount``."""
    try:
        cmd = mount_helper_mod.helper_argv(sys.argv[1:] if argv is None else argv)
    except P2pfsError as e:
        print(f"{mount_helper_mod.HELPER}: error: {e}", file=sys.stderr)
        return e.exit_code
    return EXIT_OK if cmd is None else main(cmd)


if __name__ == "__main__":
    sys.exit(main())
