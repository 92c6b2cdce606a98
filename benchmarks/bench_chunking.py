"""Chunk + hash throughput of ``chunk_file`` against ``b3sum --num-threads 1``, and
``p2pfs import`` of the same file against ``casync make``.

A random file (1 GiB by default) is written under the bench dir and read once so
it sits in the page cache; then each contender runs best of 3. Goals (issue 14):
chunk_file(threads=1) >= 0.45 of b3sum on one core, threads=2 >= 0.8; the import,
which chunks, hashes and writes a chunk store, stays ahead of casync doing the same
with its defaults (Debian package casync; its chunks are zstd-compressed SHA-512/256).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import time
from pathlib import Path

from benchmarks.common import best_of, p2pfs, ratio_line, unmeasured_line, workdir
from p2pfs.chunking.chunker import chunk_file, cut_points
from p2pfs.chunking.params import ChunkParams, ChunkRecord

GOAL_ONE = 0.45  # issue 14
GOAL_TWO = 0.8
GOAL_CASYNC = 1.0  # "keep ahead"


def _make_file(path: Path, size: int) -> None:
    block = 8 * 1024 * 1024
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(block, left)
            f.write(os.urandom(n))
            left -= n


def _warm(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 * 1024 * 1024)
        while f.readinto(buf):
            pass


def _scan_rate(path: Path, n: int, params: ChunkParams, repeat: int) -> float:
    with open(path, "rb") as f:
        data = f.read(n)
    return n / best_of(repeat, lambda: cut_points(data, params)) / 1e9


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_chunking")
    parser.add_argument("--size-mib", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    size = args.size_mib * 1024 * 1024
    params = ChunkParams()
    b3sum = shutil.which("b3sum")

    with workdir("chunking") as tmp:
        path = Path(tmp) / "random.bin"
        _make_file(path, size)
        _warm(path)
        print(f"  file: {size / 2**20:.0f} MiB random, in page cache; params {params.to_dict()}")

        # The scan alone, in memory (no reads, no hashing), for reference.
        scan = _scan_rate(path, min(size, 256 * 1024 * 1024), params, args.repeat)
        print(f"  cut_points (scan only, in memory): {scan:.3f} GB/s")

        ref = 0.0
        if b3sum:
            t = best_of(
                args.repeat,
                lambda: subprocess.run(
                    [b3sum, "--num-threads", "1", str(path)], check=True, capture_output=True
                ),
            )
            ref = size / t / 1e9
            print(f"  b3sum --num-threads 1: {ref:.3f} GB/s")
        else:
            print("  b3sum not installed (Debian package b3sum): no reference")

        status = 0
        results: dict[int, list[ChunkRecord]] = {}
        for threads, goal in ((1, GOAL_ONE), (2, GOAL_TWO)):

            def run(threads: int = threads) -> None:
                results[threads] = chunk_file(path, params, threads=threads)

            rate = size / best_of(args.repeat, run) / 1e9
            label = f"chunk_file(threads={threads}) chunk+hash"
            if ref:
                print(ratio_line(label, rate, ref, "GB/s", goal))  # a miss is reported, not fatal
            else:
                print(f"  {label}: {rate:.3f} GB/s")
        n = len(results[1])
        print(f"  chunks: {n} (mean {size / max(n, 1) / 1024:.0f} KiB)")
        if results[1] != results[2]:
            print("  ERROR: threads=1 and threads=2 disagree")
            status = 1
        _versus_casync(Path(tmp), path, size, args.repeat)
    return status


def _versus_casync(tmp: Path, path: Path, size: int, repeat: int) -> None:
    """Each contender builds a fresh store from the same cached file, best of ``repeat``."""
    casync = shutil.which("casync")
    if casync is None:
        print(
            unmeasured_line(
                "p2pfs import vs casync make",
                ">= 1.00",
                "casync not installed (Debian package casync)",
            )
        )
        return
    src = tmp / "src"
    src.mkdir()
    os.link(path, src / path.name)

    def casync_make() -> None:
        shutil.rmtree(tmp / "castore", ignore_errors=True)
        subprocess.run(
            [casync, "make", f"--store={tmp / 'castore'}", str(tmp / "file.caibx"), str(path)],
            check=True,
            capture_output=True,
        )

    def p2pfs_import() -> float:
        home = tmp / "home"
        shutil.rmtree(home, ignore_errors=True)
        p2pfs(home, "init")
        p2pfs(home, "volume", "create", "big")
        t0 = time.perf_counter()
        p2pfs(home, "import", str(src), "big")
        return time.perf_counter() - t0

    ref = size / best_of(repeat, casync_make) / 1e9
    print(f"  casync make (defaults): {ref:.3f} GB/s")
    rate = size / min(p2pfs_import() for _ in range(repeat)) / 1e9
    print(ratio_line("p2pfs import vs casync make", rate, ref, "GB/s", GOAL_CASYNC))


if __name__ == "__main__":
    raise SystemExit(main())
