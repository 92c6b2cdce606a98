"""The local store through its public API: put/get, atomicity, corruption, index repair."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from p2pfs.errors import CorruptChunk, IntegrityError, MissingChunk
from p2pfs.objects.model import Blob, ChunkRef, decode_blob, object_id
from p2pfs.store.cas import Store
from p2pfs.store.files_cache import CachedFile

pytestmark = pytest.mark.unit


def chunk(n: int, size: int = 1000) -> tuple[bytes, bytes]:
    data = random.Random(n).randbytes(size)
    return object_id(data), data


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(tmp_path / "store")
    yield s
    s.close()


def test_put_get_has(store: Store) -> None:
    cid, data = chunk(1)
    assert not store.has(cid)
    with pytest.raises(MissingChunk, match=cid.hex()):
        store.get(cid)
    assert store.put(cid, data) is True
    assert store.put(cid, data) is False
    assert store.has(cid)
    assert store.get(cid) == data
    assert store.path_of(cid).read_bytes() == data
    h = cid.hex()
    assert store.path_of(cid) == store.root / "chunks" / h[:2] / h[2:4] / h
    st = store.statistics()
    assert (st.chunks, st.bytes, st.corrupt_chunks, st.quarantined) == (1, 1000, 0, 0)
    assert list((store.root / "tmp").iterdir()) == []


def test_a_miss_does_not_wait_for_a_batch_being_renamed_in(store: Store) -> None:
    """A cold read checks the store before it fetches each chunk; while a batch of
    fetched chunks holds the store's lock, those checks must not queue behind it. An
    indexed chunk whose file is gone still waits, so a put renaming it in is seen."""
    absent, _ = chunk(1)
    gone, data = chunk(2)
    store.put(gone, data)
    os.unlink(store._file_of(gone))
    outcome: dict[str, BaseException] = {}

    def get(cid: bytes, name: str) -> None:
        try:
            store.get(cid)
        except BaseException as e:
            outcome[name] = e

    with store._lock:  # a batch being renamed in
        quick = threading.Thread(target=get, args=(absent, "absent"))
        quick.start()
        quick.join(timeout=10)
        assert not quick.is_alive(), "a miss waited for the store's lock"
        held = threading.Thread(target=get, args=(gone, "gone"))
        held.start()
        held.join(timeout=0.3)
        assert held.is_alive()  # an indexed chunk's miss waits for the lock
    held.join(timeout=10)
    assert isinstance(outcome["absent"], MissingChunk)
    assert isinstance(outcome["gone"], MissingChunk)
    assert not store.index.has_chunk(gone)  # its stale row went


def test_wrong_id_is_refused(store: Store) -> None:
    cid, data = chunk(1)
    other, _ = chunk(2)
    with pytest.raises(IntegrityError, match=other.hex()):
        store.put(other, data)
    assert not store.has(other)
    with pytest.raises(IntegrityError):
        store.put_many([(cid, data), (other, data)])
    assert not store.has(cid)  # the batch is verified before anything is written
    assert list((store.root / "tmp").iterdir()) == []
    assert store.statistics().chunks == 0


def test_put_many(store: Store) -> None:
    items = [chunk(i, 100 + i) for i in range(300)]
    store.put(*items[0])
    assert store.put_many(items + items[:10]) == 299
    assert store.put_many(items) == 0
    for cid, data in items:
        assert store.get(cid) == data
    st = store.statistics()
    assert st.chunks == 300
    assert st.bytes == sum(len(d) for _, d in items)
    assert list((store.root / "tmp").iterdir()) == []
    assert store.put_many([(cid, memoryview(d)) for cid, d in [chunk(1000)]]) == 1


def test_objects_share_the_cas(store: Store) -> None:
    cid, data = chunk(1)
    blob = Blob(len(data), 0, (ChunkRef(cid, len(data)),)).encode()
    oid = store.put_object(blob)
    assert oid == object_id(blob)
    assert decode_blob(store.get_object(oid)).refs[0].id == cid
    assert store.put_object(blob) == oid


def test_bit_flip_is_quarantined_counted_and_persistent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    store = Store(root)
    cid, data = chunk(1)
    good, gdata = chunk(2)
    store.put(cid, data)
    store.put(good, gdata)
    path = store.path_of(cid)
    raw = bytearray(path.read_bytes())
    raw[500] ^= 0x10
    path.write_bytes(bytes(raw))
    with (
        caplog.at_level(logging.WARNING, logger="p2pfs.store.cas"),
        pytest.raises(CorruptChunk, match=cid.hex()),
    ):
        store.get(cid)
    assert cid.hex() in caplog.text
    assert not path.exists()
    quarantined = list((root / "quarantine").iterdir())
    assert len(quarantined) == 1 and quarantined[0].name.startswith(cid.hex())
    assert quarantined[0].read_bytes() == bytes(raw)
    assert not store.has(cid)
    with pytest.raises(MissingChunk):
        store.get(cid)
    st = store.statistics()
    assert (st.chunks, st.corrupt_chunks, st.quarantined) == (1, 1, 1)
    # Healing: the right bytes can be stored again.
    assert store.put(cid, data) is True
    assert store.get(cid) == data
    store.close()
    store = Store(root)
    st = store.statistics()
    assert (st.chunks, st.corrupt_chunks, st.quarantined) == (2, 1, 1)
    assert store.get(good) == gdata
    store.close()


def test_truncated_chunk_is_corrupt(store: Store) -> None:
    cid, data = chunk(1)
    store.put(cid, data)
    with open(store.path_of(cid), "r+b") as f:
        f.truncate(10)
    with pytest.raises(CorruptChunk):
        store.get(cid)
    assert store.statistics().corrupt_chunks == 1


def test_scrub(store: Store) -> None:
    items = [chunk(i) for i in range(5)]
    store.put_many(items)
    store.path_of(items[3][0]).write_bytes(b"rot")
    good, bad = store.scrub()
    assert (good, bad) == (4, [items[3][0]])
    assert store.statistics().corrupt_chunks == 1


def test_concurrent_put_get(store: Store) -> None:
    items = [chunk(i, 2000) for i in range(200)]
    errors: list[BaseException] = []
    new_counts: list[int] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            n = 0
            for _ in range(400):
                cid, data = rng.choice(items)
                if rng.random() < 0.5:
                    n += store.put(cid, data)
                else:
                    with contextlib.suppress(MissingChunk):
                        assert store.get(cid) == data
            n += store.put_many(rng.sample(items, 20))
            new_counts.append(n)
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    stored = sum(store.has(cid) for cid, _ in items)
    assert sum(new_counts) == stored  # each chunk counted new exactly once
    assert store.statistics().chunks == stored
    assert list((store.root / "tmp").iterdir()) == []


def _fill(root: Path, n: int = 50) -> list[tuple[bytes, bytes]]:
    items = [chunk(i) for i in range(n)]
    with Store(root) as store:
        store.put_many(items)
    return items


@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete", "zero-header"])
def test_damaged_index_is_rebuilt(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    root = tmp_path / "store"
    items = _fill(root)
    index = root / "index.sqlite"
    size = index.stat().st_size
    if damage == "truncate":
        with open(index, "r+b") as f:
            f.truncate(size // 3)
    elif damage == "garbage":
        index.write_bytes(random.Random(0).randbytes(size))
    elif damage == "zero-header":
        with open(index, "r+b") as f:
            f.write(b"\0" * 100)
    else:
        index.unlink()
    # One chunk also rotted while the index was bad: the rebuild must catch it.
    bad_cid = items[7][0]
    store_path = root / "chunks" / bad_cid.hex()[:2] / bad_cid.hex()[2:4] / bad_cid.hex()
    store_path.write_bytes(b"rotten")
    with caplog.at_level(logging.WARNING, logger="p2pfs.store.cas"), Store(root) as store:
        st = store.statistics()
        assert st.chunks == len(items) - 1
        assert st.corrupt_chunks == 1 and st.quarantined == 1
        for cid, data in items:
            if cid != bad_cid:
                assert store.get(cid) == data
        assert not store.has(bad_cid)
        store.files_cache.replace("v", [(b"a", CachedFile(1, 2, 3, 4, bad_cid))])
    assert "rebuild" in caplog.text
    if damage != "delete":
        assert [p.name.startswith("index.sqlite.corrupt-") for p in root.iterdir()].count(True) >= 1
    with Store(root) as store:  # and the rebuilt index is a good one
        assert store.statistics().chunks == len(items) - 1
        assert store.files_cache.lookup("v", b"a") == CachedFile(1, 2, 3, 4, bad_cid)


def test_rebuild_index_keeps_the_corrupt_count(tmp_path: Path) -> None:
    root = tmp_path / "store"
    items = _fill(root, 5)
    with Store(root) as store:
        store.path_of(items[0][0]).write_bytes(b"x")
        with pytest.raises(CorruptChunk):
            store.get(items[0][0])
        assert store.rebuild_index() == (4, [])
        assert store.statistics().corrupt_chunks == 1


def test_stale_temp_files_are_removed(tmp_path: Path) -> None:
    root = tmp_path / "store"
    _fill(root, 1)
    dead = root / "tmp" / "999999999-abc.tmp"  # no such pid
    dead.write_bytes(b"half")
    mine = root / "tmp" / f"{os.getpid()}-abc.tmp"  # a live writer's
    mine.write_bytes(b"half")
    with Store(root):
        assert not dead.exists()
        assert mine.exists()


def test_files_cache_round_trip(store: Store) -> None:
    fc = store.files_cache
    assert fc.lookup("vol", b"a/b") is None
    row = CachedFile(size=10, mtime_ns=20, ctime_ns=30, ino=40, blob_id=b"\1" * 32)
    fc.replace("vol", [(b"a/b", row), (b"\xff/c", row)])
    fc.replace("other", [(b"a/b", CachedFile(1, 1, 1, 1, b"\2" * 32))])
    assert fc.lookup("vol", b"a/b") == row
    assert fc.lookup("vol", b"\xff/c") == row
    fc.replace("vol", [(b"new", row)])  # replaces the whole volume
    assert fc.lookup("vol", b"a/b") is None
    assert fc.lookup("vol", b"new") == row
    assert fc.lookup("other", b"a/b") == CachedFile(1, 1, 1, 1, b"\2" * 32)


def test_files_cache_replace_is_one_transaction(store: Store) -> None:
    fc = store.files_cache
    row = CachedFile(1, 2, 3, 4, b"\1" * 32)
    fc.replace("vol", [(b"keep", row)])

    def rows() -> Iterator[tuple[bytes, CachedFile]]:
        yield (b"x", row)
        raise OSError("walk failed")

    with pytest.raises(OSError):
        fc.replace("vol", rows())
    assert fc.lookup("vol", b"keep") == row
    assert fc.lookup("vol", b"x") is None


def test_failed_write_leaves_nothing(store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    cid, data = chunk(1)

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError):
        store.put(cid, data)
    with pytest.raises(OSError):
        _put_many_fsync(store)
    monkeypatch.undo()
    assert not store.has(cid)
    assert list((store.root / "tmp").iterdir()) == []
    assert store.statistics().chunks == 0


def _put_many_fsync(store: Store) -> int:
    import p2pfs.store.cas

    old = p2pfs.store.cas.BATCH_BARRIER
    p2pfs.store.cas.BATCH_BARRIER = "fsync"
    try:
        return store.put_many([chunk(2), chunk(3)])
    finally:
        p2pfs.store.cas.BATCH_BARRIER = old


def test_concurrent_reads_of_a_corrupt_chunk_count_it_once(store: Store) -> None:
    cid, data = chunk(1, 200_000)
    store.put(cid, data)
    store.path_of(cid).write_bytes(data[:-1] + b"!")
    outcomes: list[str] = []
    barrier = threading.Barrier(6)

    def reader() -> None:
        barrier.wait()
        try:
            store.get(cid)
            outcomes.append("data")
        except CorruptChunk:
            outcomes.append("corrupt")
        except MissingChunk:
            outcomes.append("missing")

    threads = [threading.Thread(target=reader) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert "data" not in outcomes and "corrupt" in outcomes
    st = store.statistics()
    assert (st.corrupt_chunks, st.quarantined, st.chunks) == (1, 1, 0)


def test_vanished_file_drops_its_index_row(store: Store) -> None:
    cid, data = chunk(1)
    store.put(cid, data)
    store.path_of(cid).unlink()
    with pytest.raises(MissingChunk):
        store.get(cid)
    assert store.statistics().chunks == 0
