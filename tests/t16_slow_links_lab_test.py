"""Slow links, start-up and cut cables, in the lab: bytes that flow are delivered.

Nine hosts: ``a`` publishes, ``d1``..``d8`` are desktops. Links are shaped with the
kernel's ``tbf`` qdisc (``Host.shape``). Time is asserted only as "finished" or
"failed within the deadline", never as a speed: the same checks in virtual time are
in ``t4_slow_link_test.py``.
"""

from __future__ import annotations

import errno
import hashlib
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import file_sha256 as _sha
from harness import require_lab

from p2pfs.lab.estate import (
    EstateLab,
    Node,
    connected_peers,
    estate_lab,
    wait_for,
    wait_until_meshed,
)

pytestmark = [pytest.mark.lab, pytest.mark.fuse]
MIB = 1024 * 1024
DEADLINE_S = 3.0  # [fetch] deadline_s of every node here: far below a chunk's time on a slow link
DESKTOPS = [f"d{i}" for i in range(1, 9)]


def _write(path: Path, size: int, seed: int) -> str:
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // MIB):
            block = rng.randbytes(MIB)
            f.write(block)
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def estate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EstateLab, dict[str, str]]]:
    require_lab()
    work = tmp_path_factory.mktemp("slow")
    tree = work / "tree"
    digests = {
        "big.img": _write(tree / "big.img", 64 * MIB, 1),
        "fan.img": _write(tree / "fan.img", 16 * MIB, 2),
        "cold/only.bin": _write(tree / "cold" / "only.bin", 2 * MIB, 3),
    }
    with estate_lab(work, ["a", *DESKTOPS]) as lab:
        lab.publish(tree)
        for node in lab.nodes:
            node.configure(network={"keepalive_s": 2.0}, deadline_s=DEADLINE_S, hedge_after_s=0.3)
        yield lab, digests


def _has_volume(node: Node, others: set[str]) -> bool:
    return (node.mountpoint / "tools" / "big.img").exists() and bool(connected_peers(node) & others)


def _running(lab: EstateLab) -> None:
    if any(n.proc is None for n in lab.nodes):
        lab.start_all([n for n in lab.nodes if n.proc is None])
    ids = {n.node_id() for n in lab.nodes}
    for node in lab.nodes:
        wait_for(f"{node.name} to show the volume", lambda n=node: _has_volume(n, ids), 30)


def test_every_start_finds_the_peers_and_the_volume_within_seconds(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    """Nine daemons started at once over 100 Mbit/s links, four times: every desktop
    shows the volume within 20 s of its mount, every time."""
    lab, _ = estate
    for node in lab.nodes:
        node.host.shape(100)
    ids = {n.node_id() for n in lab.nodes}
    try:
        for round_ in range(4):
            lab.start_all()
            mounted = time.monotonic()
            for node in lab.nodes:
                others = ids - {node.node_id()}
                try:
                    wait_for(
                        f"{node.name} to show the volume (start {round_ + 1})",
                        lambda n=node, o=others: _has_volume(n, o),
                        timeout=max(1.0, 20 - (time.monotonic() - mounted)),
                    )
                except TimeoutError:
                    tail = node.log_path.read_text()[-3000:]
                    pytest.fail(f"start {round_ + 1}: {node.name} has no volume:\n{tail}")
            if round_ < 3:
                lab.stop_all()
    finally:
        for node in lab.nodes:
            node.host.unshape()


def test_64_mib_over_a_10_mbit_link_reads_exact(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    """About 55 s of transfer, far beyond the 3 s deadline: bytes flow, so no EIO."""
    lab, digests = estate
    _running(lab)
    wait_until_meshed(lab.nodes)
    d1 = lab.node("d1")
    # A fetch begun while d1 was still meeting its peers fails (if it does) within a
    # deadline of silence: let any such end before counting, so only the read counts.
    time.sleep(DEADLINE_S + 0.5)
    failed = d1.status()["fetch"]["failed"]
    logged = len(d1.log_path.read_bytes())
    d1.host.shape(10)
    try:
        assert _sha(d1.mountpoint / "tools" / "big.img") == digests["big.img"]
    finally:
        d1.host.unshape()
    during = d1.log_path.read_bytes()[logged:].decode(errors="replace").splitlines()
    said = [line for line in during if " DEBUG " not in line]
    # Not even readahead gave up.
    assert d1.status()["fetch"]["failed"] == failed, "\n".join(said[-30:])


def test_eight_readers_of_one_file_behind_a_slow_origin_all_finish_exact(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    """The origin at 8 Mbit/s, every desktop at 20: eight readers at once, each chunk
    fetched from the origin by its home (which waits far longer than the deadline)."""
    lab, digests = estate
    _running(lab)
    lab.admin.host.shape(8)
    desktops = [lab.node(n) for n in DESKTOPS]
    for d in desktops:
        d.host.shape(20)
    results: dict[str, str | BaseException] = {}
    served = lab.admin.status()["bytes_served"]

    def read(node: Node) -> None:
        try:
            results[node.name] = _sha(node.mountpoint / "tools" / "fan.img")
        except BaseException as e:
            results[node.name] = e

    try:
        threads = [threading.Thread(target=read, args=(d,)) for d in desktops]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    finally:
        for node in lab.nodes:
            node.host.unshape()
    assert results == {d.name: digests["fan.img"] for d in desktops}
    # The homes share the origin's bytes: far fewer copies than one per desktop (8).
    # Not one either: a home is waited on alone for at most four deadlines (its interim
    # answers cannot be verified), and with 64 chunk fetches queued at an 8 Mbit/s
    # origin some take longer, so their askers ask the origin too (under 3 copies in
    # most runs here, 3.4 in one CI run).
    served = lab.admin.status()["bytes_served"] - served
    assert served < 5 * 16 * MIB, served


def test_a_cut_cable_shows_within_seconds_and_reads_fail_within_the_deadline(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    lab, digests = estate
    _running(lab)
    d8, a = lab.node("d8"), lab.admin
    d8_id = d8.node_id()
    (d8.mountpoint / "tools" / "cold").is_dir()  # the directory's tree, known before the cut
    d8.host.link_down()
    try:
        # Keepalive: 3 periods of 2 s of silence, then the peer is unreachable.
        wait_for("a to see d8 gone", lambda: d8_id not in connected_peers(a), timeout=12)
        wait_for("d8 to see its peers gone", lambda: not connected_peers(d8), timeout=12)
        start = time.monotonic()
        with pytest.raises(OSError) as e:
            _sha(d8.mountpoint / "tools" / "cold" / "only.bin")
        assert e.value.errno == errno.EIO
        assert time.monotonic() - start < DEADLINE_S + 2.0
    finally:
        d8.host.link_up()
    wait_for("d8 to come back", lambda: d8_id in connected_peers(a), timeout=30)
    assert _sha(d8.mountpoint / "tools" / "cold" / "only.bin") == digests["cold/only.bin"]
