"""Three sites in the lab, two desktops each, uplinks shaped slower than inside a site:
with the publisher gone, the S3 origin sends about one copy of a file per site, not one
per desktop, and every desktop reads it exact.

The origin's copies are what the S3 server's host sent (its link's own counter), not
what the daemons say they received.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import file_sha256 as _sha
from harness import require_lab

from p2pfs.lab.origin_estate import OriginEstate, origin_estate

pytestmark = [pytest.mark.lab, pytest.mark.fuse]
MIB = 1024 * 1024
SIZE = 24 * MIB


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[OriginEstate, str]]:
    require_lab()
    work = tmp_path_factory.mktemp("sites")
    tree = work / "tree"
    tree.mkdir()
    (tree / "image.bin").write_bytes(random.Random(7).randbytes(SIZE))
    digest = _sha(tree / "image.bin")
    with origin_estate(work, tree, {"a": 2, "b": 2, "c": 2}, uplink_mbit=200) as w:
        yield w, digest


def test_the_origin_sends_about_one_copy_per_site(world: tuple[OriginEstate, str]) -> None:
    w, digest = world
    desktops = [n for nodes in w.desktops.values() for n in nodes]
    before = w.origin_sent()
    into = {site: w.lab.uplink_bytes(site)[0] for site in w.lab.sites}
    results: dict[str, str] = {}

    def read(path: Path, name: str) -> None:
        results[name] = _sha(path)

    threads = [
        threading.Thread(target=read, args=(n.mountpoint / "tools" / "image.bin", n.name))
        for n in desktops
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert results == {n.name: digest for n in desktops}
    copies = (w.origin_sent() - before) / SIZE
    per_site = {s: (w.lab.uplink_bytes(s)[0] - into[s]) / SIZE for s in w.lab.sites}
    print(f"origin copies {copies:.2f}; copies into each site {per_site}")
    # Six desktops, three sites: about one copy per site (homes within each site fetch
    # a chunk once; other sites' holders are asked before the origin), never one per desktop.
    assert 0.9 <= copies <= 4.0
    assert all(c <= 2.0 for c in per_site.values())
