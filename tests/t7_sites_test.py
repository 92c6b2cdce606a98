"""Sites: `[network] site` in config.toml, a hello's `site`, and chunk homes within a site.

DESIGN's fetch order beyond one LAN: the local store, LAN peers of the same site (chunk
homes within the site), peers of other sites, object-storage/HTTP origins, the
publisher. A site's desktops fetch a chunk from outside once: the site's home for it
fetches, everyone else gets it from the home. The peer table is tested with fake
connections (only whether a connection is open matters to it); the last test runs two
daemons over real loopback sockets.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from harness import run_cli

from p2pfs.config import Config, load
from p2pfs.errors import NotRunning, UsageError
from p2pfs.home import Home
from p2pfs.ids import content_id
from p2pfs.net import messages, wire
from p2pfs.net.digest import Bloom
from p2pfs.net.peers import Peer, PeerTable
from p2pfs.node import control
from p2pfs.trust import enrolment

pytestmark = pytest.mark.unit

ME = b"\x00" * 16
CIDS = [content_id(b"chunk %d" % i) for i in range(600)]


class _OpenConnection:
    """All the peer table asks of a connection: whether it is closed."""

    def __init__(self) -> None:
        self.closed = trio.Event()


def _hello(node_id: bytes, site: str | None) -> messages.Hello:
    return messages.Hello(node_id, b"E" * 16, 1, (), 0, site=site)


def add_peer(
    table: PeerTable,
    n: int,
    site: str | None,
    *,
    holds: list[bytes] | None = None,
    inflight: int = 0,
    latency_s: float = 0.05,
    greeted: bool = True,
) -> Peer:
    """A connected peer of ``site`` (its hello says so), with a digest of ``holds``."""
    node_id = bytes([n]) * 16
    peer = table.get(node_id)
    peer.conns.append(_OpenConnection())  # type: ignore[arg-type]
    peer.state = "connected"
    peer.hello = _hello(node_id, site) if greeted else None
    if holds is not None:
        peer.digest = Bloom.of(holds, max(1, len(holds)))
    peer.inflight, peer.latency_s = inflight, latency_s
    return peer


def _id(home: Peer | None) -> bytes:
    return ME if home is None else home.node_id  # None: this node is the home


def estate(our_site: str | None) -> tuple[PeerTable, list[Peer], list[Peer]]:
    """Our table, 4 connected peers of our site and 4 of another."""
    table = PeerTable(site=our_site)
    ours = [add_peer(table, i, our_site) for i in range(1, 5)]
    other = "paris" if our_site != "paris" else "rome"
    theirs = [add_peer(table, i, other) for i in range(11, 15)]
    return table, ours, theirs


# -- chunk homes ---------------------------------------------------------------------


def test_homes_are_within_our_site_and_spread_over_its_members() -> None:
    table, ours, theirs = estate("berlin")
    homes = Counter(_id(table.home_of(cid, ME, set())) for cid in CIDS)
    assert not set(homes) & {p.node_id for p in theirs}, "another site's node is our home"
    # Five members (four peers and this node): each is home to about a fifth.
    assert set(homes) == {ME, *(p.node_id for p in ours)}
    assert all(60 < n < 180 for n in homes.values()), homes


def test_each_site_picks_its_own_home_and_every_member_the_same() -> None:
    """Every node of a site, seeing the same members, names the same home: so the site
    fetches a chunk from outside once, through that home."""
    members = {n: "berlin" for n in range(1, 5)} | {n: "paris" for n in range(11, 15)}

    def home_seen_by(me: int, cid: bytes) -> bytes:
        table = PeerTable(site=members[me])
        for n, site in members.items():
            if n != me:
                add_peer(table, n, site)
        home = table.home_of(cid, bytes([me]) * 16, set())
        return bytes([me]) * 16 if home is None else home.node_id

    for cid in CIDS[:50]:
        for site in ("berlin", "paris"):
            seen = {home_seen_by(n, cid) for n, s in members.items() if s == site}
            assert len(seen) == 1
            assert members[seen.pop()[0]] == site


def test_the_publisher_and_another_sites_peers_are_never_the_home() -> None:
    table, ours, _theirs = estate("berlin")
    publisher = ours[0].node_id
    for cid in CIDS[:200]:
        home = table.home_of(cid, ME, {publisher})
        assert home is None or (home in ours and home.node_id != publisher)


def test_with_no_sites_every_connected_follower_is_a_home_as_before() -> None:
    table = PeerTable()
    peers = [add_peer(table, i, None) for i in range(1, 9)]
    homes = Counter(_id(table.home_of(cid, ME, set())) for cid in CIDS)
    assert set(homes) == {ME, *(p.node_id for p in peers)}
    assert all(40 < n < 120 for n in homes.values()), homes
    # A peer that has not greeted yet (or is of a release before sites) has no site.
    ungreeted = add_peer(table, 20, None, greeted=False)
    assert ungreeted.site is None and table.same_site(ungreeted)
    # Without a site of ours, peers that have one are of other sites.
    sited = add_peer(table, 21, "berlin")
    assert not table.same_site(sited)
    assert all(table.home_of(cid, ME, set()) is not sited for cid in CIDS)


def test_a_node_of_a_site_treats_peers_without_one_as_another_site() -> None:
    table = PeerTable(site="berlin")
    old = add_peer(table, 1, None)  # a release before sites
    assert all(table.home_of(cid, ME, set()) is None for cid in CIDS[:100])
    near, far = table.ranked(CIDS[0], others=3, origins=set(), home=None)
    assert near == [] and far == [(old, False)]


# -- whom to ask, in order -------------------------------------------------------------


def test_ranked_is_near_then_far_in_designs_order() -> None:
    cid = CIDS[0]
    table = PeerTable(site="berlin")
    busy_here = add_peer(table, 1, "berlin", holds=[cid], inflight=3)
    idle_here = add_peer(table, 2, "berlin", holds=[cid])
    home = add_peer(table, 3, "berlin", holds=[])
    empty_here = add_peer(table, 4, "berlin", holds=[])
    no_digest_here = add_peer(table, 5, "berlin")
    there = add_peer(table, 11, "paris", holds=[cid])
    empty_there = add_peer(table, 12, "paris", holds=[])
    no_digest_there = add_peer(table, 13, "paris")
    publisher = add_peer(table, 20, None)

    near, far = table.ranked(cid, others=8, origins={publisher.node_id}, home=home)
    # Our site's holders (least loaded first), our home (which fetches), other sites' holders.
    assert near == [(idle_here, False), (busy_here, False), (home, True), (there, False)]
    # The publishers, then the rest: our site first (no digest yet before a stale one).
    assert far == [
        (publisher, False),
        (no_digest_here, False),
        (empty_here, False),
        (no_digest_there, False),
        (empty_there, False),
    ]
    # ``others`` bounds the rest; ranked_for is near + far, for the fetcher of today.
    near, far = table.ranked(cid, others=1, origins={publisher.node_id}, home=home)
    assert far == [(publisher, False), (no_digest_here, False)]
    assert table.ranked_for(cid, others=1, origins={publisher.node_id}, home=home) == near + far


def test_a_home_that_holds_the_chunk_is_asked_once_without_fetch() -> None:
    cid = CIDS[1]
    table = PeerTable(site="berlin")
    home = add_peer(table, 1, "berlin", holds=[cid])
    near, far = table.ranked(cid, others=3, origins=set(), home=home)
    assert near == [(home, False)] and far == []


def test_a_home_fetching_for_a_peer_asks_other_sites_before_the_publisher() -> None:
    """(``home=None``: a home never hands a chunk on to another home.)"""
    cid = CIDS[2]
    table = PeerTable(site="berlin")
    there = add_peer(table, 11, "paris", holds=[cid])
    publisher = add_peer(table, 20, "hq")
    near, far = table.ranked(cid, others=3, origins={publisher.node_id}, home=None)
    assert near == [(there, False)] and far == [(publisher, False)]


def test_ranked_for_is_todays_order_in_an_estate_without_sites() -> None:
    cid = CIDS[3]
    table = PeerTable()
    holder = add_peer(table, 1, None, holds=[cid])
    home = add_peer(table, 2, None, holds=[])
    other = add_peer(table, 3, None)
    publisher = add_peer(table, 9, None)
    order = table.ranked_for(cid, others=3, origins={publisher.node_id}, home=home)
    assert order == [(holder, False), (home, True), (publisher, False), (other, False)]


# -- the hello's site ------------------------------------------------------------------


def test_hello_carries_the_site_and_refuses_a_bad_one() -> None:
    hello = _hello(os.urandom(16), "berlin office-2")
    wired = hello.to_wire()
    assert wired["site"] == "berlin office-2"
    assert messages.Hello.from_wire(wired) == hello
    # Absent when there is none; a hello without it (an earlier release's): no site.
    bare = _hello(os.urandom(16), None)
    assert "site" not in bare.to_wire()
    assert messages.Hello.from_wire(bare.to_wire()).site is None
    # The peer table takes a peer's site from its hello, and status shows it.
    peer = Peer(hello.node_id, hello=hello)
    assert peer.site == "berlin office-2" and peer.statistics().site == "berlin office-2"
    for bad in (None, 7, b"berlin", ["berlin"], "", "x" * 65, "berlin\n", " berlin", "b/c"):
        wired = hello.to_wire() | {"site": bad}
        with pytest.raises(wire.ProtocolError, match="site"):
            messages.Hello.from_wire(wired)


# -- config.toml -------------------------------------------------------------------------


def _load(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return load(path)


def test_network_site_and_the_old_node_site_are_read(tmp_path: Path) -> None:
    assert _load(tmp_path, "").site is None
    assert _load(tmp_path, '[network]\nsite = "berlin"\n').site == "berlin"
    assert _load(tmp_path, '[node]\nsite = "berlin"\n').site == "berlin"  # the last release's
    both = '[node]\nsite = "berlin"\n[network]\nsite = "berlin"\n'
    assert _load(tmp_path, both).site == "berlin"
    with pytest.raises(UsageError, match=r"\[network\] site = 'paris' and \[node\] site"):
        _load(tmp_path, '[node]\nsite = "berlin"\n[network]\nsite = "paris"\n')
    # (Bad labels: tests/t0_config_test.py.)


# -- two daemons over loopback -------------------------------------------------------------

WAIT = 60.0


@contextlib.contextmanager
def _daemon(home: Path) -> Iterator[subprocess.Popen[bytes]]:
    """``p2pfs daemon`` without a mount, until its control socket answers."""
    (home / "log").mkdir(exist_ok=True)
    log = home / "log" / "daemon.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pfs", "--home", str(home), "daemon"], stdout=logf, stderr=logf
        )
    try:
        _until("the daemon answers", lambda: _status(home) is not None, proc, log)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _status(home: Path) -> dict[str, Any] | None:
    with contextlib.suppress(NotRunning):
        answer: dict[str, Any] = control.call(Home(home).control_socket, "status", timeout=5)
        return answer
    return None


def _until(what: str, ok: Any, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + WAIT
    while not ok():
        assert proc.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.1)


def test_a_peers_site_arrives_in_peers_and_status(tmp_path: Path) -> None:
    a, b = Home(tmp_path / "a"), Home(tmp_path / "b")
    a.init()
    b.init()
    enrolment.init_estate(a)
    enrolment.join(b, enrolment.approve(a, enrolment.request_join(b)))
    net = 'listen = "127.0.0.1"\ndiscovery = false\n'
    (a.root / "config.toml").write_text(f'[network]\nsite = "berlin"\nport = 0\n{net}')
    with _daemon(a.root) as pa:
        status = _status(a.root)
        assert status is not None
        # b by the last release's spelling; it dials a.
        (b.root / "config.toml").write_text(
            f'[node]\nsite = "paris"\n[network]\nport = 0\n{net}'
            f'static_peers = ["127.0.0.1:{status["port"]}"]\n'
        )
        with _daemon(b.root) as pb:

            def connected(home: Home) -> list[dict[str, Any]]:
                answer = control.call(home.control_socket, "peers", timeout=5)
                return [p for p in answer["peers"] if p["state"] == "connected"]

            _until("b to greet a", lambda: connected(b), pb, b.root / "log" / "daemon.log")
            _until("a to greet b", lambda: connected(a), pa, a.root / "log" / "daemon.log")
            assert [p["site"] for p in connected(a)] == ["paris"]
            listed = json.loads(run_cli(b.root, "peers", "--json", check=True).stdout)
            assert [p["site"] for p in listed] == ["berlin"]
            b_status = _status(b.root)
            assert b_status is not None
            assert [p["site"] for p in b_status["peers"]] == ["berlin"]
            assert "site berlin" in run_cli(b.root, "peers", check=True).stdout
