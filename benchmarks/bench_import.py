"""Import of 10,000 small files (files/s) and reimport of the unchanged tree (s).

Reference, measured in the same run: ``tar -c`` of the same tree piped to /dev/null,
which reads every file once and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import time
from pathlib import Path

from .common import p2pfs, ratio_line, workdir


def make_files(root: Path, count: int) -> int:
    rng = random.Random(10_000)
    total = 0
    for i in range(count):
        d = root / f"d{i // 500:03d}"
        d.mkdir(parents=True, exist_ok=True)
        data = rng.randbytes(rng.randint(100, 16_000))
        (d / f"f{i:05d}").write_bytes(data)
        total += len(data)
    old = time.time() - 3600  # older than the files cache's grace period
    for p in root.rglob("*"):
        os.utime(p, (old, old))
    return total


def import_on_tmpfs(mnt: Path, src: Path) -> float | None:
    """Seconds to import ``src`` into a store on tmpfs: p2pfs's own cost, without the
    disk file system's inode allocation (docs/performance.md: on an ext4 without a
    journal, every new inode skips the ones freed in the last minute, one by one)."""
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1g", "tmpfs", str(mnt)]).returncode:
        return None
    try:
        home = mnt / "home"
        p2pfs(home, "init")
        p2pfs(home, "volume", "create", "small")
        t0 = time.perf_counter()
        p2pfs(home, "import", str(src), "small", "--json")
        return time.perf_counter() - t0
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_import")
    ap.add_argument("--files", type=int, default=10_000)
    args = ap.parse_args(argv)
    with workdir("import") as tmp:
        base = Path(tmp)
        src, home = base / "src", base / "home"
        total = make_files(src, args.files)
        os.sync()
        t0 = time.perf_counter()
        # Through a pipe: GNU tar skips reading files when it writes straight to /dev/null.
        subprocess.run(f"tar -cf - -C '{src}' . | cat > /dev/null", shell=True, check=True)
        t_tar = time.perf_counter() - t0
        p2pfs(home, "init")
        p2pfs(home, "volume", "create", "small")
        t0 = time.perf_counter()
        first = json.loads(p2pfs(home, "import", str(src), "small", "--json"))
        t_import = time.perf_counter() - t0
        t0 = time.perf_counter()
        again = json.loads(p2pfs(home, "import", str(src), "small", "--json"))
        t_reimport = time.perf_counter() - t0
        t_tmpfs = import_on_tmpfs(base / "tmpfs", src)
    print(f"  {args.files} small files, {total / 1e6:.1f} MB")
    print(f"  reference tar -c > /dev/null: {args.files / t_tar:,.0f} files/s")
    print(
        f"  import: {t_import:.2f} s, {args.files / t_import:,.0f} files/s; "
        f"new chunks {first['new_chunks']}"
    )
    print(
        ratio_line(
            f"import of {args.files} small files vs tar -c",
            args.files / t_import,
            args.files / t_tar,
            "files/s",
            0.25,  # issue 14's goal
        )
    )
    if t_tmpfs is None:
        print("  (the same with the store on tmpfs: not measured, mounting a tmpfs needs root)")
    else:
        print(
            f"  the same with the store on tmpfs (no inode allocation on disk): "
            f"{args.files / t_tmpfs:,.0f} files/s, {t_tmpfs / t_import:.2f} of the time on disk"
        )
    print(
        f"  reimport unchanged: {t_reimport:.2f} s, {again['reused_files']} files skipped by stat, "
        f"{again['new_chunks']} new chunks"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
