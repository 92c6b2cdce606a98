"""The chunker: pinned cut points, native vs twin, bounds, streaming, two threads, params."""

from __future__ import annotations

import os
import threading
import tracemalloc
from pathlib import Path

import blake3
import pytest

from p2pfs.chunking import _fastcdc, chunker, twin
from p2pfs.chunking.chunker import chunk_file, cut_points, cut_points_digest, iter_chunks
from p2pfs.chunking.params import ALGORITHM, ChunkParams, ChunkRecord
from p2pfs.chunking.twin import cut_points_py
from p2pfs.errors import DecodeError, UsageError

pytestmark = pytest.mark.unit

SMALL = ChunkParams(256, 1024, 4096)
TINY = ChunkParams(64, 128, 256)
MEDIUM = ChunkParams(4096, 16384, 65536)
DEFAULT = ChunkParams()
ODD = ChunkParams(1000, 2048, 3001)  # min and max need not be powers of two


def prng(seed: str, size: int) -> bytes:
    """Fixed pseudo-random bytes: the BLAKE3 XOF of a seed (stable forever)."""
    return blake3.blake3(seed.encode()).digest(length=size)


def check_records(records: list[ChunkRecord], data: bytes) -> None:
    pos = 0
    for r in records:
        assert r.offset == pos
        assert r.id == blake3.blake3(data[pos : pos + r.length]).digest()
        pos += r.length
    assert pos == len(data)


# --- Format


def test_gear_table_is_its_derivation() -> None:
    table = _fastcdc.gear_table()
    assert table == twin.derive_gear_table()
    assert len(table) == 256 and len(set(table)) == 256
    assert table[0] == 0x3E7FEB82A9FF01CC


def test_masks() -> None:
    # b = log2(256 KiB) = 18: MASK_S has 20 one bits, MASK_L 16, both ending at bit 62.
    mask_s, mask_l = twin.masks(DEFAULT)
    assert mask_s == ((1 << 20) - 1) << 43
    assert mask_l == ((1 << 16) - 1) << 47
    assert _fastcdc.Cutter(65536, 262144, 1048576).masks == (mask_s, mask_l)
    for p in (SMALL, TINY, MEDIUM, ODD):
        s, lo = twin.masks(p)
        assert not (s | lo) >> 63
        assert _fastcdc.Cutter(p.min_size, p.avg_size, p.max_size).masks == (s, lo)


# Future optimizations must not change this; a change is a format version bump
# (ALGORITHM), since it changes every chunk id in every volume.
GOLDEN = [
    (DEFAULT, 54, "5001f6ef3601e3a2be6c61633ba6b6efbdedec5ec3297fd567a731401e7f7653"),
    (SMALL, 14354, "6e732440d1730b6810c3811902e6aed61113c3f05988ed519a6b5e31fd7184d5"),
    (TINY, 110418, "08486c8dd98dc0777da32c5e2e85e7f0acbc94e8a67a5170ae69854ef2d52e7f"),
    (MEDIUM, 904, "c285b415b7f66514f906c84380f8ab93fef51262ba4c93faa1d37ef8774697a0"),
    (ODD, 7117, "b66b04dab0b26f7fee33ca2be2b7241e5f67fc7059fef06b2e3c4418db7a39e4"),
]


@pytest.mark.parametrize(("params", "count", "digest"), GOLDEN, ids=lambda v: str(v)[:40])
def test_chunkpoints_unchanged(params: ChunkParams, count: int, digest: str) -> None:
    assert ALGORITHM == "fastcdc-gear-v1"
    points = cut_points(prng("p2pfs chunker golden data", 16 << 20), params)
    assert (len(points), cut_points_digest(points)) == (count, digest)


def test_twin_matches_golden_prefix() -> None:
    data = prng("p2pfs chunker golden data", 16 << 20)[: 96 * 1024]
    for params in (SMALL, TINY, ODD):
        assert cut_points_py(data, params) == cut_points(data, params)


# --- Native vs twin


def _random_params(rng: bytes) -> ChunkParams:
    a, b, c = rng[0], rng[1], rng[2]
    avg = 1 << (7 + a % 5)  # 128 .. 2048
    mn = 64 + (b * 7919) % (avg - 64)
    mx = avg + 1 + (c * 104729) % (3 * avg)
    return ChunkParams(mn, avg, mx)


