"""A hostile stranger and a hostile member cannot exhaust a node (lab namespaces, real TLS).

``a`` publishes, ``b`` is a member that must keep reading, ``m`` attacks: first as a
stranger (TCP connections that never start TLS, reopened as soon as they drop), then
with a member's credentials (frames that claim huge payloads, requests that carry
them, answers nobody asked for). Bounds asserted (docs/protocol.md, "Limits"):
- a stranger holds at most PER_SOURCE_STARTUPS sockets of ours at a time, each for at
  most PRE_AUTH_TIMEOUT, and a member still connects and reads meanwhile;
- the attacked daemon's resident memory grows by less than RSS_GROWTH_BOUND, whatever
  is claimed or sent: a request carries no payload, an unasked answer's payload is
  skipped unread, so frames cost what this node asked for;
- a peer that broke the protocol is refused for a time that doubles each time, and
  counted in status.
"""

from __future__ import annotations

import os
import random
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import require_lab

from p2pfs.lab.estate import EstateLab, Node, estate_lab, wait_for, wait_until_meshed
from p2pfs.net.admission import PER_SOURCE_STARTUPS

pytestmark = [pytest.mark.lab, pytest.mark.fuse]
MIB = 1024 * 1024
RSS_GROWTH_BOUND = 96 * MIB

FLOOD = textwrap.dedent(
    """
    import socket, sys, time
    target, count, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    socks, opened = [], 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        alive = []
        for s in socks:  # keep what is still open; a dropped one is reopened below
            try:
                s.setblocking(False)
                if s.recv(1) == b"":
                    s.close()
                    continue
            except BlockingIOError:
                pass
            except OSError:
                s.close()
                continue
            alive.append(s)
        socks = alive
        while len(socks) < count and time.monotonic() < end:
            try:
                socks.append(socket.create_connection((target, 7420), timeout=2))
                opened += 1
            except OSError:
                break
        time.sleep(0.05)
    print(opened)
    """
)

# With a member's credentials: frames that claim or carry what no request may carry.
MEMBER_ATTACK = textwrap.dedent(
    """
    import socket, ssl, struct, sys, time
    from pathlib import Path
    from p2pfs.net import wire
    from p2pfs.objects.codec import pack
    from p2pfs.trust.estate import Estate
    from p2pfs.home import Home
    home, target, mode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
    est = Estate.load(Home(home))
    def prefix(header, size):
        head = pack(header)
        return struct.pack(">IH", 2 + len(head) + size, len(head)) + head
    def connect():
        raw = socket.create_connection((target, 7420), timeout=10)
        return est.client_context().wrap_socket(raw)
    closed = 0
    conns = []
    try:
        if mode == "claims":  # eight unfinished 60 MiB frames behind a get, 59 MiB sent
            for i in range(8):
                try:
                    s = connect()
                    conns.append(s)
                    s.sendall(prefix({"t": "get", "id": i + 1, "cid": b"x" * 32}, 60 << 20))
                    for _ in range(59):
                        s.sendall(b"\\0" * (1 << 20))
                except (OSError, ssl.SSLError):
                    continue
        elif mode == "payloads":  # sixteen gets that carry 48 MiB each, sent whole
            s = connect()
            conns.append(s)
            for i in range(16):
                s.sendall(wire.encode({"t": "get", "id": i + 1, "cid": b"x" * 32}, b"\\0" * (48 << 20)))
        elif mode == "answers":  # 60 MiB answers nobody asked for
            s = connect()
            conns.append(s)
            for i in range(4):
                s.sendall(wire.encode({"t": "r", "id": 1000 + i}, b"\\0" * (60 << 20)))
    except (OSError, ssl.SSLError):
        pass
    for s in conns:
        s.settimeout(10)
        try:
            while s.recv(65536):
                pass
            closed += 1
        except (OSError, ssl.SSLError):
            closed += 1
    print(closed)
    """
)


