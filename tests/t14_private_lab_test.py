"""Private volumes in the lab: four hosts, real namespaces, mDNS, TLS, daemons and mounts.

``a`` is the admin and publisher, ``b`` may read ``hr``, ``c`` is granted nothing,
``d`` may only cache it. The tests run in order on one estate, as an admin's day
would: publish, read, lose the origin, meet a corrupt cache, revoke, re-grant, and
a peer that tries to make a node store bytes of its own choosing.
"""

from __future__ import annotations

import json
import random
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from harness import require_lab

from p2pfs.lab.estate import EstateLab, Node, estate_lab, wait_for, wait_until_meshed
from p2pfs.node import control
from p2pfs.objects.id_list import decode_id_list
from p2pfs.objects.model import decode_snapshot

pytestmark = [pytest.mark.lab, pytest.mark.fuse]
MIB = 1024 * 1024
NAMES = ["a", "b", "c", "d"]
MARKER = b"P2PFS-PRIVATE-MARKER-7f3a"

# Speaks the protocol as node HOME to TARGET: sends a hello naming nothing, then asks
# what argv says and prints what came back (JSON on stdout). Asked for a chunk, it
# serves what HOME's store holds, unchecked: the attacker that offers its own bytes.
PROBE = textwrap.dedent(
    """
    import json, socket, ssl, sys
    from pathlib import Path
    from p2pfs.net import wire, messages
    from p2pfs.net.digest import Bloom
    from p2pfs.trust.estate import Estate
    from p2pfs.home import Home
    home, target, vid, ids, fetch_id = sys.argv[1:6]
    ids = [bytes.fromhex(i) for i in ids.split(",") if i]
    est = Estate.load(Home(Path(home)))
    raw = socket.create_connection((target, 7420), timeout=10)
    s = est.client_context().wrap_socket(raw)
    hello = messages.Hello(est.node_id, est.estate_id, 1, (), est.revocation_number,
                           est.access.number)
    s.sendall(wire.encode(hello.to_wire()))
    requests = {1: {"t": "snapshot", "vid": bytes.fromhex(vid)}}
    if ids:
        requests[2] = {"t": "have", "ids": ids}
        for n, i in enumerate(ids[:8]):
            requests[10 + n] = {"t": "get", "cid": i}
    if fetch_id != "-":
        requests[100] = {"t": "get", "cid": bytes.fromhex(fetch_id), "fetch": True}
    for rid, req in requests.items():
        s.sendall(wire.encode({**req, "id": rid}))
    out = {"answers": {}, "volumes": [], "digest_has": None}
    dec = wire.Decoder()
    s.settimeout(20)
    try:
        while len(out["answers"]) < len(requests) or out["digest_has"] is None:
            data = s.recv(1 << 20)
            if not data:
                break
            for h, payload in dec.feed(data):
                if h["t"] == "hello":
                    out["volumes"] = [v[0] for v in h["vols"]]
                elif h["t"] == "digest":
                    bloom = Bloom(payload, h["k"])
                    out["digest_has"] = sum(1 for i in ids if i in bloom)
                elif h["t"] == "r":
                    bits = h.get("bits")
                    out["answers"][str(h["id"])] = {
                        "err": h.get("err"),
                        "bytes": len(payload),
                        "bits": sum(bin(b).count("1") for b in bits) if bits else 0,
                    }
                elif h["t"] == "ping":
                    s.sendall(wire.encode(messages.answer(h["id"])))
                elif h["t"] == "get":
                    c = h["cid"].hex()
                    f = Path(home) / "store" / "chunks" / c[:2] / c[2:4] / c
                    if f.exists():
                        out["served"] = out.get("served", 0) + 1
                        s.sendall(wire.encode(messages.answer(h["id"]), f.read_bytes()))
                    else:
                        s.sendall(wire.encode(messages.answer(h["id"], error="missing")))
    except (OSError, ssl.SSLError, TimeoutError):
        pass
    print(json.dumps(out))
    """
)