@pytest.mark.parametrize("case", range(40))
def test_native_matches_twin(case: int) -> None:
    seed = prng(f"twin case {case}", 8)
    params = _random_params(seed)
    size = int.from_bytes(seed[3:6], "little") % 12000
    data = bytearray(prng(f"twin data {case}", size))
    if case % 4 == 1:  # low entropy: a short repeating pattern with a few changes
        data = bytearray((bytes(seed[:3]) * size)[:size])
        for i in range(0, size, 997):
            data[i] ^= 0x5A
    elif case % 4 == 2:  # runs of zeros between random stretches
        for i in range(0, size, 4096):
            data[i : i + 2048] = bytes(len(data[i : i + 2048]))
    points = cut_points(data, params)
    assert points == cut_points_py(data, params), params
    assert cut_points(bytes(data), params) == cut_points(memoryview(data), params) == points


@pytest.mark.parametrize("params", [MEDIUM, ChunkParams(2048, 65536, 131072)], ids=str)
def test_two_lane_scan_matches_twin(params: ChunkParams) -> None:
    # Spans of at least two lane blocks (2 KiB or more) take the native two-lane
    # path; the twin scans one byte at a time.
    data = prng("lanes", 1 << 20)
    points = cut_points(data, params)
    assert len(points) > 10
    assert points == cut_points_py(data, params)


def test_accepts_wider_memoryviews() -> None:
    data = prng("wide", 8192)
    wide = memoryview(data).cast("I")
    assert cut_points(wide, SMALL) == cut_points(data, SMALL)


# --- Sizes


@pytest.mark.parametrize("params", [DEFAULT, SMALL, TINY, MEDIUM, ODD], ids=str)
def test_chunk_sizes_respect_bounds(params: ChunkParams) -> None:
    data = prng("bounds", 4 << 20)
    points = cut_points(data, params)
    lengths = [b - a for a, b in zip([0, *points], points, strict=False)]
    assert points[-1] == len(data)
    assert all(params.min_size < n <= params.max_size for n in lengths[:-1])
    assert 0 < lengths[-1] <= params.max_size
    # Normalized chunking keeps the mean near avg_size (skipping min shifts it up).
    if len(lengths) > 100:
        mean = len(data) / len(lengths)
        assert params.avg_size * 0.8 < mean < params.avg_size * 1.6


@pytest.mark.parametrize("params", [DEFAULT, SMALL, ODD], ids=str)
@pytest.mark.parametrize("byte", [0x00, 0xFF])
def test_constant_data_cuts_at_max(params: ChunkParams, byte: int) -> None:
    n = 5 * params.max_size + 123
    points = cut_points(bytes([byte]) * n, params)
    assert points == [*range(params.max_size, n, params.max_size), n]
    assert points == cut_points_py(bytes([byte]) * n, params)


def test_empty_and_small_inputs() -> None:
    assert cut_points(b"", DEFAULT) == [] == cut_points_py(b"", DEFAULT)
    for n in (1, 100, 65535, 65536):
        assert cut_points(prng("small", n), DEFAULT) == [n]
    assert cut_points(prng("small", 65537), DEFAULT) == [65537]  # under one chunk
    data = prng("small", 700)
    assert cut_points(data, SMALL) == [700] == cut_points_py(data, SMALL)


def test_boundary_stability() -> None:
    data = prng("stability", 8 << 20)
    before = cut_points(data, MEDIUM)
    edited = data[:1000] + b"inserted bytes!" + data[1000:]
    after = cut_points(edited, MEDIUM)
    shifted = {p - 15 for p in after}
    changed = [p for p in before if p not in shifted]
    assert len(before) > 300
    assert changed == before[: len(changed)]  # only the first chunks differ
    assert len(changed) <= 3


# --- iter_chunks


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _iter_file(path: Path, params: ChunkParams, **kw: int) -> list[ChunkRecord]:
    fd = os.open(path, os.O_RDONLY)
    try:
        out = []
        for rec, mv in iter_chunks(fd, params, **kw):
            assert len(mv) == rec.length
            assert blake3.blake3(mv).digest() == rec.id
            out.append(rec)
        return out
    finally:
        os.close(fd)


