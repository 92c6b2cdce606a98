"""The admin's side of access: grants, groups, key epochs, and signing the access list.

Grants are kept as given (node ids and ``@group`` names) in ``HOME/estate/grants.json``
and groups in ``groups.json``; every change expands them and signs a new access list
(``access.py``) with the next number. The admin node is a reader of every private
volume: it holds the secrets of every epoch as boxes in the list, sealed to its own
node key, and opens them to seal them again to the readers of the moment. The node
keys come from ``nodes.json``, which records every node the admin approved.

All changes run under the estate's admin lock: two changes never share a number.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from p2pfs.errors import NotFound, P2pfsError, UsageError
from p2pfs.fsutil import read_bounded, write_atomic
from p2pfs.home import Home, node_id_of
from p2pfs.keys import PUBLIC_KEY_SIZE, seal_box
from p2pfs.names import name_problem
from p2pfs.seal import new_secret

from .access import VolumeAccess, sign_access
from .estate import Estate, admin_lock, node_key
from .revocation import NODE_ID_SIZE

NODES = "nodes.json"
GRANTS = "grants.json"
GROUPS = "groups.json"
_MAX_FILE = 16 * 1024 * 1024
_NODE_HEX = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Grants:
    """One private volume's grants as the admin gave them."""

    name: str
    readers: tuple[str, ...]  # node ids in hex, or "@group"
    cachers: tuple[str, ...]


def _load(home: Home, file: str) -> dict[str, object]:
    path = home.estate_dir / file
    if not path.exists():
        return {}
    try:
        doc = json.loads(read_bounded(path, _MAX_FILE, file))
    except ValueError as e:
        raise P2pfsError(f"{path} is damaged: {e}") from None
    if not isinstance(doc, dict):
        raise P2pfsError(f"{path} is damaged: not a JSON object")
    return doc


def _save(home: Home, file: str, doc: dict[str, object]) -> None:
    data = json.dumps(doc, indent=1, sort_keys=True).encode() + b"\n"
    write_atomic(home.estate_dir / file, data, 0o600)


def remember_node(home: Home, public: bytes) -> None:
    """Record an approved node's key (called by the admin's init and approve)."""
    with admin_lock(home):
        nodes = _load(home, NODES)
        nodes[node_id_of(public).hex()] = public.hex()
        _save(home, NODES, nodes)


def _public_keys(home: Home) -> dict[bytes, bytes]:
    out = {}
    for node, pub in _load(home, NODES).items():
        if isinstance(pub, str) and _NODE_HEX.fullmatch(node):
            key = bytes.fromhex(pub)
            if len(key) == PUBLIC_KEY_SIZE and node_id_of(key).hex() == node:
                out[bytes.fromhex(node)] = key
    return out


def approved_nodes(home: Home) -> list[bytes]:
    """Every node the admin of this home approved (nodes.json), revoked ones included."""
    return sorted(_public_keys(home))


def parse_principal(text: str) -> str:
    """A node id (32 hex digits) or a group (``@name`` or a group's plain name)."""
    t = text.strip().lower() if _NODE_HEX.fullmatch(text.strip().lower()) else text.strip()
    if _NODE_HEX.fullmatch(t):
        return t
    group = t[1:] if t.startswith("@") else t
    if (problem := name_problem(group)) is not None:
        raise UsageError(
            f"{text!r} is neither a node id ({NODE_ID_SIZE * 2} hex digits) nor a group: {problem}"
        )
    return "@" + group


def _groups(home: Home) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, members in _load(home, GROUPS).items():
        if isinstance(members, list):
            out[name] = [m for m in members if isinstance(m, str) and _NODE_HEX.fullmatch(m)]
    return out


def _grants(home: Home) -> dict[bytes, Grants]:
    out = {}
    for vid, g in _load(home, GRANTS).items():
        if isinstance(g, dict):
            out[bytes.fromhex(vid)] = Grants(
                str(g.get("name")), tuple(g.get("readers", ())), tuple(g.get("cachers", ()))
            )
    return out


def _save_grants(home: Home, grants: dict[bytes, Grants]) -> None:
    _save(
        home,
        GRANTS,
        {
            vid.hex(): {"name": g.name, "readers": list(g.readers), "cachers": list(g.cachers)}
            for vid, g in grants.items()
        },
    )


def _expand(principals: tuple[str, ...], groups: dict[str, list[str]]) -> set[bytes]:
    out: set[bytes] = set()
    for p in principals:
        if p.startswith("@"):
            out.update(bytes.fromhex(m) for m in groups.get(p[1:], []))
        else:
            out.add(bytes.fromhex(p))
    return out


def _admin(home: Home) -> Estate:
    estate = Estate.load(home)
    if estate is None:
        raise NotFound(f"{home.root} holds no estate: private volumes need one ('estate init')")
    if not estate.is_admin:
        raise P2pfsError(
            "only the admin node (it holds the estate CA key) can change who may read a volume"
        )
    return estate


