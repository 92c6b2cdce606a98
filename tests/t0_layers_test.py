"""The house as drawn in docs/architecture.md: packages by layer, no cycles, library homes.

One table (``LAYERS``) is the rule: a module may import only from its own layer or
below; nothing outside ``p2pfs.lab`` imports the lab; no two modules import each
other, directly or round a longer loop; each heavy library lives in its home modules.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PKG = Path(__file__).resolve().parents[1] / "p2pfs"

# Lowest first. Each name is a package (p2pfs/NAME/) or a top-level module
# (p2pfs/NAME.py); docs/architecture.md says what each one owns.
LAYERS: list[set[str]] = [
    {"__init__", "errors"},
    {"ids", "names", "sizes", "fsutil"},
    {"keys", "config", "home", "seal"},
    {"chunking", "objects"},
    {"store"},
    {"volume"},
    {"trust"},
    {"net"},
    {"origin"},
    {"fs"},
    {"node"},
    {"appliance"},
    {"cli"},
    {"lab"},
    {"__main__"},
]
# Heavy libraries live in their home modules (or packages) only, so they can be swapped
# in one place.
HOMES = {
    "msgpack": {"p2pfs.objects.codec"},
    "cryptography": {"p2pfs.keys", "p2pfs.seal", "p2pfs.trust"},
    "nacl": {"p2pfs.keys"},
    "ssl": {"p2pfs.trust"},
    "sqlite3": {"p2pfs.store.index", "p2pfs.store.schema", "p2pfs.volume.worktree_db"},
    "pyfuse3": {"p2pfs.fs.fuse"},
    "zeroconf": {"p2pfs.net.discovery"},
    "blake3": {"p2pfs.ids", "p2pfs.chunking.chunker", "p2pfs.chunking.twin"},
    "rich": {"p2pfs.cli.progress"},
    "msgspec": {"p2pfs.config", "p2pfs.appliance.seed"},
    "prometheus_client": {"p2pfs.node.metrics"},
    "boto3": {"p2pfs.origin.s3"},
    "botocore": {"p2pfs.origin.s3"},
    "urllib3": {"p2pfs.origin.http"},
}


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``)."""
    out = {}
    for path in PKG.rglob("*.py"):
        parts = ("p2pfs", *path.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 2:
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, bool]]:
    """(imported module, internal) for every import in the file, function-level ones too."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, a.name == "p2pfs" or a.name.startswith("p2pfs.")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join([*base, *([node.module] if node.module else [])])
            else:
                mod = node.module or ""
            internal = mod == "p2pfs" or mod.startswith("p2pfs.")
            yield mod, internal
            if internal:  # `from p2pfs.net import wire`: wire is a module
                for a in node.names:
                    if f"{mod}.{a.name}" in known:
                        yield f"{mod}.{a.name}", True


def layer_name(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def layer(module: str) -> int:
    name = layer_name(module)
    for i, names in enumerate(LAYERS):
        if name in names:
            return i
    raise AssertionError(f"{module} is in no layer: add {name!r} to LAYERS")


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    out: dict[str, set[str]] = {}
    for name, path in mods.items():
        deps = set()
        for mod, internal in imports(name, path, known):
            if internal and mod in known and mod != name and not mod.startswith(name + "."):
                deps.add(mod)
        out[name] = deps
    return out


def test_every_import_goes_down_or_sideways() -> None:
    problems = []
    for name, deps in sorted(graph().items()):
        for dep in sorted(deps):
            if layer(dep) > layer(name):
                problems.append(f"{name} (layer {layer(name)}) imports {dep} (layer {layer(dep)})")
            if layer_name(dep) == "lab" and layer_name(name) != "lab":
                problems.append(f"{name} imports the lab ({dep}): only tests and the demo may")
    assert not problems, "\n".join(problems)


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done

    def visit(v: str, stack: list[str]) -> list[str] | None:
        state[v] = 1
        stack.append(v)
        for w in sorted(g.get(v, ())):
            if state.get(w) == 1:
                return [*stack[stack.index(w) :], w]
            if w not in state and (found := visit(w, stack)):
                return found
        stack.pop()
        state[v] = 2
        return None

    for v in sorted(g):
        if v not in state and (found := visit(v, [])):
            return found
    return None


def test_no_import_cycle() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_layer_in_the_table_exists() -> None:
    for names in LAYERS:
        for name in names:
            assert (PKG / name).is_dir() or (PKG / f"{name}.py").is_file(), name


@pytest.mark.parametrize("library", sorted(HOMES))
def test_library_homes(library: str) -> None:
    mods = modules()
    known = set(mods)
    users = {
        name
        for name, path in mods.items()
        for mod, internal in imports(name, path, known)
        if not internal and mod.split(".")[0] == library
    }
    homes = HOMES[library]
    strays = {u for u in users if not any(u == h or u.startswith(h + ".") for h in homes)}
    assert not strays, f"{library} is imported by {sorted(strays)}"
