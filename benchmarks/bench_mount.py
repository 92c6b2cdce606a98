"""Reads through the mount against bindfs and native reads of the same bytes, in one run.

- first sequential read of a 1 GiB file, not in the kernel's cache: p2pfs vs bindfs (goal 0.9)
- re-read of the same file: p2pfs vs a native read of the file (goal 0.9)
- 4 KiB random reads, one at a time (fio, psync, iodepth 1): p2pfs vs bindfs (goal 0.85),
  and the same with four readers at once
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .common import drop_caches, p2pfs, ratio_line, workdir

MIB = 1024 * 1024


def read_all(path: Path, bs: int = MIB) -> float:
    t0 = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(bs)
        while f.readinto(buf):
            pass
    return time.perf_counter() - t0


def fio_randread(path: Path, jobs: int, seconds: int) -> float:
    proc = subprocess.run(
        [
            "fio",
            "--name=rr",
            f"--filename={path}",
            "--rw=randread",
            "--bs=4k",
            "--ioengine=psync",
            "--iodepth=1",
            f"--numjobs={jobs}",
            "--group_reporting",
            "--time_based",
            f"--runtime={seconds}",
            "--invalidate=1",
            "--readonly",
            "--output-format=json",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return float(json.loads(proc.stdout)["jobs"][0]["read"]["iops"])


def bdi_readahead(mountpoint: Path, kb: int | None = None) -> str:
    dev = os.stat(mountpoint).st_dev
    p = Path(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb")
    try:
        if kb is not None:
            p.write_text(str(kb))
        return p.read_text().strip()
    except OSError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_mount")
    ap.add_argument("--size-mib", type=int, default=1024)
    ap.add_argument("--seconds", type=int, default=10, help="duration of each random-read run")
    args = ap.parse_args(argv)
    for tool in ("bindfs", "fio", "fusermount3"):
        if shutil.which(tool) is None:
            print(f"  skipped: {tool} is not installed (make bench installs it)")
            return 1
    with workdir("mount") as tmp:
        base = Path(tmp)
        data, home, mnt, bmnt = base / "data", base / "home", base / "mnt", base / "bindfs"
        for d in (data, mnt, bmnt):
            d.mkdir()
        big = data / "big.bin"
        with open(big, "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        p2pfs(home, "init")
        p2pfs(home, "volume", "create", "bench")
        p2pfs(home, "import", str(data), "bench")
        p2pfs(home, "mount", str(mnt))
        subprocess.run(["bindfs", "--no-allow-other", str(data), str(bmnt)], check=True)
        try:
            ours = mnt / "bench" / "big.bin"
            theirs = bmnt / "big.bin"
            ra_ours, ra_bind = bdi_readahead(mnt), bdi_readahead(bmnt)
            size = args.size_mib * MIB
            cold = drop_caches()
            t_bind = read_all(theirs)
            drop_caches()
            t_ours = read_all(ours)
            bdi_readahead(bmnt, 1024)
            drop_caches()
            t_bind_ra = read_all(theirs)
            t_native = min(read_all(big) for _ in range(3))
            t_reread = min(read_all(ours) for _ in range(3))
            print(
                f"  file {args.size_mib} MiB; readahead p2pfs {ra_ours} KiB, bindfs {ra_bind} KiB; "
                f"caches dropped: {cold}"
            )
            gbs = lambda t: size / t / 1e9  # noqa: E731
            print(
                f"  reference bindfs first read: {gbs(t_bind):.2f} GB/s "
                f"(with 1 MiB readahead: {gbs(t_bind_ra):.2f} GB/s)"
            )
            print(
                ratio_line(
                    "p2pfs first sequential read vs bindfs", gbs(t_ours), gbs(t_bind), "GB/s", 0.9
                )
            )
            print(
                ratio_line(
                    "  ... vs bindfs with 1 MiB readahead", gbs(t_ours), gbs(t_bind_ra), "GB/s"
                )
            )
            print(f"  reference native re-read: {gbs(t_native):.2f} GB/s")
            print(ratio_line("p2pfs re-read vs native", gbs(t_reread), gbs(t_native), "GB/s", 0.9))
            bdi_readahead(bmnt, int(ra_bind) if ra_bind.isdigit() else 128)
            for jobs in (1, 4):
                iops_bind = fio_randread(theirs, jobs, args.seconds)
                iops_ours = fio_randread(ours, jobs, args.seconds)
                goal = 0.85 if jobs == 1 else None
                print(f"  reference bindfs 4 KiB random reads x{jobs}: {iops_bind:,.0f} IOPS")
                print(
                    ratio_line(
                        f"p2pfs 4 KiB random reads x{jobs}", iops_ours, iops_bind, "IOPS", goal
                    )
                )
        finally:
            subprocess.run(["fusermount3", "-u", "-z", str(bmnt)], check=False)
            subprocess.run(
                [sys.executable, "-m", "p2pfs", "--home", str(home), "umount", str(mnt)],
                check=False,
                capture_output=True,
            )
            if os.path.ismount(mnt):
                subprocess.run(["fusermount3", "-u", "-z", str(mnt)], check=False)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
