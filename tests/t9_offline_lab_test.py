"""Offline and cache, in the lab: pins, a cut cable, a hard quota, scrub and heal, kill -9.

Three hosts: ``a`` publishes, ``b`` is the desktop under test, ``c`` another
desktop that holds what ``b`` may need to heal.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
from harness import require_lab

from p2pfs.chunking.params import ChunkParams
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
MAX_CHUNK = ChunkParams().max_size
QUOTA = 64 * MIB


def make_tree(root: Path) -> dict[str, str]:
    rng = random.Random(9)
    for d, n, size in (("keep", 12, 1_500_000), ("other", 12, 1_500_000), ("late", 12, 1_500_000)):
        (root / d).mkdir(parents=True)
        for i in range(n):
            (root / d / f"f{i:02d}.bin").write_bytes(rng.randbytes(rng.randint(size // 2, size)))
    with open(root / "big.img", "wb") as f:
        for _ in range(200):
            f.write(rng.randbytes(MIB))
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def configure(node: Node, **cache: str) -> None:
    node.configure(network={"keepalive_s": 2.0}, deadline_s=3, hedge_after_s=0.3)
    lines = ["[cache]", *(f'{k} = "{v}"' for k, v in cache.items()), "scrub_interval_h = 0"]
    with open(node.home / "config.toml", "a") as f:
        f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def estate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EstateLab, dict[str, str]]]:
    require_lab()
    work = tmp_path_factory.mktemp("offline")
    digests = make_tree(work / "tree")
    with estate_lab(work, ["a", "b", "c"]) as lab:
        lab.publish(work / "tree")
        for node in lab.nodes:
            configure(node, min_free="0")
            node.start()
        wait_until_meshed(lab.nodes)
        yield lab, digests


def test_pinned_files_read_offline_others_fail_fast(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    lab, digests = estate
    a, b = lab.node("a"), lab.node("b")
    proc = b.cli("pin", str(b.mountpoint / "tools" / "keep"), "--json")
    (job,) = json.loads(proc.stdout)
    assert job["state"] == "complete" and job["chunks_total"] > 0
    pins = json.loads(b.cli("pins", "--json").stdout)
    assert [p["name"] for p in pins["pins"]] == ["tools:/keep"]
    assert pins["offline_ready"] is True
    st = b.status()
    assert st["offline_ready"] is True and st["cache"]["pinned_bytes"] > 0
    b.host.link_down()
    try:
        # A cut cable leaves TCP silent: keepalives notice, and peers shows it.
        wait_for("b to see its peers gone", lambda: not connected_peers(b), timeout=30)
        states = {p["state"] for p in b.status()["peers"]}
        assert "connected" not in states, states
        for rel, digest in digests.items():
            if rel.startswith("keep/"):
                assert sha(b.mountpoint / "tools" / rel) == digest
        with pytest.raises(OSError) as e:
            (b.mountpoint / "tools" / "other" / "f03.bin").read_bytes()
        assert e.value.errno == errno.EIO
    finally:
        b.host.link_up()
    wait_for("b back with a", lambda: a.node_id() in connected_peers(b), timeout=60)
    path = b.mountpoint / "tools" / "other" / "f03.bin"
    wait_for("other/f03.bin readable again", lambda: sha(path) == digests["other/f03.bin"])


def test_pin_larger_than_quota_is_refused_up_front(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    lab, _ = estate
    b = lab.node("b")
    b.stop()
    configure(b, max_bytes="64M", min_free="0")
    b.start()
    before = b.status()["cache"]["bytes"]
    proc = b.cli("pin", "tools:/", check=False)
    assert proc.returncode == 1, proc.stderr
    assert "needs" in proc.stderr and "quota" in proc.stderr and "Traceback" not in proc.stderr
    # Only metadata (trees, file blobs) was fetched to size the pin; no file data.
    assert b.status()["cache"]["bytes"] - before < MIB
    assert [p["name"] for p in json.loads(b.cli("pins", "--json").stdout)["pins"]] == [
        "tools:/keep"
    ]


def test_quota_holds_while_reading_a_volume_four_times_larger(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    lab, digests = estate
    b = lab.node("b")
    assert b.status()["cache"]["quota"] == QUOTA
    samples: list[int] = []  # the store's own count: exact at every instant
    walked: list[int] = []  # the chunk files on disk, summed by a walk
    stop = threading.Event()

    def sample() -> None:
        chunks = b.home / "store" / "chunks"
        while not stop.is_set():
            total = 0
            for dirpath, _, files in os.walk(chunks):
                for f in files:
                    with contextlib.suppress(FileNotFoundError):
                        total += os.stat(os.path.join(dirpath, f)).st_size
            walked.append(total)
            samples.append(b.status()["cache"]["bytes"])
            stop.wait(0.1)

    t = threading.Thread(target=sample)
    t.start()
    try:
        for rel, digest in digests.items():
            if not rel.startswith("late/"):  # kept for the kill -9 test
                assert sha(b.mountpoint / "tools" / rel) == digest, rel
    finally:
        stop.set()
        t.join()
    assert len(samples) > 10
    assert max(samples) <= QUOTA, max(samples) / MIB
    # A walk is no snapshot: it may count a chunk just before its eviction and the chunk
    # that replaced it just after. So the disk may seem over by at most one chunk.
    assert max(walked) <= QUOTA + MAX_CHUNK, max(walked) / MIB
    st = b.status()
    assert st["cache"]["evictions"] > 0
    assert st["offline_ready"] is True  # the pinned files were never evicted


def test_scrub_finds_every_flipped_chunk_and_heals_it_from_a_peer(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    lab, digests = estate
    b, c = lab.node("b"), lab.node("c")
    for rel in digests:
        if rel.startswith("keep/"):
            sha(c.mountpoint / "tools" / rel)  # c holds them too
    pinned = json.loads(b.cli("pins", "--json").stdout)["pins"][0]
    assert pinned["complete"]
    files = sorted(p for p in (b.home / "store" / "chunks").rglob("*") if p.is_file())
    victims = [p for p in files if p.stat().st_size > 100_000][:5]
    assert len(victims) == 5
    for p in victims:
        data = bytearray(p.read_bytes())
        data[len(data) // 3] ^= 0x10
        p.write_bytes(data)
    r = json.loads(b.cli("scrub", "--json").stdout)
    assert r["corrupt_found"] == 5 and r["healed"] == 5, r
    assert sorted(r["bad"]) == sorted(p.name for p in victims)
    st = b.status()
    assert st["scrub"]["corrupt_found"] >= 5 and st["scrub"]["healed"] >= 5
    assert st["scrub"]["last_run"] is not None
    for p in victims:  # healed: each file hashes to its name again
        assert blake3.blake3(p.read_bytes()).hexdigest() == p.name
    for rel, digest in digests.items():
        if rel.startswith("keep/"):
            assert sha(b.mountpoint / "tools" / rel) == digest
    assert json.loads(b.cli("pins", "--json").stdout)["offline_ready"] is True


def test_kill9_during_a_pin_then_fsck_is_clean_and_the_pin_resumes(
    estate: tuple[EstateLab, dict[str, str]],
) -> None:
    lab, _ = estate
    b = lab.node("b")
    b.host.shape(4)  # slow enough that the pin is caught half way
    try:
        pin = subprocess.Popen(
            [sys.executable, "-m", "p2pfs", "--home", str(b.home), "pin", "tools:/late"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )

        def halfway() -> bool:
            pins = json.loads(b.cli("pins", "--json").stdout)["pins"]
            job = next((p["job"] for p in pins if p["name"] == "tools:/late"), None)
            if job is None:
                return False
            fetched = job["chunks_done"] - (job["chunks_total"] - job["missing_at_start"])
            return fetched > 0 and job["chunks_done"] < job["chunks_total"]

        wait_for("the pin to be under way", halfway, timeout=60)
        assert b.proc is not None
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait()
        _, err = pin.communicate(timeout=60)
        assert pin.returncode != 0, err
        b.stop()
    finally:
        b.host.unshape()
    fsck = b.cli("fsck", check=False)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    b.start()
    wait_for("b back", lambda: len(connected_peers(b)) == 2, timeout=60)
    again = json.loads(b.cli("pin", "tools:/late", "--json").stdout)
    assert again[0]["state"] == "complete"
    assert 0 < again[0]["missing_at_start"] < again[0]["chunks_total"]  # resumed, not restarted
    pins = {p["name"]: p for p in json.loads(b.cli("pins", "--json").stdout)["pins"]}
    assert pins["tools:/late"]["complete"] and pins["tools:/keep"]["complete"]