def probe(
    node: Node, target: Node, vid: str, ids: list[bytes], fetch_id: bytes | None = None
) -> dict:
    proc = node.host.run(
        [
            sys.executable,
            "-c",
            PROBE,
            str(node.home),
            target.address,
            vid,
            ",".join(i.hex() for i in ids),
            fetch_id.hex() if fetch_id else "-",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def chunk_path(home: Path, cid: bytes) -> Path:
    h = cid.hex()
    return home / "store" / "chunks" / h[:2] / h[2:4] / h


def head_of(home: Path, volume: str) -> bytes:
    doc = json.loads((home / "volumes" / volume / "volume.json").read_text())
    return bytes.fromhex(doc["head"])


def id_list(home: Path, snapshot_id: bytes) -> list[bytes]:
    """Every stored id a private snapshot names, read from a store's files."""
    snap = decode_snapshot(chunk_path(home, snapshot_id).read_bytes())
    ids, part = [], snap.ids
    while part is not None:
        ids.append(part)
        doc = decode_id_list(chunk_path(home, part).read_bytes())
        ids.extend(doc.ids)
        part = doc.next
    return ids


def grep_store(home: Path, needle: bytes) -> list[Path]:
    return [p for p in (home / "store").rglob("*") if p.is_file() and needle in p.read_bytes()]


def make_tree(root: Path) -> dict[str, bytes]:
    rng = random.Random(11)
    (root / "payroll").mkdir(parents=True)
    files = {
        "payroll/2026.csv": MARKER + b"\n" + b"name,salary\n" * 5000,
        "payroll/big.bin": rng.randbytes(6 * MIB) + MARKER,
        "secret-name-of-a-file.txt": MARKER * 3,
    }
    for rel, data in files.items():
        (root / rel).write_bytes(data)
    return files


def read_tree(node: Node, files: dict[str, bytes]) -> None:
    for rel, data in files.items():
        assert (node.mountpoint / "hr" / rel).read_bytes() == data, f"{node.name}: {rel}"


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EstateLab, dict[str, bytes]]]:
    require_lab()
    work = tmp_path_factory.mktemp("private")
    files = make_tree(work / "hr")
    (work / "pub").mkdir()
    (work / "pub" / "readme.txt").write_text("every member reads this\n")
    with estate_lab(work, NAMES) as estate:
        a, b, _c, d = (estate.node(n) for n in NAMES)
        estate.publish(work / "pub", "tools")  # a public volume: behaves as before
        a.cli("volume", "create", "hr", "--private")
        a.cli("volume", "grant", "hr", b.node_id())
        a.cli("volume", "grant", "hr", d.node_id(), "--cache-only")
        a.cli("import", str(work / "hr"), "hr")
        for node in estate.nodes:
            node.configure(deadline_s=6, hedge_after_s=0.3)
            # d plays a faulty peer later: its fault hooks must be reachable.
            node.start(*(["--debug-faults"] if node is d else []))
        wait_until_meshed(estate.nodes)
        yield estate, files


def test_access_lists_what_admin_granted(lab: tuple[EstateLab, dict[str, bytes]]) -> None:
    estate, _ = lab
    a, b, d = estate.node("a"), estate.node("b"), estate.node("d")
    doc = json.loads(a.cli("volume", "access", "hr", "--json").stdout)
    assert doc["private"] is True
    assert set(doc["readers"]) == {a.node_id(), b.node_id()}
    assert doc["cache_only"] == [d.node_id()]
    public = json.loads(a.cli("volume", "access", "tools", "--json").stdout)
    assert public["private"] is False
    # Every member holds the same signed list (it spreads like the revocation list).
    wait_for(
        "the access list to reach d",
        lambda: (
            json.loads(d.cli("volume", "access", "hr", "--json").stdout)["access_list"]
            == doc["access_list"]
        ),
    )


def test_d_caches_and_serves_b_with_a_stopped_and_no_store_holds_plaintext(
    lab: tuple[EstateLab, dict[str, bytes]],
) -> None:
    estate, files = lab
    a, b, c, d = (estate.node(n) for n in NAMES)
    sid = head_of(a.home, "hr")
    wanted = id_list(a.home, sid)
    wait_for(
        "d to cache every id of hr",
        lambda: all(chunk_path(d.home, i).exists() for i in wanted),
        timeout=60,
    )
    assert not (d.mountpoint / "hr").exists()  # d holds it and cannot read it
    vol = next(v for v in d.status()["volumes"] if v["name"] == "hr")
    assert vol["access"] == "cache-only" and vol["problem"]
    assert (c.mountpoint / "tools" / "readme.txt").read_text() == "every member reads this\n"
    served = d.status()["bytes_served"]
    a.stop()
    try:
        read_tree(b, files)  # (b may hold a part already: it was a home for d's fetches)
        assert d.status()["bytes_served"] > served
    finally:
        a.start()
    for node in (a, b, d):
        assert grep_store(node.home, MARKER) == [], f"plaintext in {node.name}'s store"
        assert grep_store(node.home, b"secret-name-of-a-file") == []
    wait_until_meshed(estate.nodes)


