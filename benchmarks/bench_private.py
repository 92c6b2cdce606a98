"""A private volume against a public one: import and first read of the same 1 GiB tree.

Both volumes live on one admin node, are imported from the same tree and read back
through the same read-only mount, in the same run. The private one seals every chunk,
blob and tree (AES-256-GCM, a second BLAKE3 pass over the ciphertext) and opens each
chunk as it is read. Goal: private/public >= 0.85 for both (throughput ratios).

The first read is of the store, not of memory: the page cache is dropped (root) and
each volume is read by a freshly started daemon, so its chunk cache is empty.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import drop_caches, p2pfs, ratio_line, workdir

MIB = 1024 * 1024
GOAL = 0.85


def make_tree(root: Path, total: int) -> int:
    """Files from 64 KiB to 64 MiB, incompressible, ``total`` bytes in all."""
    rng = random.Random(1)
    made, i = 0, 0
    sizes = [64 * 1024, MIB, 8 * MIB, 64 * MIB]
    while made < total:
        size = min(sizes[i % len(sizes)], total - made)
        d = root / f"d{i % 8}"
        d.mkdir(parents=True, exist_ok=True)
        with open(d / f"f{i:04d}", "wb") as f:
            left = size
            while left:  # random bytes: nothing dedups, nothing compresses
                n = min(left, MIB)
                f.write(rng.randbytes(n))
                left -= n
        made += size
        i += 1
    return made


def read_all(root: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(root):
        for name in files:
            with open(os.path.join(dirpath, name), "rb", buffering=0) as f:
                while chunk := f.read(4 * MIB):
                    total += len(chunk)
    return total


def first_read(home: Path, mnt: Path, volume: str) -> float:
    p2pfs(home, "mount", str(mnt), "--read-only")
    try:
        drop_caches()
        t0 = time.perf_counter()
        read_all(mnt / volume)
        return time.perf_counter() - t0
    finally:
        subprocess.run(
            [sys.executable, "-m", "p2pfs", "--home", str(home), "umount", str(mnt)],
            capture_output=True,
        )
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_private")
    ap.add_argument("--mib", type=int, default=1024, help="size of the tree (MiB)")
    ap.add_argument("--runs", type=int, default=3, help="alternating runs of each")
    args = ap.parse_args(argv)
    with workdir("private") as tmp:
        base = Path(tmp)
        src, mnt = base / "src", base / "mnt"
        total = make_tree(src, args.mib * MIB)
        mnt.mkdir()
        imports: dict[str, list[float]] = {"public": [], "private": []}
        reads: dict[str, list[float]] = {"public": [], "private": []}
        for run in range(args.runs):
            for kind in ("public", "private"):  # alternating: drift hits both alike
                # A fresh node each time: a second public import into the same store
                # would dedup against the first and measure nothing.
                home = base / f"{kind}{run}"
                p2pfs(home, "init")
                p2pfs(home, "estate", "init")
                p2pfs(home, "volume", "create", "v", *(["--private"] if kind == "private" else []))
                drop_caches()
                t0 = time.perf_counter()
                p2pfs(home, "import", str(src), "v")
                imports[kind].append(time.perf_counter() - t0)
                reads[kind].append(first_read(home, mnt, "v"))
                shutil.rmtree(home)
                os.sync()  # the freed gigabyte written back before the next one is timed
    gb = total / 1e9
    print(f"  tree: {total / MIB:.0f} MiB in files of 64 KiB .. 64 MiB; best of {args.runs}")
    for label, times in (("import", imports), ("first read through the mount", reads)):
        public, private = min(times["public"]), min(times["private"])
        each = ", ".join(
            f"{kind} {' '.join(f'{t:.2f}' for t in times[kind])} s"
            for kind in ("public", "private")
        )
        print(f"  {label}: public {gb / public:.2f} GB/s, private {gb / private:.2f} GB/s ({each})")
        print(ratio_line(f"{label}, private/public", gb / private, gb / public, "GB/s", GOAL))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
