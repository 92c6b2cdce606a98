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
    print(
        f"  reimport unchanged: {t_reimport:.2f} s, {again['reused_files']} files skipped by stat, "
        f"{again['new_chunks']} new chunks"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