@pytest.mark.parametrize(
    "buffer_size", [1, 4096, 8191, 8192, 8193, 3 * 4096 + 7, 65536, 8 << 20], ids=str
)
def test_iter_chunks_across_buffer_boundaries(tmp_path: Path, buffer_size: int) -> None:
    # buffer_size below 2 * max_size is raised to 2 * max_size (8192 here).
    data = prng("iter", 300_000) + bytes(20_000) + prng("iter2", 1234)
    path = _write(tmp_path / "f", data)
    records = _iter_file(path, SMALL, buffer_size=buffer_size)
    check_records(records, data)
    assert [r.offset + r.length for r in records] == cut_points(data, SMALL)
    assert records == chunk_file(path, SMALL)


@pytest.mark.parametrize("hint", [0, 1, 100, 5000, 49_999, 50_000, 50_001, 10**9], ids=str)
def test_iter_chunks_size_hint_never_changes_the_cuts(tmp_path: Path, hint: int) -> None:
    # A wrong hint (the file grew or shrank since its stat) only costs a regrow.
    data = prng("hint", 50_000)
    path = _write(tmp_path / "f", data)
    fd = os.open(path, os.O_RDONLY)
    try:
        records = [rec for rec, _ in iter_chunks(fd, SMALL, size_hint=hint)]
    finally:
        os.close(fd)
    check_records(records, data)
    assert records == chunk_file(path, SMALL)


def test_iter_chunks_starts_at_current_position(tmp_path: Path) -> None:
    data = prng("pos", 50_000)
    path = _write(tmp_path / "f", data)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.lseek(fd, 10_000, os.SEEK_SET)
        records = [rec for rec, _ in iter_chunks(fd, SMALL)]
    finally:
        os.close(fd)
    assert records[0].offset == 10_000
    assert [r.offset + r.length - 10_000 for r in records] == cut_points(data[10_000:], SMALL)


def test_iter_chunks_from_a_pipe_with_short_reads() -> None:
    data = prng("pipe", 200_000)
    r, w = os.pipe()

    def writer() -> None:
        with os.fdopen(w, "wb", buffering=0) as f:
            for i in range(0, len(data), 777):
                f.write(data[i : i + 777])

    t = threading.Thread(target=writer)
    t.start()
    try:
        records = [rec for rec, _ in iter_chunks(r, SMALL)]
    finally:
        t.join()
        os.close(r)
    check_records(records, data)


def test_iter_chunks_empty_file(tmp_path: Path) -> None:
    assert _iter_file(_write(tmp_path / "f", b""), DEFAULT) == []
    assert chunk_file(tmp_path / "f", DEFAULT, threads=2) == []


def test_iter_chunks_memory_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "sparse"
    size = 300 * 1024 * 1024 + 12345
    with open(path, "wb") as f:
        f.write(b"head")
        f.truncate(size)
    count = 0
    total = 0
    tracemalloc.start()
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            for rec, _ in iter_chunks(fd, DEFAULT, buffer_size=2 << 20):
                count += 1
                total += rec.length
        finally:
            os.close(fd)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert total == size and count == 301
    assert peak < 3 << 20, peak


# --- chunk_file with two threads


def _both(path: Path, params: ChunkParams) -> list[ChunkRecord]:
    one = chunk_file(path, params, threads=1)
    two = chunk_file(path, params, threads=2)
    assert one == two
    return one


def test_chunk_file_two_threads_random(tmp_path: Path) -> None:
    data = prng("two threads", 40 << 20)
    path = _write(tmp_path / "f", data)
    records = _both(path, DEFAULT)
    check_records(records, data)
    assert _both(path, MEDIUM) == _iter_file(path, MEDIUM)


