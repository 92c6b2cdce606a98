"""The estate in the lab: five hosts, real namespaces, mDNS, TLS, daemons and FUSE mounts.

The hosts share one estate (``a`` is the admin and publisher). The tests run in
order on one estate, as an admin's day would: publish, read, lose the origin, meet
a faulty peer, an outsider, a revoked machine, hostile bytes and forged snapshots.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from harness import SNAPSHOT_PEER, require_lab

from p2pfs.home import Home
from p2pfs.keys import SigningKey
from p2pfs.lab.estate import (
    EstateLab,
    Node,
    connected_peers,
    estate_lab,
    p2pfs,
    wait_for,
    wait_until_meshed,
)
from p2pfs.objects.model import Snapshot, decode_snapshot
from p2pfs.store.cas import Store
from p2pfs.volume.registry import VolumeRegistry

pytestmark = [pytest.mark.lab, pytest.mark.fuse]
MIB = 1024 * 1024
NAMES = ["a", "b", "c", "d", "e"]


def make_tree(root: Path) -> dict[str, str]:
    rng = random.Random(3)
    root.mkdir(parents=True)
    (root / "docs").mkdir()
    for i in range(30):
        (root / "docs" / f"note-{i}.txt").write_bytes(rng.randbytes(rng.randint(0, 200_000)))
    for name, size in (("big-1.img", 40 * MIB), ("big-2.img", 64 * MIB), ("big-3.img", 24 * MIB)):
        with open(root / name, "wb") as f:
            for _ in range(size // MIB):
                f.write(rng.randbytes(MIB))
    (root / "link").symlink_to("docs/note-1.txt")
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def read_all(node: Node, digests: dict[str, str], only: list[str] | None = None) -> None:
    for rel, digest in digests.items():
        if only is not None and rel not in only:
            continue
        data = (node.mountpoint / "tools" / rel).read_bytes()
        assert hashlib.sha256(data).hexdigest() == digest, f"{node.name}: {rel} differs"


def store_is_clean(node: Node) -> None:
    """Every chunk file of the node hashes to its name: nothing corrupt was stored."""
    for path in (node.home / "store" / "chunks").rglob("*"):
        if path.is_file() and len(path.name) == 64:
            assert blake3.blake3(path.read_bytes()).hexdigest() == path.name, path


@pytest.fixture(scope="module")
def estate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EstateLab, dict[str, str]]]:
    require_lab()
    work = tmp_path_factory.mktemp("estate")
    digests = make_tree(work / "tree")
    with estate_lab(work, NAMES) as lab:
        lab.publish(work / "tree")
        for node in lab.nodes:
            node.configure(deadline_s=8, hedge_after_s=0.3)
            with open(node.home / "config.toml", "a") as f:  # (inside each host's own netns)
                f.write('[metrics]\nlisten = "127.0.0.1:9742"\n')
            # d plays a faulty peer later: its fault hooks must be reachable.
            node.start(*(["--debug-faults"] if node.name == "d" else []))
        wait_until_meshed(lab.nodes)
        yield lab, digests


def test_b_reads_everything_then_c_reads_mostly_from_peers(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    lab, digests = estate
    a, b, c = lab.node("a"), lab.node("b"), lab.node("c")
    first = [k for k in digests if k != "big-2.img"]
    read_all(b, digests, first)
    assert os.readlink(b.mountpoint / "tools" / "link") == "docs/note-1.txt"
    sb = b.status()
    one_copy = sb["bytes_from"]["peers"] + sb["bytes_from"]["origin"]  # b started empty
    assert one_copy >= sum((b.mountpoint / "tools" / k).stat().st_size for k in first)
    read_all(c, digests, first)
    sc = c.status()
    fetched = sc["bytes_from"]["peers"] + sc["bytes_from"]["origin"]
    assert fetched >= one_copy * 0.9
    # B and the chunks' homes hold everything now: C takes most from peers...
    assert sc["bytes_from"]["peers"] > fetched / 2
    assert b.status()["bytes_served"] > 0
    # ...and the origin has sent about one copy for both.
    assert a.status()["bytes_served"] <= 1.2 * one_copy
    for n in (a, b, c):
        assert n.status()["corrupt_chunks_rejected"] == 0


SCRAPE = (
    "import urllib.request, sys; "
    "sys.stdout.write(urllib.request.urlopen('http://127.0.0.1:9742/metrics', timeout=10)"
    ".read().decode())"
)


def scrape(node: Node) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The node's metrics, fetched over HTTP inside its host and parsed as Prometheus does."""
    from prometheus_client.parser import text_string_to_metric_families

    proc = node.host.run([sys.executable, "-c", SCRAPE], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(proc.stdout)
        for s in family.samples
    }


