"""Live volumes in the lab: the publisher writes through its mount, followers switch.

Three hosts of one estate: ``a`` publishes ``tools`` and mounts it writable; ``b`` and
``c`` follow it through their own (read-only) mounts. The tests run in order on one
estate: followers refuse writes, a commit on ``a`` reaches both followers, a file open
across a switch keeps its old version, a replayed older snapshot is refused, and an
automatic commit (``[publish] settle_s``) needs no ``p2pfs commit`` at all.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import blake3
import pytest
from harness import SNAPSHOT_PEER, require_lab
from harness import file_sha256 as sha
from writable import diff_walks, walk

from p2pfs.home import Home
from p2pfs.lab.estate import EstateLab, Node, estate_lab, wait_for, wait_until_meshed
from p2pfs.objects.model import decode_snapshot
from p2pfs.store.cas import Store
from p2pfs.volume.registry import VolumeRegistry

pytestmark = [pytest.mark.lab, pytest.mark.fuse]
MIB = 1024 * 1024
VOLUME = "tools"
SWITCH_TIMEOUT = 30.0
SKIP = frozenset({".snapshots"})


@dataclasses.dataclass
class Live:
    lab: EstateLab
    source: Path  # the tree first imported
    mirror: Path  # a native copy that every change made on a's mount is also made to


def make_tree(root: Path) -> None:
    rng = random.Random(11)
    (root / "docs").mkdir(parents=True)
    (root / "bin").mkdir()
    for i in range(8):
        (root / "docs" / f"note-{i}.txt").write_bytes(rng.randbytes(rng.randint(0, 100_000)))
    (root / "docs" / "old.txt").write_text("to be deleted\n")
    (root / "config.ini").write_text("[tool]\nversion = 1\n")
    (root / "bin" / "tool").write_bytes(b"#!/bin/sh\necho tool 1\n")
    os.chmod(root / "bin" / "tool", 0o755)
    (root / "big.bin").write_bytes(rng.randbytes(6 * MIB))
    (root / "link").symlink_to("docs/note-1.txt")


def configure(node: Node, settle_s: float, max_delay_s: float = 10.0) -> None:
    node.configure(deadline_s=8, hedge_after_s=0.3)
    with open(node.home / "config.toml", "a") as f:
        f.write(f"[publish]\nsettle_s = {settle_s}\nmax_delay_s = {max_delay_s}\n")


def tools(node: Node) -> Path:
    return node.mountpoint / VOLUME


def seq_of(node: Node) -> int:
    return int(next(v["seq"] for v in node.status()["volumes"] if v["name"] == VOLUME))


def commit(a: Node) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(a.cli("commit", VOLUME, "--json").stdout)
    assert report["volume"] == VOLUME, report
    return report


def wait_for_tree(node: Node, expected: dict[str, Any], root: Path | None = None) -> None:
    root = root or tools(node)
    seen: list[dict[str, Any]] = []

    def same() -> bool:
        seen[:] = [walk(root, skip=SKIP)]
        return seen[0] == expected

    try:
        wait_for(f"{node.name} to show the new tree", same, SWITCH_TIMEOUT)
    except TimeoutError:
        diff = diff_walks(seen[0], expected) if seen else "(never listed)"
        raise AssertionError(
            f"{node.name}: {root} differs from the expected tree:\n{diff}"
        ) from None


def open_fd(path: Path, flags: int) -> None:
    os.close(os.open(path, flags, 0o644))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    require_lab()
    work = tmp_path_factory.mktemp("live")
    os.chmod(work, 0o755)
    source = work / "tree"
    make_tree(source)
    mirror = work / "mirror"
    shutil.copytree(source, mirror, symlinks=True)
    with estate_lab(work, ["a", "b", "c"]) as lab:
        lab.publish(source, VOLUME)
        for node in lab.nodes:
            # No automatic commits until the last test: every snapshot is made on purpose.
            configure(node, settle_s=0)
            node.start()
        wait_until_meshed(lab.nodes)
        yield Live(lab, source, mirror)


def test_followers_mount_read_only_and_refuse_writes(live: Live) -> None:
    a, b, c = (live.lab.node(n) for n in "abc")
    expected = walk(live.source, skip=SKIP)
    for node in (a, b, c):
        wait_for_tree(node, expected)
    writable = {v["name"]: v.get("writable") for v in a.status()["volumes"]}
    assert writable == {VOLUME: True}
    root = tools(b)
    attempts: list[tuple[str, Callable[[], object]]] = [
        ("create", lambda: open_fd(root / "new-on-b.txt", os.O_WRONLY | os.O_CREAT)),
        ("open for writing", lambda: open_fd(root / "config.ini", os.O_RDWR)),
        ("open for append", lambda: open_fd(root / "config.ini", os.O_WRONLY | os.O_APPEND)),
        ("truncate", lambda: os.truncate(root / "config.ini", 0)),
        ("mkdir", lambda: os.mkdir(root / "newdir")),
        ("unlink", lambda: os.unlink(root / "docs" / "old.txt")),
        ("rmdir", lambda: os.rmdir(root / "bin")),
        ("rename", lambda: os.rename(root / "config.ini", root / "config.old")),
        ("symlink", lambda: os.symlink("config.ini", root / "link2")),
        ("hard link", lambda: os.link(root / "config.ini", root / "config.hard")),
        ("chmod", lambda: os.chmod(root / "bin" / "tool", 0o700)),
        ("utime", lambda: os.utime(root / "config.ini", (0, 0))),
    ]
    for what, attempt in attempts:
        with pytest.raises(OSError) as e:
            attempt()
        assert e.value.errno == errno.EROFS, f"{what} on b: {e.value!r}"
    # Nothing changed, on b or anywhere.
    assert walk(root, skip=SKIP) == expected
    # Only the publisher commits; a refusal is one line, not a traceback (docs/cli.md: 1 is
    # a user error, 3 something named that does not exist).
    for node, volume, code in ((b, VOLUME, 1), (a, "no-such-volume", 3)):
        proc = node.cli("commit", volume, check=False)
        assert proc.returncode == code, (node.name, volume, proc.returncode, proc.stderr)
        assert proc.stderr.strip() and "Traceback" not in proc.stderr, proc.stderr
    assert (root / "config.ini").read_text() == "[tool]\nversion = 1\n"


def change_tree(root: Path) -> None:
    """The changes of the first commit, made the same way on a's mount and the mirror."""
    rng = random.Random(12)
    (root / "new.txt").write_text("a new file\n")
    with open(root / "bin" / "tool2", "wb") as f:
        f.write(b"#!/bin/sh\necho tool 2\n")
        os.fchmod(f.fileno(), 0o755)
    # An editor's save: write a temporary file, flush it, rename it over the old one.
    tmp = root / ".config.ini.tmp"
    with open(tmp, "w") as f:
        f.write("[tool]\nversion = 2\n")
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, root / "config.ini")
    os.unlink(root / "docs" / "old.txt")
    (root / "newdir" / "sub").mkdir(parents=True)
    (root / "newdir" / "sub" / "data.bin").write_bytes(rng.randbytes(700_000))
    (root / "newdir" / "empty").mkdir()
    with open(root / "docs" / "note-2.txt", "ab") as f:
        f.write(b"appended\n")
    os.truncate(root / "docs" / "note-3.txt", 1000)
    os.chmod(root / "docs" / "note-4.txt", 0o600)
    (root / "empty.txt").touch()
    (root / "newlink").symlink_to("newdir/sub/data.bin")
    os.rename(root / "bin", root / "sbin")  # a whole directory moves