def test_chunk_file_two_threads_uses_two_halves(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    real = chunker._chunk_two_halves

    def spy(fd: int, mid: int, *args: object) -> list[ChunkRecord]:
        calls.append(mid)
        return real(fd, mid, *args)  # type: ignore[arg-type]

    monkeypatch.setattr(chunker, "_chunk_two_halves", spy)
    path = _write(tmp_path / "f", prng("halves", 20 << 20))
    _both(path, DEFAULT)
    assert calls == [10 << 20]


@pytest.mark.parametrize(
    "kind", ["zeros", "zeros-unaligned", "random-then-zeros", "pattern", "tiny", "one-chunk"]
)
def test_chunk_file_two_threads_adversarial(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    monkeypatch.setattr(chunker, "_PARALLEL_MIN", 0)  # split even small files
    params = SMALL
    n = 200_000
    if kind == "zeros":
        data = bytes(n - n % params.max_size)
    elif kind == "zeros-unaligned":
        data = bytes(n + 17)
    elif kind == "random-then-zeros":
        # The first half's cuts in the zeros keep the phase of its last random cut,
        # the second half's are multiples of max_size: they meet only at EOF.
        data = prng("rz", 70_001) + bytes(n)
    elif kind == "pattern":
        data = (prng("pat", 777) * (n // 777 + 1))[:n]
    elif kind == "tiny":
        data = prng("tiny", 100)
    else:
        data = prng("one", params.max_size - 1)
    path = _write(tmp_path / "f", data)
    records = _both(path, params)
    check_records(records, data)
    assert [r.offset + r.length for r in records] == cut_points(data, params)


def test_chunk_file_rejects_other_thread_counts(tmp_path: Path) -> None:
    path = _write(tmp_path / "f", b"x")
    with pytest.raises(UsageError, match="threads must be 1 or 2"):
        chunk_file(path, DEFAULT, threads=3)


# --- Parameters


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((32, 128, 256), r"min size must be at least 64 bytes; got 32"),
        ((1024, 1024, 4096), r"min size \(1024\) must be less than avg size \(1024\)"),
        ((256, 4096, 4096), r"avg size \(4096\) must be less than max size \(4096\)"),
        (
            (256, 1024, (64 << 20) + 1),
            r"max size must be at most 64 MiB \(67108864\); got 67108865",
        ),
        ((256, 1000, 4096), r"avg size must be a power of two; got 1000"),
        ((256.0, 1024, 4096), r"min_size must be an integer"),
    ],
)
def test_params_validation(args: tuple[int, int, int], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        ChunkParams(*args).validate()
    with pytest.raises(UsageError, match=message):
        cut_points(b"x" * 10000, ChunkParams(*args))


def test_params_dict_round_trip() -> None:
    for p in (DEFAULT, SMALL, ODD):
        d = p.to_dict()
        assert d == {
            "algorithm": ALGORITHM,
            "min": p.min_size,
            "avg": p.avg_size,
            "max": p.max_size,
        }
        assert ChunkParams.from_dict(d) == p
    ChunkParams(64, 128, 64 << 20).validate()


@pytest.mark.parametrize(
    ("d", "message"),
    [
        ([1, 2], "must be a map"),
        ({"algorithm": ALGORITHM, "min": 64}, "must have keys"),
        ({"algorithm": "fastcdc-gear-v0", "min": 64, "avg": 128, "max": 256}, "unknown chunking"),
        ({"algorithm": ALGORITHM, "min": "64", "avg": 128, "max": 256}, "min must be an integer"),
        ({"algorithm": ALGORITHM, "min": True, "avg": 128, "max": 256}, "min must be an integer"),
        ({"algorithm": ALGORITHM, "min": 64, "avg": 100, "max": 256}, "power of two"),
        ({"algorithm": ALGORITHM, "min": 512, "avg": 128, "max": 256}, "invalid chunk parameters"),
    ],
)
def test_params_from_dict_errors(d: object, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        ChunkParams.from_dict(d)


# --- Self-test


def test_self_test_passes_and_detects_a_change(monkeypatch: pytest.MonkeyPatch) -> None:
    chunker.self_test()
    monkeypatch.setattr(chunker, "_SELF_TEST_DIGEST", "0" * 64)
    with pytest.raises(RuntimeError, match=r"chunker self-test failed: .*pinned digest"):
        chunker.self_test()


def test_self_test_detects_twin_disagreement(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(twin, "GEAR_TABLE", [0] * 256)
    with pytest.raises(RuntimeError, match="chunker self-test failed"):
        chunker.self_test()


# --- The GIL


def test_native_scan_releases_the_gil() -> None:
    """While one thread is inside one long scan, another keeps running Python code."""
    data = bytes(64 << 20)  # zeros never cut: a single 64 MiB scan
    cutter = _fastcdc.Cutter(64, 128, 64 << 20)
    started = threading.Event()
    done = threading.Event()

    def scan() -> None:
        started.set()
        cutter.cut_points(data)
        done.set()

    t = threading.Thread(target=scan)
    t.start()
    started.wait()
    ticks = 0
    while not done.is_set():
        ticks += 1
    t.join()
    assert ticks > 1000