def _sign(home: Home, estate: Estate, grants: dict[bytes, Grants], new_epoch: set[bytes]) -> int:
    """Expand ``grants`` and sign the next access list; volumes in ``new_epoch`` get a
    fresh secret. Returns the new list's number."""
    key = node_key(home)
    me = estate.node_id
    keys = _public_keys(home)
    keys.setdefault(me, key.public_bytes())
    groups = _groups(home)
    current = estate.access
    volumes = []
    for vid, g in sorted(grants.items()):
        readers = _expand(g.readers, groups) | {me}
        cachers = _expand(g.cachers, groups) - readers
        unknown = sorted(n.hex() for n in readers | cachers if n not in keys)
        if unknown:
            raise P2pfsError(
                f"node {unknown[0]} is not known to this admin (it has no record of its key): "
                "grant nodes whose join this admin approved"
            )
        old = current.of(vid)
        secrets: dict[int, bytes] = {}
        if old is not None:
            for epoch in old.boxes:
                secrets[epoch] = current.secret(vid, epoch, key, me)
        epoch = old.epoch if old is not None else 0
        if old is None or vid in new_epoch:
            epoch += 1
            secrets[epoch] = new_secret()
        boxes = {e: {n: seal_box(keys[n], s) for n in readers} for e, s in secrets.items()}
        volumes.append(
            VolumeAccess(vid, g.name, frozenset(readers), frozenset(cachers), epoch, boxes)
        )
    assert estate._ca_key is not None
    number = current.number + 1
    data = sign_access(estate._ca_key, estate.estate_id, number, volumes)
    if not estate.accept_access_list(data):
        raise AssertionError("a newly signed access list was not accepted")
    return number


def make_private(home: Home, volume_id: bytes, name: str) -> int:
    """Make a new volume private: only the admin reads it until grants say more."""
    with admin_lock(home):
        estate = _admin(home)
        grants = _grants(home)
        grants[volume_id] = Grants(name, (estate.node_id.hex(),), ())
        number = _sign(home, estate, grants, set())
        _save_grants(home, grants)
        return number


def _private(home: Home, volume_id: bytes, name: str) -> tuple[Estate, dict[bytes, Grants]]:
    estate = _admin(home)
    grants = _grants(home)
    if volume_id not in grants:
        raise UsageError(f"volume {name!r} is not private (make it with 'volume create --private')")
    return estate, grants


def grant(
    home: Home, volume_id: bytes, name: str, principals: list[str], *, cache_only: bool
) -> int:
    """Let nodes or groups read (or only cache) a private volume; returns the list number."""
    parsed = [parse_principal(p) for p in principals]
    with admin_lock(home):
        estate, grants = _private(home, volume_id, name)
        for p in parsed:
            if p.startswith("@") and p[1:] not in _groups(home):
                raise NotFound(f"no group {p[1:]!r} (make it with 'group add {p[1:]} NODE_ID...')")
        g = grants[volume_id]
        readers = [r for r in g.readers if r not in parsed or not cache_only]
        cachers = [c for c in g.cachers if c not in parsed or cache_only]
        target = cachers if cache_only else readers
        target.extend(p for p in parsed if p not in target)
        if cache_only and estate.node_id.hex() in parsed:
            raise UsageError("the admin node always reads its private volumes")
        was_reader = any(p in g.readers for p in parsed) and cache_only
        grants[volume_id] = Grants(g.name, tuple(readers), tuple(cachers))
        # A reader turned cache-only loses what is published from now on, as a revoke.
        number = _sign(home, estate, grants, {volume_id} if was_reader else set())
        _save_grants(home, grants)
        return number


def revoke(home: Home, volume_id: bytes, name: str, principals: list[str]) -> int:
    """Take grants away; a removed reader starts a new key epoch. Returns the list number."""
    parsed = [parse_principal(p) for p in principals]
    with admin_lock(home):
        estate, grants = _private(home, volume_id, name)
        g = grants[volume_id]
        if estate.node_id.hex() in parsed:
            raise UsageError("the admin node always reads its private volumes")
        for p in parsed:
            if p not in g.readers and p not in g.cachers:
                via = [
                    f"@{grp}"
                    for grp, members in _groups(home).items()
                    if p in members and f"@{grp}" in (*g.readers, *g.cachers)
                ]
                hint = f" (it may read through {', '.join(via)})" if via else ""
                raise NotFound(f"{p} holds no grant of volume {name!r}{hint}")
        readers = tuple(r for r in g.readers if r not in parsed)
        cachers = tuple(c for c in g.cachers if c not in parsed)
        had_reader = any(p in g.readers for p in parsed)
        grants[volume_id] = Grants(g.name, readers, cachers)
        number = _sign(home, estate, grants, {volume_id} if had_reader else set())
        _save_grants(home, grants)
        return number


def rekey(home: Home, volume_id: bytes, name: str) -> int:
    """Start a new key epoch with the same grants; returns the list number."""
    with admin_lock(home):
        estate, grants = _private(home, volume_id, name)
        return _sign(home, estate, grants, {volume_id})


def group_add(home: Home, group: str, members: list[str]) -> int:
    """Add nodes to a group (made if new) and re-sign: grants naming it follow."""
    if (problem := name_problem(group)) is not None:
        raise UsageError(f"group name: {problem}")
    parsed = [parse_principal(m) for m in members]
    if any(p.startswith("@") for p in parsed):
        raise UsageError("a group holds node ids, not other groups")
    with admin_lock(home):
        estate = _admin(home)
        groups = _groups(home)
        have = groups.setdefault(group, [])
        have.extend(p for p in parsed if p not in have)
        _save(home, GROUPS, dict(groups))
        return _sign(home, estate, _grants(home), set())


def groups(home: Home) -> dict[str, list[str]]:
    _admin(home)
    return _groups(home)


def grants_of(home: Home, volume_id: bytes) -> Grants | None:
    return _grants(home).get(volume_id)
