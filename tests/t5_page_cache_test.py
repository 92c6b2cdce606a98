"""A random read hands the verified chunk it touched to the kernel's page cache, through
a real mount: the next reads in that chunk never reach the daemon, and every byte is
the source's (docs/architecture.md, "Random reads")."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from harness import mounted, run_cli

from p2pfs.chunking.chunker import chunk_file
from p2pfs.chunking.params import ChunkParams

pytestmark = pytest.mark.mount
PAGE = os.sysconf("SC_PAGE_SIZE")
MIB = 1024 * 1024


def _fuse(home: Path) -> dict[str, int]:
    status = json.loads(run_cli(home, "status", "--json", check=True).stdout)["fuse_requests"]
    return {"reads": status["calls"].get("read", 0), "pushed": status["page_cache_pushed_bytes"]}


def _pushed_at_least(home: Path, n: int) -> dict[str, int]:
    for _ in range(50):
        now = _fuse(home)
        if now["pushed"] >= n:
            return now
        time.sleep(0.1)
    pytest.fail(f"the page cache was handed {now['pushed']} bytes, not {n}")


def _pages_inside(start: int, stop: int, size: int) -> tuple[int, int]:
    first = -(-start // PAGE) * PAGE
    return first, stop if stop == size else stop // PAGE * PAGE


def test_a_random_read_hands_its_chunk_to_the_page_cache(home: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(13 * MIB + 1234)  # the last page is partial
    (src / "db.bin").write_bytes(data)
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(src), "tools", check=True)
    chunks = chunk_file(src / "db.bin", ChunkParams())
    # A chunk far from the start (a read there is not sequential) with whole pages inside.
    mid = next(c for c in chunks if c.offset > 5 * MIB and c.length >= 16 * PAGE)
    last = chunks[-1]
    with mounted(home, tmp_path / "mnt", read_only=True) as mp:
        fd = os.open(mp / "tools" / "db.bin", os.O_RDONLY)
        try:
            first, end = _pages_inside(mid.offset, mid.offset + mid.length, len(data))
            page = first + PAGE * ((end - first) // PAGE // 2)
            before = _fuse(home)
            assert os.pread(fd, 100, page + 7) == data[page + 7 : page + 107]
            after = _pushed_at_least(home, before["pushed"] + end - first)
            assert after["pushed"] == before["pushed"] + end - first  # that chunk, whole pages

            # Every other page inside the chunk: from the page cache, the source's bytes.
            for off in range(first, end, PAGE):
                assert os.pread(fd, PAGE, off) == data[off : off + PAGE], off
            assert _fuse(home)["reads"] == after["reads"]

            # Pages the kernel dropped come back through the daemon, which hands the
            # chunk over again (after a second: concurrent readers do not each hand it).
            # A read at the start first, so that the next one is not sequential.
            time.sleep(1.1)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            assert os.pread(fd, PAGE, 0) == data[:PAGE]
            assert os.pread(fd, PAGE, first) == data[first : first + PAGE]
            again = _pushed_at_least(home, after["pushed"] + end - first)
            assert again["reads"] > after["reads"]

            # The last chunk: its partial last page is handed over too (it ends the file).
            lfirst, lend = _pages_inside(last.offset, len(data), len(data))
            assert lend == len(data) and lend % PAGE
            tail = os.pread(fd, 2 * PAGE, len(data) - 1000)
            assert tail == data[-1000:]
            done = _pushed_at_least(home, again["pushed"] + lend - lfirst)
            assert os.pread(fd, PAGE, lend - lend % PAGE) == data[lend - lend % PAGE :]
            assert _fuse(home)["reads"] == done["reads"]
        finally:
            os.close(fd)
        # Whatever came from where: the whole file is the source's.
        assert (mp / "tools" / "db.bin").read_bytes() == data