def test_a_commit_reaches_every_follower(live: Live) -> None:
    a, b, c = (live.lab.node(n) for n in "abc")
    before = seq_of(a)
    original = walk(live.source, skip=SKIP)
    change_tree(tools(a))
    change_tree(live.mirror)
    expected = walk(live.mirror, skip=SKIP)
    assert walk(tools(a), skip=SKIP) == expected, diff_walks(walk(tools(a), skip=SKIP), expected)
    report = commit(a)
    assert report["changed"] is True and report["seq"] > before, report
    seq = report["seq"]
    assert seq_of(a) == seq
    # Nothing more to commit: a second commit changes nothing.
    again = commit(a)
    assert again["changed"] is False and again["seq"] == seq, again
    for node in (b, c):
        wait_for(f"{node.name} at seq {seq}", lambda node=node: seq_of(node) == seq)
        wait_for_tree(node, expected)
        assert (tools(node) / "config.ini").read_text() == "[tool]\nversion = 2\n"
        assert not (tools(node) / "docs" / "old.txt").exists()
        log = json.loads(node.cli("log", VOLUME, "--json").stdout)
        assert log[0]["seq"] == seq and log[0]["available"], log
        assert [s["seq"] for s in log] == sorted((s["seq"] for s in log), reverse=True)
        # The version before the commit is still there, read-only, by its number.
        old = tools(node) / ".snapshots" / str(before)
        assert walk(old, skip=SKIP) == original, diff_walks(walk(old, skip=SKIP), original)
        assert (old / "docs" / "old.txt").read_text() == "to be deleted\n"


