"""The store as a cache: quota with LRU eviction, pins, protection, fsck, crash safety.

Real files, real SQLite, real processes (a child killed with SIGKILL), a real
tmpfs for the free-space floor. Nothing of ours is mocked; where a test needs a
damaged or half-finished state it makes it with its own SQLite connection or
file operations, the way a crash or a disk would.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfs.errors import NotFound, UsageError
from p2pfs.objects.model import object_id
from p2pfs.store.cas import QuotaExceeded, Store
from p2pfs.store.schema import SCHEMA_VERSION

pytestmark = pytest.mark.unit

KiB = 1024
MiB = 1024 * KiB
QUOTA = 1 * MiB
SIZE = 64 * KiB  # 16 chunks fill the quota


def chunk(n: int, size: int = SIZE) -> tuple[bytes, bytes]:
    data = random.Random(n).randbytes(size)
    return object_id(data), data


def disk_bytes(root: Path) -> int:
    """What the store's files take, summed like du (apparent sizes): chunks/ and tmp/."""
    total = 0
    for sub in ("chunks", "tmp"):
        for dirpath, _, names in os.walk(root / sub):
            for name in names:
                with contextlib.suppress(FileNotFoundError):  # evicted or renamed meanwhile
                    total += os.stat(os.path.join(dirpath, name)).st_size
    return total


def stored(store: Store, ids: list[bytes]) -> list[bool]:
    return [store.has(c) for c in ids]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store", max_bytes=QUOTA)
    yield s
    s.close()


def test_quota_holds_after_every_put_and_lru_order_is_kept(store: Store) -> None:
    items = [chunk(i) for i in range(16)]
    for cid, data in items:
        store.put(cid, data)
        assert disk_bytes(store.root) <= QUOTA
    assert all(stored(store, [c for c, _ in items]))
    assert store.cache_usage().bytes == QUOTA
    # Touch the four oldest; the next four puts must evict 4..7, the next least recent.
    store.touch(c for c, _ in items[:4])
    more = [chunk(i) for i in range(100, 104)]
    for cid, data in more:
        store.put(cid, data)
        assert disk_bytes(store.root) <= QUOTA
    ids = [c for c, _ in items]
    assert stored(store, ids[:4]) == [True] * 4
    assert stored(store, ids[4:8]) == [False] * 4
    assert all(stored(store, ids[8:]))
    # get() counts as use the same way.
    assert store.get(ids[8]) == items[8][1]
    store.put(*chunk(200))
    assert store.has(ids[8]) and not store.has(ids[9])
    usage = store.cache_usage()
    assert usage.evictions == 5
    assert usage.bytes == QUOTA == usage.quota == usage.max_bytes
    assert (usage.pinned_bytes, usage.reserved, usage.chunks) == (0, 0, 16)
    # A long loop stays under the quota on disk after every single put.
    for i in range(300, 400):
        store.put(*chunk(i, random.Random(i).randrange(1, 3 * SIZE)))
        assert disk_bytes(store.root) <= QUOTA
        assert store.cache_usage().bytes <= QUOTA
    assert store.fsck(repair=False).clean


def test_put_many_evicts_for_the_whole_batch(store: Store) -> None:
    old = [chunk(i) for i in range(16)]
    store.put_many(old)
    batch = [chunk(i) for i in range(100, 106)]
    assert store.put_many(batch) == 6
    assert disk_bytes(store.root) <= QUOTA
    assert stored(store, [c for c, _ in old]) == [False] * 6 + [True] * 10
    assert all(stored(store, [c for c, _ in batch]))


def test_pinned_chunks_are_never_evicted(store: Store) -> None:
    keep = [chunk(i) for i in range(4)]
    store.put_many(keep)
    store.pin("tools:/bin", [c for c, _ in keep])
    assert all(store.is_pinned(c) for c, _ in keep)
    assert store.pinned_bytes() == 4 * SIZE
    for i in range(100, 160):
        store.put(*chunk(i))
        assert disk_bytes(store.root) <= QUOTA
    for cid, data in keep:
        assert store.get(cid) == data
    assert store.cache_usage().pinned_bytes == 4 * SIZE
    # The same chunk in two sets is pinned (and counted) once.
    store.pin("other", [keep[0][0]])
    assert store.pinned_bytes() == 4 * SIZE
    store.unpin("tools:/bin")
    assert store.is_pinned(keep[0][0]) and not store.is_pinned(keep[1][0])
    assert store.pinned_bytes() == SIZE