def test_metrics_after_a_read_through_peers_match_status(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    lab, _ = estate
    c, a = lab.node("c"), lab.node("a")
    got, st = scrape(c), c.status()  # (nothing reads now: the two agree)
    for source in ("peers", "origin", "local"):
        assert got[("p2pfs_read_bytes_total", (("source", source),))] == st["bytes_from"][source]
    assert got[("p2pfs_read_bytes_total", (("source", "peers"),))] > 0
    connected = sum(1 for p in st["peers"] if p["state"] == "connected")
    assert got[("p2pfs_peers", (("state", "connected"),))] == connected == len(NAMES) - 1
    assert got[("p2pfs_corrupt_chunks_rejected_total", ())] == 0
    assert got[("p2pfs_fetched_chunks_total", ())] == st["fetch"]["chunks"] > 0
    served = scrape(a)
    assert served[("p2pfs_served_bytes_total", ())] == a.status()["bytes_served"] > 0


def test_origin_killed_midway_c_finishes_from_b(estate: tuple[EstateLab, dict[str, str]]) -> None:
    lab, digests = estate
    a, b, c = lab.node("a"), lab.node("b"), lab.node("c")
    read_all(b, digests, ["big-2.img"])
    path = c.mountpoint / "tools" / "big-2.img"
    h = hashlib.sha256()
    half = threading.Event()
    errors: list[BaseException] = []

    def reader() -> None:
        try:
            with open(path, "rb") as f:
                done = 0
                while block := f.read(MIB):
                    h.update(block)
                    done += len(block)
                    if done >= 32 * MIB:
                        half.set()
        except BaseException as e:
            errors.append(e)
        finally:
            half.set()

    t = threading.Thread(target=reader)
    t.start()
    assert half.wait(120)
    a.kill()
    t.join(120)
    assert not errors, errors
    assert h.hexdigest() == digests["big-2.img"]
    a.start()
    wait_for("a back", lambda: a.node_id() in connected_peers(c), timeout=60)


def test_corrupt_peer_is_quarantined_and_nothing_corrupt_is_stored(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    lab, digests = estate
    b, c, d, e = (lab.node(n) for n in "bcde")
    read_all(d, digests, ["big-3.img"])
    flipped = 0
    for path in sorted((d.home / "store" / "chunks").rglob("*")):
        if path.is_file() and path.stat().st_size > 4096:
            data = bytearray(path.read_bytes())
            data[len(data) // 2] ^= 0x55
            path.write_bytes(data)
            flipped += 1
    assert flipped > 10
    d.cli("status")  # the daemon answers
    from p2pfs.node import control

    control.call(d.home / "run" / "control.sock", "inject-fault", handler="net:serve-unverified")
    # Leave E only the faulty D and the origin A, so D is asked first.
    b.stop()
    c.stop()
    try:
        read_all(e, digests, ["big-3.img"])
        st = e.status()
        assert st["corrupt_chunks_rejected"] >= 1
        assert st["quarantined_peers"] == 1
        states = {p["node_id"]: p["state"] for p in st["peers"]}
        assert states[d.node_id()] == "quarantined"
        store_is_clean(e)
    finally:
        b.start()
        c.start()


def test_outsider_and_revoked_host_learn_nothing(
    estate: tuple[EstateLab, dict[str, str]], tmp_path: Path
) -> None:
    lab, _ = estate
    a, e = lab.node("a"), lab.node("e")
    # An outsider: its own CA, its own estate, on the same segment.
    host = lab.lab.add_host("x")
    outsider = Node("x", host, tmp_path / "x" / "home", tmp_path / "x" / "mnt")
    p2pfs(outsider.home, "init")
    p2pfs(outsider.home, "estate", "init")
    outsider.configure()
    with open(outsider.home / "config.toml", "a") as f:
        f.write(f'static_peers = ["{a.address}:7420"]\n')
    outsider.start()
    try:
        wait_for(
            "the outsider to be refused",
            lambda: (
                any(p["state"] == "rejected" for p in outsider.status()["peers"])
                or a.status()["connections_refused"] > 0
            ),
            timeout=30,
        )
        assert os.listdir(outsider.mountpoint) == []
        assert outsider.node_id() not in connected_peers(a)
        assert not [p for p in outsider.status()["peers"] if p["state"] == "connected"]
    finally:
        outsider.stop()
    # A revoked desktop: dropped at once, and can no longer connect.
    a.cli("estate", "revoke", e.node_id())
    for n in lab.nodes:
        if n is not e:
            wait_for(f"{n.name} to drop e", lambda n=n: e.node_id() not in connected_peers(n))
    e.stop()
    e.start()
    wait_for(
        "e to be refused everywhere",
        lambda: (
            a.status()["connections_refused"] > 0
            and not [p for p in e.status()["peers"] if p["state"] == "connected"]
        ),
        timeout=30,
    )


FAKE_PEER = textwrap.dedent(
    """
    import socket, ssl, sys, time
    from pathlib import Path
    from p2pfs.net import wire
    from p2pfs.net import messages
    from p2pfs.trust.estate import Estate
    from p2pfs.home import Home
    home, target, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    est = Estate.load(Home(home))
    raw = socket.create_connection((target, 7420), timeout=10)
    s = est.client_context().wrap_socket(raw)
    if mode == "garbage":
        s.sendall(b"\\xff" * 64)
    elif mode == "oversized":
        s.sendall((2**31).to_bytes(4, "big") + b"\\0" * 100)
    elif mode == "truncated":
        s.sendall(wire.encode({"t": "get", "id": 1, "cid": b"x" * 32})[:-5])
        s.shutdown(socket.SHUT_WR)
    elif mode == "trickle":
        frame = wire.encode({"t": "get", "id": 1, "cid": b"x" * 32})
        try:
            for byte in frame[:-1]:
                s.sendall(bytes([byte]))
                time.sleep(0.3)
        except OSError:
            pass
    s.settimeout(30)
    got = b""
    try:
        while chunk := s.recv(65536):
            got += chunk
    except (OSError, ssl.SSLError):
        pass
    print("closed", len(got))
    """
)


def test_hostile_frames_close_only_their_connection(
    estate: tuple[EstateLab, dict[str, str]], tmp_path: Path
) -> None:
    lab, digests = estate
    b, c = lab.node("b"), lab.node("c")
    # A member's credentials (an enrolled host with no daemon) in a fresh namespace; a
    # fresh member for each mode, since a peer that broke the protocol is refused a while.
    for i, mode in enumerate(("garbage", "oversized", "truncated", "trickle")):
        m = lab.add_node(f"m{i}")
        proc = m.host.run(
            [sys.executable, "-c", FAKE_PEER, str(m.home), b.address, mode],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "closed" in proc.stdout, (mode, proc.stdout, proc.stderr)
    # Raw TCP garbage without TLS.
    proc = m.host.run(
        [
            sys.executable,
            "-c",
            "import socket,sys; s=socket.create_connection((sys.argv[1],7420),timeout=10);"
            "s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'*100); s.settimeout(20);"
            "print('closed', len(s.recv(100)))",
            b.address,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "closed" in proc.stdout, proc.stderr
    # Garbage and an oversized length break the framing: counted. (A truncated or
    # trickled frame is cut off first by the missing hello or a TLS-level end.)
    assert b.status()["protocol_errors"] >= 2
    assert c.node_id() in connected_peers(b)
    read_all(b, digests, ["docs/note-3.txt"])


def test_forged_unendorsed_and_replayed_snapshots_are_refused(
    estate: tuple[EstateLab, dict[str, str]], tmp_path: Path
) -> None:
    lab, _ = estate
    a, b = lab.node("a"), lab.node("b")
    # A publishes a second snapshot; the followers switch to it.
    tree = tmp_path / "tree2"
    tree.mkdir()
    (tree / "new.txt").write_text("second snapshot\n")
    a.cli("import", str(tree), "tools")
    wait_for("b to see snapshot 2", lambda: (b.mountpoint / "tools" / "new.txt").exists())
    assert (b.mountpoint / "tools" / "new.txt").read_text() == "second snapshot\n"
    reg = VolumeRegistry(Home(a.home))
    record = reg.get("tools")
    from p2pfs.store.cas import Store

    with Store(a.home / "store") as store:
        current = decode_snapshot(store.get_object(record.head or b""))
        assert current.parent is not None
        older = store.get_object(current.parent)
    m = lab.add_node("f")  # a member that has broken no protocol (and is not refused)
    refused_before = b.status()["snapshots"]["refused"]

    def offer(name: str, vid: bytes, seq: int, payload: bytes, endorsement: bytes | None) -> None:
        f = tmp_path / "offer.snap"
        f.write_bytes(payload)
        proc = m.host.run(
            [
                sys.executable,
                "-c",
                SNAPSHOT_PEER,
                str(m.home),
                b.address,
                name,
                vid.hex(),
                str(seq),
                blake3.blake3(payload).hexdigest(),
                endorsement.hex() if endorsement else "-",
                str(f),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr

    # 1. A newer snapshot of the real volume, with a signature that does not verify.
    forged = dataclasses.replace(current, seq=current.seq + 1, parent=record.head)
    offer("tools", record.id, forged.seq, forged.encode(), record.endorsement)
    # 2. A properly signed snapshot under a key the estate never endorsed.
    rogue = SigningKey.generate()
    unendorsed = Snapshot.create(
        rogue,
        name="rogue",
        seq=1,
        parent=None,
        root=current.root,
        time_ns=current.time_ns,
        params=current.params,
    )
    offer("rogue", rogue.public_bytes(), 1, unendorsed.encode(), os.urandom(64))
    # 3. A replay: the genuine, endorsed, older snapshot offered as if it were newer.
    offer("tools", record.id, current.seq + 1, older, record.endorsement)
    wait_for("three refusals", lambda: b.status()["snapshots"]["refused"] >= refused_before + 3)
    vols = {v["name"]: v["seq"] for v in b.status()["volumes"]}
    assert vols == {"tools": current.seq}
    # The history, fetched and verified through the parent links.
    log = json.loads(b.cli("log", "tools", "--json").stdout)
    assert [s["seq"] for s in log] == [current.seq, current.seq - 1]
    assert all(s["available"] for s in log)
    assert not (b.mountpoint / "rogue").exists()
    assert (b.mountpoint / "tools" / "new.txt").exists()
    for n in lab.nodes:
        if n.proc is not None and n.name != "d":
            store_is_clean(n)


def test_read_fails_with_eio_when_no_peer_has_the_chunk(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    lab, _ = estate
    d = lab.node("d")
    for n in lab.nodes:
        if n is not d:
            n.stop()
    wait_for("d to lose its peers", lambda: not connected_peers(d))
    # d never read snapshot 2's new file, but it may hold its chunk as the chunk's home
    # (when b read it): drop it, so nobody is left to serve it. EIO within the deadline
    # (on the lookup if d lacks the tree too, else on the read).
    store = Store(Home(d.home).store_dir)
    try:
        store.path_of(blake3.blake3(b"second snapshot\n").digest()).unlink(missing_ok=True)
    finally:
        store.close()
    with pytest.raises(OSError) as e:
        (d.mountpoint / "tools" / "new.txt").read_bytes()
    assert e.value.errno == errno.EIO
    assert d.status()["fetch"]["failed"] >= 1


def test_daemons_stop_cleanly(estate: tuple[EstateLab, dict[str, str]]) -> None:
    lab, _ = estate
    for n in lab.nodes:
        if n.proc is not None:
            n.proc.send_signal(signal.SIGTERM)
            assert n.proc.wait(timeout=30) == 0, n.log_path.read_text()[-3000:]
            n.proc = None
            assert not os.path.ismount(n.mountpoint)
    subprocess.run(["true"], check=True)
