"""Writes through the publisher's mount against native writes of the same bytes, in one run.

One node, no network: ``p2pfs init``, ``volume create``, ``mount``; the volume's mount is
writable because this node holds its publisher key (automatic commits are off, so the
commit is timed on its own).

- one large file (1 GiB): sequential 1 MiB writes, fsync, close; p2pfs then ``p2pfs commit``
- many small files (10,000 of 1-16 KiB in 20 directories): create, write, close each, then
  one sync(); p2pfs then ``p2pfs commit``

Each is a ratio against a native write of the same data to a directory on the same disk,
measured in the same run (the same fsync/close/sync points): write+close alone, and
write+close+commit (what it takes until the data is a snapshot peers can follow). The data
is random (generated before the clocks start), so nothing deduplicates. Rounds alternate
native and p2pfs (``--repeat``, default 2); each figure is the best of its rounds.

The small files are also written through bindfs over a directory of the same disk (when
installed), and the bench prints one FUSE round trip (a statfs, which the kernel never
caches) on both mounts: every FUSE file system pays that round trip for each of the five or six
requests a small file costs (lookup, create, getattr, getxattr, write, release), which
bounds any of them against native writes on a machine where a round trip is slow.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .common import p2pfs, ratio_line, workdir

MIB = 1024 * 1024
VOLUME = "bench"


def write_big(path: Path, blocks: list[bytes]) -> float:
    os.sync()
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for block in blocks:
            view = memoryview(block)
            while view:
                view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def write_small(root: Path, files: list[tuple[str, bytes]]) -> float:
    os.sync()
    t0 = time.perf_counter()
    made: set[str] = set()
    for rel, data in files:
        d = rel.rpartition("/")[0]
        if d not in made:
            os.makedirs(root / d, exist_ok=True)
            made.add(d)
        fd = os.open(root / rel, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
    os.sync()
    return time.perf_counter() - t0


def round_trip_us(directory: Path, n: int = 3000) -> float:
    """Microseconds for one FUSE request the kernel cannot answer from its caches: a
    statfs (readlink is not one: bindfs asks the kernel to cache symlinks)."""
    os.statvfs(directory)
    t0 = time.perf_counter()
    for _ in range(n):
        os.statvfs(directory)
    return (time.perf_counter() - t0) / n * 1e6


@contextlib.contextmanager
def bindfs_mount(base: Path) -> Iterator[Path | None]:
    """bindfs over ``base/bind-src`` at ``base/bind-mnt``, or None without bindfs."""
    if shutil.which("bindfs") is None:
        yield None
        return
    src, mnt = base / "bind-src", base / "bind-mnt"
    src.mkdir()
    mnt.mkdir()
    subprocess.run(["bindfs", str(src), str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)


def commit(home: Path) -> tuple[float, dict[str, object]]:
    t0 = time.perf_counter()
    report = json.loads(p2pfs(home, "commit", VOLUME, "--json"))
    elapsed = time.perf_counter() - t0
    if not report.get("changed"):
        raise SystemExit(f"p2pfs commit made no snapshot: {report}")
    return elapsed, report


def small_files(n: int, dirs: int, min_kib: int, max_kib: int) -> list[tuple[str, bytes]]:
    rng = random.Random(5)
    out = []
    for i in range(n):
        size = rng.randint(min_kib * 1024, max_kib * 1024)
        out.append((f"d{i % dirs:02d}/f{i:05d}.bin", os.urandom(size)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_write")
    ap.add_argument("--size-mib", type=int, default=1024, help="size of the large file")
    ap.add_argument("--files", type=int, default=10_000, help="number of small files")
    ap.add_argument("--dirs", type=int, default=20, help="directories the small files are in")
    ap.add_argument("--min-kib", type=int, default=1)
    ap.add_argument("--max-kib", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=2, help="rounds (each figure: the best)")
    args = ap.parse_args(argv)
    if shutil.which("fusermount3") is None:
        print("  skipped: fusermount3 is not installed (make bench installs it)")
        return 1
    blocks = [os.urandom(MIB) for _ in range(args.size_mib)]
    files = small_files(args.files, args.dirs, args.min_kib, args.max_kib)
    small_bytes = sum(len(d) for _, d in files)
    with workdir("write") as tmp:
        base = Path(tmp)
        home, mnt, native, empty = base / "home", base / "mnt", base / "native", base / "empty"
        for d in (mnt, native, empty):
            d.mkdir()
        p2pfs(home, "init")
        # settle_s = 0: no automatic commit runs behind the clock.
        (home / "config.toml").write_text("[publish]\nsettle_s = 0\n")
        p2pfs(home, "volume", "create", VOLUME)
        p2pfs(home, "import", str(empty), VOLUME)
        p2pfs(home, "mount", str(mnt))
        bind_stack = contextlib.ExitStack()
        try:
            bind = bind_stack.enter_context(bindfs_mount(base))
            ours = mnt / VOLUME
            if not os.access(ours, os.W_OK) or not _writable(ours):
                print(f"  skipped: {ours} is not writable (no writable mount in this build)")
                return 1
            size: int = args.size_mib * MIB

            def mbs(seconds: float) -> float:
                return size / seconds / 1e6

            def fps(seconds: float) -> float:
                return len(files) / seconds

            # Rounds alternate native and p2pfs; each figure is the best of its rounds.
            big: dict[str, float] = {}
            small: dict[str, float] = {}
            for r in range(args.repeat):
                t_native = write_big(native / f"big-{r}.bin", blocks)
                best(big, "native", t_native)
                os.unlink(native / f"big-{r}.bin")
                t_write = write_big(ours / f"big-{r}.bin", blocks)
                t_commit, report = commit(home)
                best(big, "write", t_write)
                best(big, "commit", t_commit)
                best(big, "write+commit", t_write + t_commit)
                print(
                    f"  round {r + 1}: large file native {mbs(t_native):.0f} MB/s, "
                    f"p2pfs {mbs(t_write):.0f} MB/s, commit {t_commit:.2f} s "
                    f"(seq {report['seq']})",
                    flush=True,
                )
                prefix = f"small-{r}"
                t_native = write_small(native / prefix, files)
                best(small, "native", t_native)
                shutil.rmtree(native / prefix)
                if bind is not None:
                    best(small, "bindfs", write_small(bind / prefix, files))
                    shutil.rmtree(bind / prefix)
                t_write = write_small(ours / prefix, files)
                t_commit, report = commit(home)
                best(small, "write", t_write)
                best(small, "commit", t_commit)
                best(small, "write+commit", t_write + t_commit)
                print(
                    f"  round {r + 1}: small files native {fps(t_native):,.0f} files/s, "
                    f"p2pfs {fps(t_write):,.0f} files/s, commit {t_commit:.2f} s "
                    f"(seq {report['seq']})",
                    flush=True,
                )
            print(
                f"  large file: {args.size_mib} MiB in 1 MiB writes, fsync, close; "
                f"best of {args.repeat} (commit alone: {big['commit']:.2f} s)"
            )
            print(f"  reference native write: {mbs(big['native']):.0f} MB/s")
            for what, goal in (("write", 0.8), ("write+commit", 0.5)):  # issue 14's goals
                print(
                    ratio_line(
                        f"p2pfs {what.replace('write', 'write+close')} vs native",
                        mbs(big[what]),
                        mbs(big["native"]),
                        "MB/s",
                        goal,
                    )
                )
            print(
                f"  small files: {len(files)} of {args.min_kib}-{args.max_kib} KiB "
                f"({small_bytes / MIB:.0f} MiB) in {args.dirs} directories, each closed, then "
                f"sync; best of {args.repeat} (commit alone: {small['commit']:.2f} s)"
            )
            print(f"  reference native: {fps(small['native']):,.0f} files/s")
            for what, goal in (("write", 0.25), ("write+commit", None)):
                print(
                    ratio_line(
                        f"p2pfs small files {what.replace('write', 'write+close')} vs native",
                        fps(small[what]),
                        fps(small["native"]),
                        "files/s",
                        goal,
                    )
                )
            if bind is not None:
                print(f"  bindfs (same files, same disk): {fps(small['bindfs']):,.0f} files/s")
                print(
                    ratio_line(
                        "p2pfs small files write+close vs bindfs",
                        fps(small["write"]),
                        fps(small["bindfs"]),
                        "files/s",
                    )
                )
                print(
                    f"  one FUSE round trip (statfs): p2pfs {round_trip_us(ours):.0f} us, "
                    f"bindfs {round_trip_us(bind):.0f} us"
                )
        finally:
            bind_stack.close()
            subprocess.run(
                [sys.executable, "-m", "p2pfs", "--home", str(home), "umount", str(mnt)],
                check=False,
                capture_output=True,
            )
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    return 0


def best(results: dict[str, float], key: str, seconds: float) -> None:
    results[key] = min(results.get(key, float("inf")), seconds)


def _writable(root: Path) -> bool:
    probe = root / ".bench-write-probe"
    try:
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