def test_a_file_open_across_the_switch_keeps_its_old_version(live: Live) -> None:
    a, b, c = (live.lab.node(n) for n in "abc")
    rng = random.Random(13)
    old_data = rng.randbytes(24 * MIB)
    new_data = rng.randbytes(24 * MIB)
    old_digest = hashlib.sha256(old_data).hexdigest()
    new_digest = hashlib.sha256(new_data).hexdigest()
    path_a = tools(a) / "stream.bin"
    path_a.write_bytes(old_data)
    seq1 = commit(a)["seq"]
    wait_for("b at the first version", lambda: seq_of(b) == seq1)
    path_b = tools(b) / "stream.bin"
    wait_for("stream.bin on b", lambda: path_b.stat().st_size == len(old_data))
    # b has read only the first MiB of the old version when a replaces the file.
    with open(path_b, "rb", buffering=0) as f:
        h = hashlib.sha256(f.read(MIB))
        with open(path_a, "r+b") as w:  # overwritten in place, not replaced by a rename
            w.write(new_data)
        seq2 = commit(a)["seq"]
        assert seq2 > seq1
        for node in (b, c):
            p = tools(node) / "stream.bin"
            wait_for(f"{node.name} to switch", lambda node=node: seq_of(node) == seq2)
            wait_for(
                f"a fresh open on {node.name} to read the new version",
                lambda p=p: sha(p) == new_digest,
            )
        # ... and the file opened before still reads the old one, to its end.
        while block := f.read(MIB):
            h.update(block)
    assert h.hexdigest() == old_digest, "the file opened before the switch changed under its reader"
    assert sha(path_b) == new_digest
    assert sha(tools(b) / ".snapshots" / str(seq1) / "stream.bin") == old_digest
    with open(live.mirror / "stream.bin", "wb") as m:
        m.write(new_data)


def test_listings_and_reads_during_a_switch_show_the_old_or_the_new_version(
    live: Live,
) -> None:
    a, b = live.lab.node("a"), live.lab.node("b")
    rng = random.Random(14)
    old_names = {f"old-{i:04d}.txt" for i in range(400)}
    new_names = {f"new-{i:04d}.txt" for i in range(400)}
    old_payload, new_payload = rng.randbytes(3 * MIB), rng.randbytes(3 * MIB)
    versions = {
        hashlib.sha256(old_payload).hexdigest(): 1,
        hashlib.sha256(new_payload).hexdigest(): 2,
    }
    for root in (tools(a), live.mirror):
        (root / "gen").mkdir()
        for name in old_names:
            (root / "gen" / name).write_text("v1\n")
        (root / "payload.bin").write_bytes(old_payload)
    seq1 = commit(a)["seq"]
    gen, payload = tools(b) / "gen", tools(b) / "payload.bin"
    wait_for(
        "b at the old directory",
        lambda: (
            seq_of(b) == seq1 and set(os.listdir(gen)) == old_names and sha(payload) in versions
        ),
    )
    listings: list[frozenset[str]] = []
    reads: list[str] = []
    errors: list[OSError] = []
    stop = threading.Event()

    def watch() -> None:
        # Each listing takes several readdir calls, each read several chunks: a switch
        # must not fall between them.
        while not stop.is_set():
            try:
                listings.append(frozenset(os.listdir(gen)))
                reads.append(sha(payload))
            except OSError as e:
                errors.append(e)
            time.sleep(0.002)

    t = threading.Thread(target=watch)
    t.start()
    try:
        for root in (tools(a), live.mirror):
            for name in old_names:
                os.unlink(root / "gen" / name)
            for name in new_names:
                (root / "gen" / name).write_text("v2\n")
            with open(root / "payload.bin", "r+b") as f:
                f.write(new_payload)
        seq2 = commit(a)["seq"]
        wait_for(
            "b at the new directory",
            lambda: (
                seq_of(b) == seq2
                and bool(reads)
                and listings[len(reads) - 1] == new_names
                and versions.get(reads[-1]) == 2
            ),
        )
    finally:
        stop.set()
        t.join()
    assert not errors, errors[:3]
    mixed = [names for names in listings if names not in (old_names, new_names)]
    assert not mixed, (
        f"{len(mixed)} of {len(listings)} listings mixed both versions: e.g. "
        f"{len(mixed[0] & old_names)} old and {len(mixed[0] & new_names)} new names"
    )
    assert listings[0] == old_names and listings[-1] == new_names
    torn = [d for d in reads if d not in versions]
    assert not torn, f"{len(torn)} of {len(reads)} reads of payload.bin were neither version"
    assert versions[reads[0]] == 1 and versions[reads[-1]] == 2
    assert {(gen / n).read_text() for n in sorted(new_names)[:20]} == {"v2\n"}


