"""Content-defined chunking: where files are cut into chunks, and each chunk's id.

The cut points are a format (``ALGORITHM``, specified in docs/chunking.md): every
peer of a volume must cut a file at the same offsets, or chunk ids stop matching.
The scan runs in the native module ``_fastcdc`` (imported here and nowhere else);
``twin.cut_points_py`` is its pure-Python twin, written from the spec, and the tests
and ``self_test()`` hold the two to identical cut points. The parameters and
records are ``params.py``.

Everything here that reads files or hashes is blocking: callers in trio run it
with ``trio.to_thread.run_sync``. The native scan and BLAKE3 both release the
GIL, which is what lets ``chunk_file(threads=2)`` use two cores.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
from collections.abc import Callable, Iterator

import blake3

from p2pfs.errors import UsageError

from . import _fastcdc, twin
from .params import ChunkParams, ChunkRecord, bytes_view

log = logging.getLogger(__name__)


def _cutter(params: ChunkParams) -> _fastcdc.Cutter:
    params.validate()  # before the cache: 256.0 == 256 would hit a valid entry
    return _cached_cutter(params.min_size, params.avg_size, params.max_size)


@functools.lru_cache(maxsize=32)
def _cached_cutter(min_size: int, avg_size: int, max_size: int) -> _fastcdc.Cutter:
    return _fastcdc.Cutter(min_size, avg_size, max_size)


def cut_points(data: bytes | bytearray | memoryview, params: ChunkParams) -> list[int]:
    """End offsets of every chunk of ``data`` taken as a whole file; [] if empty."""
    return _cutter(params).cut_points(bytes_view(data))


# --- Chunking files: read into one reusable buffer, cut, hash while in cache.


def _chunks(
    read: Callable[[memoryview], int],
    base: int,
    params: ChunkParams,
    buffer_size: int,
    size_hint: int | None = None,
) -> Iterator[tuple[ChunkRecord, memoryview]]:
    """Chunk the stream ``read`` fills, whose first byte is at file offset ``base``."""
    cutter = _cutter(params)
    full = max(buffer_size, 2 * params.max_size)
    # A small file gets a buffer its size (+1 to see EOF): allocating the full
    # buffer per file dominated imports of many small files. It grows if the file
    # turns out larger, since cutting away from EOF needs max_size bytes in view.
    size = full if size_hint is None else min(full, max(size_hint + 1, 4096))
    buf = bytearray(size)
    mv = memoryview(buf)
    start = filled = 0
    eof = False
    while True:
        while filled < size:
            n = read(mv[filled:])
            if n == 0:
                eof = True
                break
            filled += n
        while True:
            length = cutter.cut(mv[start:filled], eof)
            if length == 0:
                break
            chunk = mv[start : start + length]
            digest = blake3.blake3(chunk, max_threads=1).digest()
            yield ChunkRecord(base + start, length, digest), chunk
            start += length
        if eof:
            return
        # Fewer than max_size bytes are left: carry them to the front and refill.
        tail = filled - start
        if size < full:
            grown = bytearray(full)
            grown[:tail] = mv[start:filled]
            buf, size = grown, full
            mv = memoryview(buf)
        else:
            mv[:tail] = mv[start:filled]
        base += start
        start, filled = 0, tail


def iter_chunks(
    fd: int,
    params: ChunkParams,
    *,
    buffer_size: int = 8 * 1024 * 1024,
    size_hint: int | None = None,
) -> Iterator[tuple[ChunkRecord, memoryview]]:
    """Chunk ``fd`` from its current position to EOF, yielding (record, bytes).

    The memoryview is valid only until the next iteration (the buffer is reused).
    Record offsets are file offsets (counted from 0 where the fd can't seek, e.g. a
    pipe); chunking starts fresh at the current position. ``buffer_size`` is
    raised to at least 2 * max_size; memory stays within that whatever the file size.
    Blocking: run it in a worker thread.
    """
    try:
        base = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        base = 0

    def read(mv: memoryview) -> int:
        return os.readv(fd, [mv])

    return _chunks(read, base, params, buffer_size, size_hint)


def _range_reader(fd: int, offset: int) -> Callable[[memoryview], int]:
    pos = offset

    def read(mv: memoryview) -> int:
        nonlocal pos
        n = os.preadv(fd, [mv], pos)
        pos += n
        return n

    return read


# Below this many bytes a file is chunked by one thread whatever ``threads`` says.
_PARALLEL_MIN = 16 * 1024 * 1024


def chunk_file(
    path: str | os.PathLike[str],
    params: ChunkParams,
    *,
    threads: int = 1,
    buffer_size: int = 4 * 1024 * 1024,
) -> list[ChunkRecord]:
    """Records of every chunk of the file at ``path``; the same whatever ``threads``.

    With threads=2 the second half (from a multiple of max_size near the middle) is
    chunked in a second thread as if it began a file; the first thread goes on past
    the midpoint until one of its cuts is a chunk start of the second thread's (CDC
    resynchronises; at EOF at the latest), and the two lists are joined there.
    """
    if threads not in (1, 2):
        raise UsageError(f"chunk_file threads must be 1 or 2, not {threads}")
    params.validate()
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        mid = (size // 2) // params.max_size * params.max_size
        if threads == 1 or size < _PARALLEL_MIN or mid == 0:
            return [r for r, _ in _chunks(_range_reader(fd, 0), 0, params, buffer_size)]
        return _chunk_two_halves(fd, mid, params, buffer_size)
    finally:
        os.close(fd)


def _chunk_two_halves(
    fd: int, mid: int, params: ChunkParams, buffer_size: int
) -> list[ChunkRecord]:
    second: list[ChunkRecord] = []
    index: dict[int, int] = {mid: 0}  # chunk start offset -> its index in `second`
    cond = threading.Condition()
    state: dict[str, object] = {"reached": mid, "done": False, "error": None}

    def run_second() -> None:
        try:
            for rec, _ in _chunks(_range_reader(fd, mid), mid, params, buffer_size):
                end = rec.offset + rec.length
                with cond:
                    second.append(rec)
                    index[end] = len(second)
                    state["reached"] = end
                    cond.notify()
        except BaseException as e:
            state["error"] = e
        finally:
            with cond:
                state["done"] = True
                cond.notify()

    worker = threading.Thread(target=run_second, name="p2pfs-chunk-half", daemon=True)
    worker.start()
    first: list[ChunkRecord] = []
    at: int | None = None
    end = 0
    try:
        for rec, _ in _chunks(_range_reader(fd, 0), 0, params, buffer_size):
            first.append(rec)
            end = rec.offset + rec.length
            if end < mid:
                continue
            with cond:
                while not state["done"] and end > state["reached"]:  # type: ignore[operator]
                    cond.wait()
                at = index.get(end)
            if at is not None:
                break
    finally:
        worker.join()
    if state["error"] is not None:
        raise state["error"]  # type: ignore[misc]
    if at is None:  # both halves end at EOF, so they always meet unless the file changed
        raise OSError(f"chunk_file: the file changed while it was read (no resync by {end})")
    log.debug("chunk_file: halves joined %d bytes past the midpoint", end - mid)
    return first + second[at:]


# --- Self-test, run by the daemon at start.

# BLAKE3 of the cut points (8-byte LE each) of _self_test_data() under _SELF_TEST_PARAMS.
_SELF_TEST_PARAMS = ChunkParams(256, 1024, 4096)
_SELF_TEST_DIGEST = "36cfaa6dcadaca1ff440f98d4ffe9f07bc971d9beb43aa8df8de5b29d44d40dd"


def _self_test_data(size: int) -> bytes:
    return blake3.blake3(b"p2pfs chunker self-test").digest(length=size)


def cut_points_digest(points: list[int]) -> str:
    """BLAKE3 hex digest over cut points encoded as 8-byte little-endian integers."""
    h = blake3.blake3()
    for p in points:
        h.update(p.to_bytes(8, "little"))
    return h.hexdigest()


def self_test() -> None:
    """Check the native scan against the twin and a pinned digest (a few ms)."""
    try:
        gear = list(_fastcdc.gear_table())
        if gear != twin.GEAR_TABLE:
            raise RuntimeError("native gear table differs from its derivation")
        data = _self_test_data(64 * 1024)
        native = cut_points(data, _SELF_TEST_PARAMS)
        pure = twin.cut_points_py(data[:16384], _SELF_TEST_PARAMS)
        if cut_points(data[:16384], _SELF_TEST_PARAMS) != pure:
            raise RuntimeError("native and pure-Python cut points differ")
        if cut_points_digest(native) != _SELF_TEST_DIGEST:
            raise RuntimeError("cut points differ from the pinned digest")
    except RuntimeError as e:
        raise RuntimeError(f"chunker self-test failed: {e}") from None