def test_protected_chunks_are_never_evicted(store: Store) -> None:
    items = [chunk(i) for i in range(16)]
    store.put_many(items)
    open_file = {items[0][0], items[1][0], items[5][0]}
    calls: list[int] = []

    def protect() -> list[bytes]:
        calls.append(1)
        return list(open_file)

    store.set_protector(protect)
    for i in range(100, 140):
        store.put(*chunk(i))
    assert calls, "the protector is asked at eviction time"
    assert all(store.has(c) for c in open_file)
    assert store.get(items[5][0]) == items[5][1]
    store.set_protector(None)
    store.put_many([chunk(i) for i in range(200, 216)])
    assert not any(store.has(c) for c in open_file)


def test_a_put_that_cannot_fit_raises_and_stores_nothing(store: Store) -> None:
    items = [chunk(i) for i in range(16)]
    store.put_many(items)
    store.pin("tools:/bin", [c for c, _ in items[:10]])
    store.pin("data:/big", [c for c, _ in items[10:]])
    before = store.statistics()
    new_id, new_data = chunk(99)
    with pytest.raises(QuotaExceeded) as e:
        store.put(new_id, new_data)
    message = str(e.value)
    assert "1.0 MiB" in message and "'tools:/bin'" in message and "'data:/big'" in message
    assert e.value.errno == errno.ENOSPC and e.value.exit_code == 1
    with pytest.raises(QuotaExceeded):
        store.put_many([chunk(98), (new_id, new_data)])
    assert not store.has(new_id) and not store.has(chunk(98)[0])
    assert store.statistics() == before
    assert all(stored(store, [c for c, _ in items]))
    assert list((store.root / "tmp").iterdir()) == []
    usage = store.cache_usage()
    assert (usage.reserved, usage.evictions) == (0, 0)
    # Nothing was evicted while failing: after an unpin the same put succeeds by
    # evicting exactly one chunk of the unpinned set.
    store.unpin("data:/big")
    assert store.put(new_id, new_data)
    assert store.cache_usage().evictions == 1
    assert all(stored(store, [c for c, _ in items[:10]]))
    assert store.fsck(repair=False).clean


def test_protected_and_oversized_puts_fail_cleanly(store: Store) -> None:
    items = [chunk(i) for i in range(16)]
    store.put_many(items)
    store.set_protector(lambda: [c for c, _ in items])
    with pytest.raises(QuotaExceeded, match=r"1\.0 MiB is in use by open files"):
        store.put(*chunk(99))
    store.set_protector(None)
    with pytest.raises(QuotaExceeded, match=r"cannot store 1\.0 MiB"):
        store.put(*chunk(98, QUOTA + 1))  # bigger than the whole quota: evict nothing
    assert all(stored(store, [c for c, _ in items]))
    assert store.cache_usage().evictions == 0


def test_evict_and_set_quota(tmp_path: Path) -> None:
    root = tmp_path / "store"
    with Store(root) as store:  # no quota: nothing is ever evicted by a put
        items = [chunk(i) for i in range(20)]
        store.put_many(items)
        store.pin("p", [items[0][0]])
        assert store.cache_usage().quota is None
        assert store.evict(3 * SIZE - 1) == (3, 3 * SIZE)
        assert stored(store, [c for c, _ in items[:4]]) == [True, False, False, False]
        assert store.evict(0) == (0, 0)
        store.set_quota(8 * SIZE)
        assert store.cache_usage().bytes == 8 * SIZE
        assert store.has(items[0][0])  # pinned, though the oldest
        # More than there is: everything unpinned goes, the pinned chunk stays.
        assert store.evict(100 * MiB) == (7, 7 * SIZE)
        assert store.cache_usage().bytes == SIZE
        evictions = store.cache_usage().evictions
        assert evictions == 3 + 9 + 7
        with pytest.raises(UsageError):
            store.set_quota(-1)
    with Store(root, max_bytes=QUOTA) as store:  # the counter is persistent
        assert store.cache_usage().evictions == evictions
        assert store.fsck(repair=False).clean


