"""Chunk + hash throughput of ``chunk_file`` against ``b3sum --num-threads 1``.

A random file (1 GiB by default) is written under the bench dir and read once so
it sits in the page cache; then each contender runs best of 3. Goals (issue):
chunk_file(threads=1) >= 0.40 of b3sum on one core, threads=2 >= 0.70.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

from benchmarks.common import best_of, ratio_line, workdir
from p2pfs.chunking.chunker import chunk_file, cut_points
from p2pfs.chunking.params import ChunkParams, ChunkRecord

GOAL_ONE = 0.45  # issue 14
GOAL_TWO = 0.8


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
    return status


if __name__ == "__main__":
    raise SystemExit(main())
