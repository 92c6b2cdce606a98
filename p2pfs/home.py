"""A node's home directory: where its identity, volumes, store and sockets live.

Layout::

    HOME/node.json          node id and creation time
    HOME/node.key           the node's Ed25519 key (0600; never leaves the node)
    HOME/volumes/NAME/      one folder per volume (volume.json, publisher.key)
    HOME/store/             the content-addressed store (chunk files + index)
    HOME/run/               control socket and pid file of a running daemon
    HOME/log/               daemon logs
    HOME/config.toml        settings (optional; see config.py)
    HOME/estate/            estate membership: CA cert, node cert, revocations (see trust/estate.py)
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from p2pfs.errors import NotFound, P2pfsError
from p2pfs.fsutil import write_atomic
from p2pfs.ids import NodeId, derive
from p2pfs.keys import SigningKey

ENV_HOME = "P2PFS_HOME"


def default_home() -> Path:
    env = os.environ.get(ENV_HOME)
    if env:
        return Path(env)
    return Path.home() / ".local" / "share" / "p2pfs"


def node_id_of(public_key: bytes) -> NodeId:
    # Short enough to read in logs, long enough that a collision needs 2^64 work.
    return NodeId(derive(b"p2pfs-node-id\0", public_key, 16))


@dataclass(frozen=True)
class Home:
    root: Path

    @property
    def node_json(self) -> Path:
        return self.root / "node.json"

    @property
    def node_key(self) -> Path:
        return self.root / "node.key"

    @property
    def volumes_dir(self) -> Path:
        return self.root / "volumes"

    @property
    def store_dir(self) -> Path:
        return self.root / "store"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def control_socket(self) -> Path:
        return self.run_dir / "control.sock"

    @property
    def pid_file(self) -> Path:
        return self.run_dir / "daemon.pid"

    @property
    def config_file(self) -> Path:
        return self.root / "config.toml"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def estate_dir(self) -> Path:
        return self.root / "estate"

    def is_initialized(self) -> bool:
        return self.node_json.is_file() and self.node_key.is_file()

    def require(self) -> Home:
        """Return self if this is an initialized node home, else a clear NotFound."""
        if not self.root.exists():
            raise NotFound(f"no p2pfs node at {self.root}: run 'p2pfs --home {self.root} init'")
        if not self.is_initialized():
            raise NotFound(
                f"{self.root} is not an initialized p2pfs node: run 'p2pfs --home {self.root} init'"
            )
        return self

    def init(self) -> tuple[NodeId, bool]:
        """Create the node's identity; returns (node id, created). Idempotent."""
        if self.is_initialized():
            return self.node_id(), False
        if self.root.exists() and not self.root.is_dir():
            raise P2pfsError(f"{self.root} exists and is not a directory")
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d in (self.volumes_dir, self.store_dir, self.run_dir, self.log_dir):
            d.mkdir(exist_ok=True, mode=0o700)
        if not self.node_key.exists():
            SigningKey.generate().save(self.node_key)
        key = SigningKey.load(self.node_key)
        node_id = node_id_of(key.public_bytes())
        info = {"node_id": node_id.hex(), "created": int(time.time()), "format": 1}
        write_atomic(self.node_json, json.dumps(info, indent=2).encode() + b"\n", 0o644)
        return node_id, True

    def node_id(self) -> NodeId:
        try:
            info = json.loads(self.node_json.read_text())
            return NodeId(bytes.fromhex(info["node_id"]))
        except FileNotFoundError:
            raise NotFound(f"{self.root} is not an initialized p2pfs node") from None
        except (ValueError, KeyError, TypeError) as e:
            raise P2pfsError(f"{self.node_json} is damaged ({e}): restore it or re-init") from None