def test_pins_survive_reopening_and_know_what_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    items = [chunk(i) for i in range(10)]
    ids = [c for c, _ in items]
    with Store(root, max_bytes=QUOTA) as store:
        store.pin("tools:/bin", ids)  # recorded before any chunk is fetched
        assert store.pinned_missing("tools:/bin") == sorted(ids)
        store.put_many(items[:4])
        store.pin("tools:/bin", ids[:2])  # adding ids already held changes nothing
        sets = store.pin_sets()
        assert [(s.name, s.count, s.present, s.present_bytes) for s in sets] == [
            ("tools:/bin", 10, 4, 4 * SIZE)
        ]
    with Store(root, max_bytes=QUOTA) as store:
        assert store.pinned_missing("tools:/bin") == sorted(ids[4:])
        assert store.is_pinned(ids[9]) and store.pinned_bytes() == 4 * SIZE
        # A pinned chunk fetched later is pinned as it arrives, and never evicted.
        store.put_many(items[4:])
        assert store.pinned_missing("tools:/bin") == []
        assert store.pinned_bytes() == 10 * SIZE
        for i in range(100, 130):
            store.put(*chunk(i))
        assert all(stored(store, ids))
        store.pin("empty", [])
        assert [s.name for s in store.pin_sets()] == ["empty", "tools:/bin"]
        with pytest.raises(NotFound):
            store.pinned_missing("nope")
        with pytest.raises(NotFound):
            store.unpin("nope")
        assert store.fsck(repair=False).clean


def test_unpin_makes_chunks_evictable(store: Store) -> None:
    items = [chunk(i) for i in range(16)]
    store.put_many(items)
    store.pin("a", [c for c, _ in items])
    with pytest.raises(QuotaExceeded):
        store.put(*chunk(99))
    store.unpin("a")
    assert store.pin_sets() == [] and store.pinned_bytes() == 0
    store.put_many([chunk(i) for i in range(100, 116)])
    assert not any(stored(store, [c for c, _ in items]))


def test_pin_names_and_ids_are_validated(store: Store) -> None:
    good = chunk(1)[0]
    for bad in ["", "a\0b", "line\nbreak", "x" * 4097, "é" * 2049, "\ud800", b"bytes"]:
        with pytest.raises(UsageError):
            store.pin(bad, [good])  # type: ignore[arg-type]
    store.pin("x" * 4096, [good])
    store.pin("é" * 2048, [good])
    store.pin("tools:/usr/bin (hôte) ✓", [good])
    with pytest.raises(UsageError):
        store.pin("half", [good, b"short"])  # one transaction: nothing of it stays
    assert "half" not in [s.name for s in store.pin_sets()]
    assert len(store.pin_sets()) == 3


def test_many_ids_pin_and_unpin_in_one_transaction(store: Store) -> None:
    ids = [i.to_bytes(32, "big") for i in range(100_000)]
    items = [chunk(i) for i in range(4)]
    store.put_many(items)
    store.pin("big", iter(ids + [c for c, _ in items]))
    (s,) = store.pin_sets()
    assert (s.count, s.present, s.present_bytes) == (100_004, 4, 4 * SIZE)
    assert len(store.pinned_missing("big")) == 100_000
    store.unpin("big")
    assert store.pinned_bytes() == 0 and not store.is_pinned(ids[5])
    assert store.fsck(repair=False).clean


def test_concurrent_puts_never_exceed_the_quota(store: Store) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()
    samples: list[int] = []

    def monitor() -> None:
        # Renames and evictions happen under the store's lock; a temp file only
        # exists while its bytes are reserved. So a walk under that lock sees a
        # state the store really passed through.
        # The pause lets the workers take the lock: Python's locks are not fair, and a
        # monitor that retakes the lock at once can starve them for minutes.
        while not stop.wait(0.001):
            with store._lock:
                samples.append(disk_bytes(store.root))

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for i in range(40):
                n = seed * 1000 + i
                if rng.random() < 0.3:
                    store.put_many([chunk(n * 10 + k, rng.randrange(1, SIZE)) for k in range(3)])
                else:
                    store.put(*chunk(n, rng.randrange(1, 2 * SIZE)))
                usage = store.cache_usage()
                assert usage.bytes + usage.reserved <= QUOTA
                if rng.random() < 0.2:
                    store.touch([chunk(n)[0]])
        except BaseException as e:  # reported below
            errors.append(e)

    watcher = threading.Thread(target=monitor)
    watcher.start()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert errors == []
    assert samples and max(samples) <= QUOTA
    assert disk_bytes(store.root) <= QUOTA
    assert store.cache_usage().reserved == 0
    assert store.fsck(repair=False).clean