def test_c_learns_nothing_of_hr(lab: tuple[EstateLab, dict[str, bytes]]) -> None:
    estate, _ = lab
    a, b, c, d = (estate.node(n) for n in NAMES)
    vid = json.loads(a.cli("volume", "access", "hr", "--json").stdout)["id"]
    ids = id_list(a.home, head_of(a.home, "hr"))[:64]
    assert not (c.mountpoint / "hr").exists()
    assert "hr" not in [v["name"] for v in c.status()["volumes"]]
    assert all(not chunk_path(c.home, i).exists() for i in ids)
    # The estate view: the summaries a, b and d tell c leave hr out; those told b hold it.
    # (Before the probes: they speak as c with a hello of their own.)
    for viewer, sees_hr in ((c, False), (b, True)):
        told = estate_view(viewer, {n.node_id() for n in (a, b, c, d)} - {viewer.node_id()})
        assert ("hr" in told[a.node_id()]) is sees_hr, (viewer.name, told)
        assert all(("hr" in vols) is sees_hr for n, vols in told.items() if n != c.node_id())
        assert all("tools" in vols for vols in told.values())

    for target in (a, b, d):
        seen = probe(c, target, vid, ids)
        assert "hr" not in seen["volumes"] and "tools" in seen["volumes"], target.name
        assert seen["answers"]["1"]["err"] == "unknown volume"
        assert seen["answers"]["2"]["bits"] == 0  # have: none of them
        for n in range(min(8, len(ids))):
            assert seen["answers"][str(10 + n)]["err"] == "missing"
        assert seen["digest_has"] == 0
    # The same questions from b, which may read hr, are answered.
    seen = probe(b, a, vid, ids)
    assert "hr" in seen["volumes"] and seen["answers"]["1"]["err"] is None
    assert seen["answers"]["2"]["bits"] == len(ids)
    assert seen["digest_has"] == len(ids)


def estate_view(node: Node, others: set[str]) -> dict[str, list[str]]:
    """The volumes each of ``others`` told ``node`` in its summary (``p2pfs web``'s data)."""
    sock = node.home / "run" / "control.sock"
    told: dict[str, list[str]] = {}

    def heard_all() -> bool:
        view = control.call(sock, "estate")
        told.clear()
        for n in view["nodes"]:
            if n["node_id"] in others and "volumes" in n:
                told[n["node_id"]] = [v["name"] for v in n["volumes"]]
        return set(told) == others

    wait_for(f"{node.name} to hear every summary", heard_all, 30)
    return told


def test_a_flipped_bit_on_d_quarantines_d(lab: tuple[EstateLab, dict[str, bytes]]) -> None:
    estate, files = lab
    a, b, _c, d = (estate.node(n) for n in NAMES)
    src = estate.workdir / "hr"
    fresh = random.Random(5).randbytes(3 * MIB)
    (src / "flip.bin").write_bytes(fresh)
    before = set(id_list(a.home, head_of(a.home, "hr")))
    a.cli("import", str(src), "hr")
    new = [i for i in id_list(a.home, head_of(a.home, "hr")) if i not in before]
    wait_for(
        "d to cache the new snapshot",
        lambda: all(chunk_path(d.home, i).exists() for i in new),
        timeout=60,
    )
    # b may hold some of it (it was a home for d's fetches): take it away, so that with
    # a stopped only d can serve it.
    b.stop()
    for cid in new:
        chunk_path(b.home, cid).unlink(missing_ok=True)
    b.cli("fsck", "--repair", check=False)
    b.start()
    wait_until_meshed(estate.nodes)
    wait_for("b to see flip.bin", lambda: (b.mountpoint / "hr" / "flip.bin").exists())
    for cid in new:  # every new object of d's copy is corrupt now...
        path = chunk_path(d.home, cid)
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(data))
    # ...and d serves what its disk holds without checking it (a faulty peer).
    control.call(d.home / "run" / "control.sock", "inject-fault", handler="net:serve-unverified")
    a.stop()
    try:
        with pytest.raises(OSError) as e:  # only d has it, and its copy is bad: EIO
            (b.mountpoint / "hr" / "flip.bin").read_bytes()
        assert e.value.errno == 5
        peers = {p["node_id"]: p for p in b.status()["peers"]}
        assert peers[d.node_id()]["state"] == "quarantined"
        assert b.status()["corrupt_chunks_rejected"] >= 1
    finally:
        a.start()
    wait_for(
        "b to read flip.bin from a",
        lambda: (b.mountpoint / "hr" / "flip.bin").read_bytes() == fresh,
        timeout=60,
    )
    files["flip.bin"] = fresh
    read_tree(b, files)
    # A sound d again for the tests after this one, and a b that has forgotten its
    # quarantine (d heals its copy by scrub).
    for node in (d, b):
        node.stop()
        node.start()
    wait_until_meshed(estate.nodes)


