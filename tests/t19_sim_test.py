"""The estate simulation (benchmarks/sim_estate.py) on a small estate: who sends how much.

4 sites of 8 desktops read a 64 MiB snapshot. p2pfs pulls about one copy per reading site
from the origin (single flight at the piece's home), the central server sends one copy
per reader, the site proxy one per site; every reader finishes; the p2pfs control
messages are counted. No wall-clock timing is asserted.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = str(Path(__file__).resolve().parents[1])
if ROOT not in sys.path:  # `.venv/bin/pytest` (not `python -m pytest`): benchmarks/ is here
    sys.path.insert(0, ROOT)

from benchmarks import sim_estate  # noqa: E402
from benchmarks.sim_estate import Estate, Params, piece_ids  # noqa: E402

pytestmark = pytest.mark.unit

SMALL = Params(sites=4, desktops=8, fraction=0.3, size=64 << 20, extent=1 << 20, spread_s=120)


def run(scenario: str, p: Params = SMALL) -> tuple[Estate, dict[str, Any]]:
    estate = Estate(p, scenario, piece_ids(p))
    return estate, estate.run()


def readers_per_site(estate: Estate) -> dict[int, int]:
    out: dict[int, int] = {}
    for node in estate.readers:
        out[node.site.index] = out.get(node.site.index, 0) + 1
    return out


def test_p2pfs_pulls_about_one_copy_per_reading_site() -> None:
    estate, r = run("p2pfs")
    per_site = readers_per_site(estate)
    assert any(n > 1 for n in per_site.values()), "the test needs a site with several readers"
    for site in estate.sites:
        copies = site.origin_bytes / SMALL.size
        if site.index in per_site:
            assert 1.0 <= copies < 1.5, (site.index, copies)
        else:
            assert copies == 0.0
    assert r["unfinished"] == 0
    assert all(n.finished >= n.started >= 0 for n in estate.readers)
    # desktops served each other: what readers took beyond the origin's copies came from peers
    uploaded = sum(n.up.bytes for s in estate.sites for n in s.desktops)
    downloaded = sum(n.down.bytes for s in estate.sites for n in s.desktops)
    from_origin = sum(s.origin_bytes for s in estate.sites)
    assert uploaded > 0
    assert downloaded == from_origin + uploaded
    assert r["digest_msgs_per_node_min"] > 0
    assert r["keepalive_msgs_per_node_min"] > 0
    assert r["discovery_sent_per_node_min"] > 0
    assert r["discovery_heard_per_node_min"] > r["discovery_sent_per_node_min"]


def test_central_server_sends_one_copy_per_reader() -> None:
    estate, r = run("central")
    per_site = readers_per_site(estate)
    for site in estate.sites:
        assert site.origin_bytes == per_site.get(site.index, 0) * SMALL.size
    assert estate.origin.bytes == len(estate.readers) * SMALL.size
    assert r["unfinished"] == 0
    assert r["desktop_up_mib_max"] == 0
    assert r["digest_msgs_per_node_min"] == 0 and r["polls_per_node_min"] > 0


def test_site_proxy_fetches_one_copy_per_site() -> None:
    estate, r = run("proxy")
    per_site = readers_per_site(estate)
    for site in estate.sites:
        expected = SMALL.size if site.index in per_site else 0
        assert site.origin_bytes == expected
        assert site.proxy is not None
        assert site.proxy.up.bytes == per_site.get(site.index, 0) * SMALL.size
    assert r["unfinished"] == 0


def test_simultaneous_readers_share_one_fetch() -> None:
    """Every desktop of one site starts at once: single flight keeps the origin at one copy,
    the proxy too, while the central server sends one per reader."""
    p = Params(sites=1, desktops=16, fraction=1.0, size=32 << 20, extent=1 << 20, spread_s=0)
    for scenario, copies in (("p2pfs", 1.0), ("proxy", 1.0), ("central", 16.0)):
        estate, r = run(scenario, p)
        assert estate.sites[0].origin_bytes / p.size == copies, scenario
        assert r["unfinished"] == 0


def test_homes_come_from_the_peer_table() -> None:
    """Pieces spread over the site's desktops by rendezvous hashing, the same for everyone."""
    p = Params(sites=1, desktops=16, size=64 << 20, extent=256 << 10)
    estate = Estate(p, "p2pfs", piece_ids(p))
    estate.readers = estate.sites[0].desktops[:1]  # so the site gets homes
    homes = sim_estate.homes_of(estate.sites[0], estate.cids)
    assert len(set(map(id, homes))) > p.desktops // 2
    again = sim_estate.homes_of(estate.sites[0], estate.cids)
    assert [id(h) for h in homes] == [id(h) for h in again]


def test_table_and_cli() -> None:
    results = sim_estate.simulate(SMALL)
    text = sim_estate.table(results)
    assert "p2pfs" in text and "central" in text and "proxy" in text
    assert "origin copies per site, mean" in text
    assert sim_estate.rate("100M") == 100e6 / 8
    assert sim_estate.main(["--sites", "2", "--desktops", "4", "--size", "8M", "--json"]) == 0
