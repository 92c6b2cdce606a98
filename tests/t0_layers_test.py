"""Lower layers never import higher ones; heavy libraries live in one home module each."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "p2pfs"

# DESIGN.md's layers, lowest first. A module may import only from its own layer or below.
LAYERS: list[set[str]] = [
    {"errors", "ids"},
    {"chunker", "chunker_ref", "_fastcdc", "codec", "keys", "index"},
    {"objects"},
    {"store"},
    {"home", "config", "volumes", "pins", "importer", "estate", "worktree", "desktop_auth"},
    {"content"},
    # net: framing, messages, connections, discovery, fetching
    {"wire", "messages", "tlsstream", "connection", "peers", "discovery", "fetcher", "digest"},
    {"desktop_link"},
    {"server", "volume_sync", "pinning", "keeper", "publish"},
    {"vfs", "vfs_write", "live"},
    {"fuse"},
    # (and appliance mode: the daemon serves the desktop face; the desktop's thin client)
    {"control", "daemon", "cli", "estate_cli", "lab", "lab_estate", "demo", "__main__", "__init__"}
    | {"desktop_api", "thin_fs", "appliance_cli", "appliance"}
    | {"appliance_seed", "appliance_image", "appliance_vm"},
]
# Heavy libraries live in one module each (so they can be swapped or stubbed in one place).
HOMES = {
    "msgpack": {"codec"},
    "cryptography": {"keys", "estate", "desktop_auth"},
    "sqlite3": {"index", "worktree"},
    "pyfuse3": {"fuse"},
    "zeroconf": {"discovery"},
    "ssl": {"estate", "tlsstream", "desktop_auth"},
}


def _layer(name: str) -> int:
    for i, layer in enumerate(LAYERS):
        if name in layer:
            return i
    raise AssertionError(f"p2pfs/{name}.py is in no layer: add it to LAYERS")


def _imports(path: Path) -> set[tuple[str, bool]]:
    """(module, internal) pairs imported anywhere in the file."""
    out: set[tuple[str, bool]] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                if node.module:
                    out.add((node.module.split(".")[0], True))
                else:
                    # `from . import x`: x is a module, or a name from __init__.py
                    out.update(
                        (a.name if any(PKG.glob(f"{a.name}.*")) else "__init__", True)
                        for a in node.names
                    )
            elif node.module:
                internal = node.module.startswith("p2pfs")
                out.add(
                    (node.module.split(".")[1 if internal and "." in node.module else 0], internal)
                )
        elif isinstance(node, ast.Import):
            for a in node.names:
                out.add((a.name.split(".")[0], False))
    return out


def test_layers_and_library_homes() -> None:
    problems = []
    for path in sorted(PKG.glob("*.py")):
        me = path.stem
        for mod, internal in _imports(path):
            if internal:
                if _layer(mod) > _layer(me):
                    problems.append(f"{me} (layer {_layer(me)}) imports higher layer {mod}")
            elif mod in HOMES and me not in HOMES[mod]:
                problems.append(f"{me} imports {mod}, which only {sorted(HOMES[mod])} may")
    assert not problems, "\n".join(problems)