def test_min_free_floor_on_a_small_tmpfs(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)], check=True)
    try:
        floor = 3 * MiB

        def free() -> int:
            st = os.statvfs(mnt)
            return st.f_bavail * st.f_frsize

        with Store(mnt / "store", min_free_bytes=floor) as store:
            for i in range(200):
                store.put(*chunk(i))
                assert free() >= floor
                usage = store.cache_usage()
                assert usage.quota is not None and usage.bytes <= usage.quota
            big = store.cache_usage().bytes
            assert big >= 8 * SIZE and store.cache_usage().evictions > 0
            # The disk fills for other reasons: the store shrinks to keep the floor.
            (mnt / "ballast").write_bytes(b"\0" * (big // 2))
            for i in range(200, 210):
                store.put(*chunk(i))
                assert free() >= floor
            assert store.cache_usage().bytes < big
            # A max_bytes below what the disk allows is the tighter limit.
            store.set_quota(4 * SIZE, floor)
            assert store.cache_usage().bytes == 4 * SIZE == store.cache_usage().quota
            assert store.fsck(repair=False).clean
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _db(root: Path) -> sqlite3.Connection:
    return sqlite3.connect(root / "index.sqlite", isolation_level=None, timeout=30)


def _plant(store: Store, n: int, size: int = 1000) -> tuple[bytes, bytes]:
    """A good chunk file put in place behind the index's back."""
    cid, data = chunk(n, size)
    path = store.path_of(cid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return cid, data


def test_fsck_finds_and_repairs_each_kind_of_disagreement(store: Store) -> None:
    items = [chunk(i, 1000 + i) for i in range(12)]
    store.put_many(items)
    store.pin("p", [items[0][0], items[1][0]])
    assert store.fsck(repair=False).clean
    ids = [c for c, _ in items]
    root = store.root
    unindexed = _plant(store, 100)
    bad_unindexed = (chunk(101)[0], b"not it")
    store.path_of(bad_unindexed[0]).parent.mkdir(parents=True, exist_ok=True)
    store.path_of(bad_unindexed[0]).write_bytes(bad_unindexed[1])
    store.path_of(ids[2]).unlink()  # row without file
    flipped = bytearray(items[3][1])
    flipped[10] ^= 1
    store.path_of(ids[3]).write_bytes(bytes(flipped))  # hash mismatch, same size
    with open(store.path_of(ids[4]), "ab") as f:
        f.write(b"tail")  # size mismatch, and corrupt
    (root / "chunks" / "zz").mkdir()
    (root / "chunks" / "stray.txt").write_bytes(b"x")
    upper = store.path_of(ids[6]).with_name(ids[6].hex().upper())
    upper.write_bytes(items[6][1])
    (root / "tmp" / "999999999-dead.tmp").write_bytes(b"half")
    (root / "tmp" / f"{os.getpid()}-live.tmp").write_bytes(b"being written")
    dead_put = _plant(store, 102)  # renamed into place, then its writer died
    dead_evict = ids[7]  # row deleted, then its writer died before the unlink
    with _db(root) as db:
        db.execute("UPDATE chunks SET size = 5 WHERE id = ?", (ids[5],))  # row wrong, file good
        db.execute(
            "INSERT INTO intents (op, id, size, owner) VALUES ('put', ?, ?, '999999999:1')",
            (dead_put[0], len(dead_put[1])),
        )
        db.execute("DELETE FROM chunks WHERE id = ?", (dead_evict,))
        db.execute(
            "INSERT INTO intents (op, id, size, owner) VALUES ('evict', ?, 1, '999999999:1')",
            (dead_evict,),
        )
        db.execute("UPDATE stats SET value = value + 7 WHERE name = 'stored_bytes'")
        db.execute("UPDATE chunks SET pins = 3 WHERE id = ?", (ids[8],))

    report = store.fsck(repair=False)
    expected = {
        "unindexed": 2,
        "missing": 1,
        "size_mismatches": 2,
        "corrupt": 1,
        "stray": 3,
        "temp_files": 1,
        "stale_intents": 2,
        "counters": 2,  # a pin count; stored_bytes
    }
    assert {k: getattr(report, k) for k in expected} == expected, report.lines()
    assert not report.clean
    text = "\n".join(report.lines())
    assert ids[2].hex() in text and "not repaired" in text
    assert store.fsck(repair=False).lines() == report.lines()  # and it changed nothing

    repaired = store.fsck(repair=True)
    assert {k: getattr(repaired, k) for k in expected} == expected, repaired.lines()
    assert "repaired" in repaired.lines()[-1]
    after = store.fsck(repair=False)
    assert after.clean, after.lines()
    assert after.lines()[-1].startswith("clean")
    assert (root / "tmp" / f"{os.getpid()}-live.tmp").exists()
    assert not (root / "tmp" / "999999999-dead.tmp").exists()
    # The index follows the files.
    assert store.get(unindexed[0]) == unindexed[1]
    assert store.get(dead_put[0]) == dead_put[1]
    assert store.get(ids[5]) == items[5][1]
    for gone in (bad_unindexed[0], ids[2], ids[3], ids[4], dead_evict):
        assert not store.has(gone)
    assert store.get(ids[6]) == items[6][1] and not upper.exists()
    assert store.is_pinned(ids[0]) and store.pinned_bytes() == len(items[0][1]) + len(items[1][1])
    st = store.statistics()
    assert st.bytes == sum(len(d) for c, d in items if store.has(c)) + 1000 + 1000
    assert st.corrupt_chunks == 3  # the flipped one, the long one, the bad unindexed one
    assert st.quarantined == 6  # those three and the three strays


def test_fsck_verify_false_skips_hashes(store: Store) -> None:
    cid, data = chunk(1)
    store.put(cid, data)
    store.path_of(cid).write_bytes(bytes(len(data)))
    assert store.fsck(repair=False, verify=False).clean
    assert store.fsck(repair=False).corrupt == 1


def test_open_finishes_what_a_dead_writer_left(tmp_path: Path) -> None:
    """The states a kill -9 can leave, made by hand, are repaired silently on open."""
    root = tmp_path / "store"
    with Store(root, max_bytes=QUOTA) as store:
        items = [chunk(i) for i in range(6)]
        store.put_many(items)
        renamed = _plant(store, 100)  # a put that renamed but did not index
        unrenamed = chunk(101)  # a put that reserved but never renamed
        torn = _plant(store, 102)  # a put whose renamed file is not what it claims
        store.path_of(torn[0]).write_bytes(b"garbage")
    with _db(root) as db:
        for cid, size in ((renamed[0], SIZE), (unrenamed[0], SIZE), (torn[0], SIZE)):
            db.execute(
                "INSERT INTO intents (op, id, size, owner) VALUES ('put', ?, ?, '999999999:1')",
                (cid, size),
            )
        db.execute("DELETE FROM chunks WHERE id = ?", (items[0][0],))
        db.execute(
            "INSERT INTO intents (op, id, size, owner) VALUES ('evict', ?, ?, '999999999:1')",
            (items[0][0], SIZE),
        )
        # An eviction whose chunk was stored again before the crash keeps its file.
        db.execute(
            "INSERT INTO intents (op, id, size, owner) VALUES ('evict', ?, ?, '999999999:1')",
            (items[1][0], SIZE),
        )
    with Store(root, max_bytes=QUOTA) as store:
        assert store.fsck(repair=False).clean
        assert store.cache_usage().reserved == 0
        assert store.get(renamed[0]) == renamed[1]
        assert not store.has(unrenamed[0]) and not store.has(torn[0])
        assert not store.has(items[0][0]) and store.get(items[1][0]) == items[1][1]
        assert store.statistics().quarantined == 1


_CHILD = r"""
import os, random, sys
from pathlib import Path
from p2pfs.objects.model import object_id
from p2pfs.store.cas import QuotaExceeded, Store

root, seed = Path(sys.argv[1]), int(sys.argv[2])
def chunk(n, size):
    data = random.Random(n).randbytes(size)
    return object_id(data), data
store = Store(root, max_bytes=1 << 20)
keep = [chunk(-k, 16384) for k in range(1, 9)]
store.put_many(keep)
store.pin("keep", [c for c, _ in keep])
print("ready", flush=True)
rng = random.Random(seed)
n = seed * 1_000_000
while True:
    n += 1
    r = rng.random()
    if r < 0.5:
        store.put(*chunk(n, rng.randrange(1, 96 * 1024)))
    elif r < 0.8:
        store.put_many([chunk(n * 8 + k, rng.randrange(1, 48 * 1024)) for k in range(4)])
    elif r < 0.9:
        store.pin(f"tmp-{n % 5}", [chunk(n - k, 1)[0] for k in range(50)])
    elif r < 0.95:
        try:
            store.unpin(f"tmp-{rng.randrange(5)}")
        except Exception:
            pass
    else:
        store.evict(rng.randrange(1, 256 * 1024))
    print(n, flush=True)
"""


def test_kill_9_during_puts_and_evictions_leaves_a_consistent_store(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    rng = random.Random(0)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    interrupted = 0  # kills that left intents for the next open to finish
    for trial in range(40):
        child = subprocess.Popen(
            [sys.executable, str(script), str(root), str(trial)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "ready\n"
            # Kill at an arbitrary point of the loop (a delay, not an assertion).
            time.sleep(rng.uniform(0.005, 0.15))
            child.send_signal(signal.SIGKILL)
        finally:
            child.kill()
            child.wait()
            if child.stdout is not None:
                child.stdout.close()
        assert child.returncode == -signal.SIGKILL
        caplog.clear()
        with (
            caplog.at_level(logging.WARNING, logger="p2pfs.store.cas"),
            Store(root, max_bytes=QUOTA) as store,
        ):
            interrupted += "of a writer that died" in caplog.text
            report = store.fsck(repair=False)
            assert report.clean, (trial, report.lines())
            assert store.pinned_missing("keep") == []
            for k in range(1, 9):
                cid, data = chunk(-k, 16384)
                assert store.get(cid) == data
            assert disk_bytes(root) <= QUOTA
            usage = store.cache_usage()
            assert usage.bytes <= QUOTA and usage.reserved == 0
        if trial >= 7 and interrupted >= 3:
            break
    assert usage.evictions > 0
    assert interrupted >= 1, "no kill landed inside a put or an eviction"


_V1_SCHEMA = """
CREATE TABLE chunks (
    id BLOB PRIMARY KEY, size INTEGER NOT NULL, last_access INTEGER NOT NULL,
    pins INTEGER NOT NULL DEFAULT 0, source TEXT NOT NULL
) WITHOUT ROWID;
CREATE TABLE stats (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE files (
    volume TEXT NOT NULL, path BLOB NOT NULL, size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, ino INTEGER NOT NULL,
    blob_id BLOB NOT NULL, PRIMARY KEY (volume, path)
) WITHOUT ROWID;
PRAGMA user_version = 1;
"""


def test_a_version_1_index_opens_and_migrates(tmp_path: Path) -> None:
    root = tmp_path / "store"
    items = [chunk(i, 1000 + i) for i in range(5)]
    with Store(root) as store:  # only to lay out the directories and files
        for cid, data in items:
            path = store.path_of(cid)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
    for p in root.glob("index.sqlite*"):
        p.unlink()
    db = sqlite3.connect(root / "index.sqlite")
    db.executescript(_V1_SCHEMA)
    db.executemany(
        "INSERT INTO chunks (id, size, last_access, source) VALUES (?, ?, ?, 'import')",
        [(cid, len(data), i) for i, (cid, data) in enumerate(items)],
    )
    db.execute("INSERT INTO stats VALUES ('corrupt_chunks', 2)")
    db.execute("INSERT INTO files VALUES ('v', x'61', 1, 2, 3, 4, ?)", (items[0][0],))
    db.commit()
    db.close()
    with Store(root, max_bytes=5010) as store:
        st = store.statistics()
        assert (st.chunks, st.bytes, st.corrupt_chunks) == (5, sum(1000 + i for i in range(5)), 2)
        assert store.files_cache.lookup("v", b"a") is not None
        assert store.fsck(repair=False).clean
        store.pin("p", [items[4][0]])
        assert store.pinned_bytes() == 1004
        # The old last_access order is the LRU order: 0 then 1 go first.
        store.put(*chunk(50, 1500))
        assert [store.has(c) for c, _ in items] == [False, False, True, True, True]
    with _db(root) as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_pins_survive_a_damaged_index_when_they_can(tmp_path: Path) -> None:
    root = tmp_path / "store"
    items = [chunk(i) for i in range(4)]
    with Store(root) as store:
        store.put_many(items)
        store.pin("keep", [c for c, _ in items[:2]])
    with _db(root) as db:  # damage the index where the pins are not
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        (root_page,) = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'files'"
        ).fetchone()
    with open(root / "index.sqlite", "r+b") as f:
        f.seek((root_page - 1) * page_size)
        f.write(b"\xff" * page_size)
    with Store(root, max_bytes=2 * SIZE) as store:
        assert [(s.name, s.present) for s in store.pin_sets()] == [("keep", 2)]
        assert store.cache_usage().bytes == 2 * SIZE  # the rebuild evicted unpinned ones
        assert all(store.has(c) for c, _ in items[:2])


def test_touches_reach_the_index_on_close(tmp_path: Path) -> None:
    root = tmp_path / "store"
    items = [chunk(i) for i in range(16)]
    with Store(root, max_bytes=QUOTA) as store:
        store.put_many(items[:8])
        store.put_many(items[8:])
        store.touch([items[0][0]])
    with Store(root, max_bytes=QUOTA) as store:
        store.put(*chunk(99))
        assert store.has(items[0][0])
        assert sum(stored(store, [c for c, _ in items])) == 15


def test_store_in_tempdir_without_quota_behaves_as_before() -> None:
    with tempfile.TemporaryDirectory() as d, Store(Path(d)) as store:
        for i in range(50):
            store.put(*chunk(i))
        usage = store.cache_usage()
        assert (usage.quota, usage.bytes, usage.evictions) == (None, 50 * SIZE, 0)


def test_a_big_eviction_runs_in_batches_in_lru_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import p2pfs.store.quota

    monkeypatch.setattr(p2pfs.store.quota, "EVICT_BATCH", 4)
    with Store(tmp_path / "store") as store:
        items = [chunk(i, 100) for i in range(30)]
        store.put_many(items)  # batch order is LRU order
        store.pin("p", [items[29][0]])
        assert store.evict(10 * 100 - 50) == (10, 1000)  # three batches: 4 + 4 + 2
        assert stored(store, [c for c, _ in items]) == [False] * 10 + [True] * 20
        assert store.evict(10**9) == (19, 1900)
        assert store.cache_usage().bytes == 100 and store.has(items[29][0])
        assert store.fsck(repair=False).clean


_WRITER = r"""
import random, sys
from pathlib import Path
from p2pfs.objects.model import object_id
from p2pfs.store.cas import Store

root, seed = Path(sys.argv[1]), int(sys.argv[2])
rng = random.Random(seed)
with Store(root, max_bytes=1 << 20) as store:
    for n in range(60):
        data = rng.randbytes(rng.randrange(1, 96 * 1024))
        store.put(object_id(data), data)
        # Seen from another process, a writer's victims count twice for a moment
        # (their evict intents and its put intent): reserved is conservative.
        assert store.cache_usage().bytes <= 1 << 20
print("done", flush=True)
"""


def test_two_processes_share_one_quota(store: Store, tmp_path: Path) -> None:
    script = tmp_path / "writer.py"
    script.write_text(_WRITER)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    children = [
        subprocess.Popen(
            [sys.executable, str(script), str(store.root), str(seed)],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for seed in (1, 2)
    ]
    for i in range(60):
        store.put(*chunk(1000 + i, random.Random(i).randrange(1, 96 * KiB)))
        assert store.cache_usage().bytes <= QUOTA
    outs = [c.communicate(timeout=300)[0] for c in children]
    assert [c.returncode for c in children] == [0, 0] and outs == ["done\n", "done\n"]
    assert disk_bytes(store.root) <= QUOTA
    usage = store.cache_usage()
    assert usage.bytes <= QUOTA and usage.reserved == 0 and usage.evictions > 0
    assert store.fsck(repair=False).clean