def test_a_follower_down_during_commits_catches_up(live: Live) -> None:
    a, b, c = (live.lab.node(n) for n in "abc")
    b.stop()
    for step in (1, 2):
        for root in (tools(a), live.mirror):
            (root / "catchup").mkdir(exist_ok=True)
            (root / "catchup" / f"step-{step}.txt").write_text(f"step {step}\n")
            (root / "config.ini").write_text(f"[tool]\nversion = {2 + step}\n")
        commit(a)
    seq = seq_of(a)
    expected = walk(live.mirror, skip=SKIP)
    wait_for("c at the newest", lambda: seq_of(c) == seq)
    wait_for_tree(c, expected)
    b.start()
    wait_until_meshed([a, b, c])
    wait_for("b to catch up", lambda: seq_of(b) == seq)
    wait_for_tree(b, expected)
    log = json.loads(b.cli("log", VOLUME, "--json").stdout)
    assert [s["seq"] for s in log[:2]] == [seq, seq - 1], log[:2]
    assert all(s["available"] for s in log[:2]), log[:2]
    assert (tools(b) / ".snapshots" / str(seq - 1) / "config.ini").read_text() == (
        "[tool]\nversion = 3\n"
    )


def test_a_replayed_older_snapshot_is_refused(live: Live, tmp_path: Path) -> None:
    a, b = live.lab.node("a"), live.lab.node("b")
    record = VolumeRegistry(Home(a.home)).get(VOLUME)
    with Store(a.home / "store") as store:
        current = decode_snapshot(store.get_object(record.head or b""))
        assert current.parent is not None
        older = store.get_object(current.parent)
    assert decode_snapshot(older).seq < current.seq
    assert seq_of(b) == current.seq
    # A member of the estate with no daemon plays the peer that replays it.
    m = live.lab.add_node("m")
    refused_before = b.status()["snapshots"]["refused"]
    offer = tmp_path / "older.snap"
    offer.write_bytes(older)
    proc = m.host.run(
        [
            sys.executable,
            "-c",
            SNAPSHOT_PEER,
            str(m.home),
            b.address,
            VOLUME,
            record.id.hex(),
            str(current.seq + 1),  # the genuine, signed, older snapshot offered as newer
            blake3.blake3(older).hexdigest(),
            record.endorsement.hex() if record.endorsement else "-",
            str(offer),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "served" in proc.stdout, proc.stdout + proc.stderr
    wait_for("b to refuse the replay", lambda: b.status()["snapshots"]["refused"] > refused_before)
    assert seq_of(b) == current.seq
    log = json.loads(b.cli("log", VOLUME, "--json").stdout)
    assert log[0]["seq"] == current.seq
    assert walk(tools(b), skip=SKIP) == walk(live.mirror, skip=SKIP)


def test_uncommitted_changes_survive_kill_9_and_a_stop_commits_them(live: Live) -> None:
    a, b, c = (live.lab.node(n) for n in "abc")
    before = seq_of(a)
    for root in (tools(a), live.mirror):
        (root / "crash").mkdir()
        (root / "crash" / "closed.txt").write_text("written and closed before a kill -9\n")
        with open(root / "config.ini", "r+") as f:
            f.write("[TOOL]")  # in place, same length
    expected = walk(live.mirror, skip=SKIP)
    a.kill()
    a.start()
    wait_until_meshed([a, b, c])
    # Nothing was committed, nothing was lost: a's mount shows every closed change.
    assert walk(tools(a), skip=SKIP) == expected, diff_walks(walk(tools(a), skip=SKIP), expected)
    assert seq_of(b) == before
    report = commit(a)
    assert report["changed"] is True and report["seq"] > before, report
    for node in (b, c):
        wait_for_tree(node, expected)
    # A clean stop commits what was written and closed; peers get it at the next start.
    before = report["seq"]
    for root in (tools(a), live.mirror):
        (root / "crash" / "before-stop.txt").write_text("written, closed, then SIGTERM\n")
    expected = walk(live.mirror, skip=SKIP)
    a.stop()
    a.start()
    wait_until_meshed([a, b, c])
    assert seq_of(a) > before
    assert walk(tools(a), skip=SKIP) == expected, diff_walks(walk(tools(a), skip=SKIP), expected)
    for node in (b, c):
        wait_for(f"{node.name} past seq {before}", lambda node=node: seq_of(node) > before)
        wait_for_tree(node, expected)


def test_an_automatic_commit_reaches_the_followers(live: Live) -> None:
    a, b, c = (live.lab.node(n) for n in "abc")
    a.stop()
    configure(a, settle_s=1, max_delay_s=3)
    a.start()
    wait_until_meshed([a, b, c])
    before = seq_of(a)
    # The daemon restarted with every change committed: the mount shows the same tree.
    assert walk(tools(a), skip=SKIP) == walk(live.mirror, skip=SKIP)
    # A file still open for writing stays out of automatic commits until it is closed.
    (tools(a) / "auto").mkdir()
    with open(tools(a) / "auto" / "held.txt", "w") as held:
        held.write("the first half, ")
        held.flush()
        (live.mirror / "auto").mkdir()
        for root in (tools(a), live.mirror):
            (root / "auto" / "one.txt").write_text("written, closed, never committed by hand\n")
            with open(root / "config.ini", "a") as f:
                f.write("auto = yes\n")
        expected = walk(live.mirror, skip=SKIP)
        for node in (b, c):
            wait_for(f"{node.name} past seq {before}", lambda node=node: seq_of(node) > before)
            wait_for_tree(node, expected)
        assert seq_of(a) > before
        held.write("the second half\n")
    (live.mirror / "auto" / "held.txt").write_text("the first half, the second half\n")
    expected = walk(live.mirror, skip=SKIP)
    for node in (b, c):
        wait_for_tree(node, expected)
    log = json.loads(a.cli("log", VOLUME, "--json").stdout)
    assert log[0]["seq"] == seq_of(b) == seq_of(c), log[:2]


def test_changes_that_never_settle_are_committed_after_max_delay(live: Live) -> None:
    a, b = live.lab.node("a"), live.lab.node("b")
    before = seq_of(b)
    steps = 0
    # A line every 0.2 s never leaves settle_s (1 s) of quiet: only max_delay_s (3 s)
    # makes a commit while the writer goes on.
    while seq_of(b) == before:
        assert steps < 150, "no commit reached b within 30 s of changes that never settle"
        for root in (tools(a), live.mirror):
            with open(root / "auto" / "busy.log", "a") as f:
                f.write(f"line {steps}\n")
        steps += 1
        time.sleep(0.2)
    assert (tools(b) / "auto" / "busy.log").read_text().startswith("line 0\n")
    expected = walk(live.mirror, skip=SKIP)
    for node in (b, live.lab.node("c")):
        wait_for_tree(node, expected)


def test_daemons_stop_cleanly(live: Live) -> None:
    for node in live.lab.nodes:
        if node.proc is not None:
            node.proc.send_signal(signal.SIGTERM)
            assert node.proc.wait(timeout=60) == 0, node.log_path.read_text()[-3000:]
            node.proc = None
            assert not os.path.ismount(node.mountpoint)