def rss(node: Node) -> int:
    assert node.proc is not None
    for line in Path(f"/proc/{node.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def read_file(node: Node, rel: str, want: bytes) -> None:
    assert (node.mountpoint / "tools" / rel).read_bytes() == want


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EstateLab, dict[str, bytes]]]:
    require_lab()
    work = tmp_path_factory.mktemp("hostile")
    rng = random.Random(15)
    files = {f"f{i}.bin": rng.randbytes(2 * MIB) for i in range(6)}
    (work / "tree").mkdir()
    for name, data in files.items():
        (work / "tree" / name).write_bytes(data)
    with estate_lab(work, ["a", "b", "m"]) as estate:
        estate.publish(work / "tree")
        a, b = estate.node("a"), estate.node("b")
        for node in (a, b):
            node.configure(deadline_s=8)
        a.start()
        yield estate, files


def test_a_flood_of_strangers_keeps_no_member_out(lab: tuple[EstateLab, dict[str, bytes]]) -> None:
    estate, files = lab
    a, b, m = estate.node("a"), estate.node("b"), estate.node("m")
    with open(estate.workdir / "flood.out", "wb") as out:
        flood = m.host.popen([sys.executable, "-c", FLOOD, a.address, "500", "25"], stdout=out)
    try:
        time.sleep(3)  # the flood is at its height
        b.start()
        wait_until_meshed([a, b])
        read_file(b, "f0.bin", files["f0.bin"])
        st = a.status()
        assert st["connections_dropped"] > 0
        # (The daemon's own count of sockets it holds for strangers: a bound, not a speed.)
        fds = len(os.listdir(f"/proc/{a.proc.pid}/fd")) if a.proc else 0
        assert fds < 200, fds
    finally:
        flood.wait(timeout=60)
    opened = int((estate.workdir / "flood.out").read_text() or 0)
    assert opened > 2 * PER_SOURCE_STARTUPS  # it kept reopening what was dropped


@pytest.mark.parametrize("mode", ["claims", "payloads", "answers"])
def test_a_member_cannot_park_memory_in_frames(
    lab: tuple[EstateLab, dict[str, bytes]], mode: str
) -> None:
    estate, files = lab
    a, b = estate.node("a"), estate.node("b")
    if b.proc is None:
        b.start()
    wait_until_meshed([a, b])
    attacker = estate.add_node(f"m-{mode}")  # fresh credentials: not yet backed off
    before = rss(a)
    errors = a.status()["protocol_errors"]
    proc = attacker.host.run(
        [sys.executable, "-c", MEMBER_ATTACK, str(attacker.home), a.address, mode],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    assert rss(a) - before < RSS_GROWTH_BOUND, (mode, (rss(a) - before) // MIB)
    if mode != "answers":  # an unasked answer is dropped, not a breach
        assert a.status()["protocol_errors"] > errors
        peer = next(p for p in a.status()["peers"] if p["node_id"] == attacker.node_id())
        assert peer["protocol_errors"] >= 1 and "refused for" in peer["last_error"]
    read_file(b, "f1.bin", files["f1.bin"])


def test_a_peer_that_broke_the_protocol_is_refused_a_while(
    lab: tuple[EstateLab, dict[str, bytes]],
) -> None:
    estate, files = lab
    a, b = estate.node("a"), estate.node("b")
    attacker = estate.add_node("m-again")

    def attack() -> None:
        proc = attacker.host.run(
            [sys.executable, "-c", MEMBER_ATTACK, str(attacker.home), a.address, "payloads"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr

    def entry() -> dict:
        return next(p for p in a.status()["peers"] if p["node_id"] == attacker.node_id())

    attack()
    wait_for("a to count the broken connection", lambda: entry()["protocol_errors"] == 1)
    assert "refused for 5 s" in entry()["last_error"]
    refused = a.status()["connections_refused"]
    attack()  # again at once: refused inside the back-off, or (if late) refused twice as long
    wait_for(
        "a to refuse it, or to double the back-off",
        lambda: (
            a.status()["connections_refused"] > refused
            or "refused for 10 s" in entry()["last_error"]
        ),
    )
    assert entry()["protocol_errors"] in (1, 2)
    read_file(b, "f2.bin", files["f2.bin"])