def test_revoked_b_gets_no_new_snapshot_and_a_new_grant_opens_it(
    lab: tuple[EstateLab, dict[str, bytes]],
) -> None:
    estate, files = lab
    a, b, c, d = (estate.node(n) for n in NAMES)
    a.cli("volume", "revoke", "hr", b.node_id())
    wait_for(
        "b to hold the new access list",
        lambda: next(v for v in b.status()["volumes"] if v["name"] == "hr")["access"] == "none",
    )
    src = estate.workdir / "hr"
    (src / "after-revoke.txt").write_bytes(MARKER + b" new")
    a.cli("import", str(src), "hr")
    seq = json.loads((a.home / "volumes" / "hr" / "volume.json").read_text())["seq"]
    wait_for(
        "d to follow the new snapshot",
        lambda: next(v for v in d.status()["volumes"] if v["name"] == "hr")["seq"] == seq,
    )
    vol = next(v for v in b.status()["volumes"] if v["name"] == "hr")
    assert vol["seq"] < seq and "no longer granted" in vol["problem"]
    assert not (b.mountpoint / "hr" / "after-revoke.txt").exists()
    assert not (c.mountpoint / "hr").exists()
    doc = json.loads(a.cli("volume", "access", "hr", "--json").stdout)
    assert b.node_id() not in doc["readers"] and doc["epoch"] == 2
    # Granted again (through a group this time), b reads the new snapshot.
    a.cli("group", "add", "finance", b.node_id())
    a.cli("volume", "grant", "hr", "@finance")
    wait_for(
        "b to read after-revoke.txt",
        lambda: (b.mountpoint / "hr" / "after-revoke.txt").read_bytes() == MARKER + b" new",
        timeout=60,
    )
    files["after-revoke.txt"] = MARKER + b" new"
    read_tree(b, files)
    for node in (a, b, d):
        assert grep_store(node.home, MARKER) == []


def test_a_home_stores_nothing_no_followed_snapshot_reaches(
    lab: tuple[EstateLab, dict[str, bytes]],
) -> None:
    estate, _ = lab
    a, b, c, _d = (estate.node(n) for n in NAMES)
    # c imports bytes of its own into a volume no one else follows, so it holds them,
    # offers them in its digest, and then asks b to be their home.
    junk = estate.workdir / "junk"
    junk.mkdir()
    payload = random.Random(9).randbytes(4000)
    (junk / "stuff.bin").write_bytes(payload)
    c.cli("volume", "create", "junk")
    c.cli("import", str(junk), "junk")
    cid = blake3.blake3(payload).digest()  # one chunk: the file is below the chunk size
    assert chunk_path(c.home, cid).exists()
    vid = json.loads(a.cli("volume", "access", "hr", "--json").stdout)["id"]
    c.stop()  # the probe is c's only connection: b can fetch from c only through it
    try:
        seen = probe(c, b, vid, [], fetch_id=cid)
    finally:
        c.start()
    assert seen["answers"]["100"]["err"] == "missing"
    assert not chunk_path(b.home, cid).exists()
    assert not chunk_path(a.home, cid).exists()
