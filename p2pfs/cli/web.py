"""``p2pfs web``: serve the estate view until interrupted (the server: node/web.py)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from p2pfs import config
from p2pfs.errors import EXIT_OK
from p2pfs.node.web import DEFAULT_LISTEN, WebView, read_token

from .common import Handler, Subparsers, node_home


def add_commands(sub: Subparsers) -> dict[str, Handler]:
    web = sub.add_parser(
        "web",
        help="serve the estate view (every node, its volumes, cache and traffic) over HTTP",
    )
    web.add_argument(
        "--listen",
        default=DEFAULT_LISTEN,
        metavar="ADDR:PORT",
        help=f"where to serve it (default {DEFAULT_LISTEN}; port 0: any free port)",
    )
    web.add_argument(
        "--token-file",
        type=Path,
        metavar="FILE",
        help="the admin token the browser must present (required beyond loopback)",
    )
    return {"web": cmd_web}


def cmd_web(args: argparse.Namespace) -> int:
    address = config.parse_peer(args.listen, "--listen", any_port=True)
    token = read_token(args.token_file) if args.token_file else None
    view = WebView(node_home(args).control_socket, address, token=token)

    async def serve() -> None:
        await view.http.listen()
        host = f"[{address[0]}]" if ":" in address[0] else address[0]
        print(f"estate view on http://{host}:{view.http.port}/", flush=True)
        await view.http.run()

    try:
        trio.run(serve)
    except KeyboardInterrupt:
        print("stopped", file=sys.stderr)
    return EXIT_OK
