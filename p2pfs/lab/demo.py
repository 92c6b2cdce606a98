"""``make demo``: a generated sample tree published, then read through an estate.

Part 1: one node imports the tree, mounts it and reads it back.
Part 2: a small estate in the lab (network namespaces on this machine, real
mDNS, mutual TLS, FUSE mounts): host ``a`` is the admin and origin; desktops
``b``, ``c`` and ``d`` enrol, find each other, and read the whole volume through
their mounts, ``c`` and ``d`` at the same time, getting most bytes from peers.
Everything runs through the real ``p2pfs`` command, in ``./demo-run`` (removed
and recreated each time, so the demo is idempotent).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from p2pfs.ids import content_id

WORK = Path(os.environ.get("P2PFS_DEMO_DIR", "demo-run")).absolute()

if TYPE_CHECKING:
    from .estate import Node


def p2pfs(home: Path, *args: str) -> str:
    cmd = [sys.executable, "-m", "p2pfs", "--home", str(home), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"demo: `p2pfs {' '.join(args)}` failed:\n{proc.stderr}")
    return proc.stdout


def make_tree(root: Path, seed: int = 2026) -> None:
    """Software-like tree: nested dirs, shared libraries copied around, a big image, links."""
    rng = random.Random(seed)
    root.mkdir(parents=True)
    shared = [rng.randbytes(rng.randint(1, 600_000)) for _ in range(8)]
    for app in ["editor", "compiler", "viewer", "données-ü"]:
        for sub in ["bin", "lib", "share/doc", "share/icons"]:
            d = root / app / sub
            d.mkdir(parents=True)
            for i in range(rng.randint(5, 20)):
                f = d / f"file-{i:03d}.dat"
                data = (
                    rng.choice(shared)
                    if rng.random() < 0.3
                    else rng.randbytes(rng.randint(0, 300_000))
                )
                f.write_bytes(data)
                os.chmod(f, rng.choice([0o644, 0o755, 0o600, 0o444]))
        (root / app / "bin" / "run").symlink_to("file-000.dat")
    (root / "empty").write_bytes(b"")
    (root / "images").mkdir()
    image = bytearray()
    for _ in range(48):
        image += rng.randbytes(1 << 20)
    (root / "images" / "disk.img").write_bytes(image)
    # A copy with one byte changed: content-defined chunking shares all but a chunk or two.
    image[10_000_000] ^= 0xFF
    (root / "images" / "disk-patched.img").write_bytes(image)
    # Released software has old mtimes; files changed in the last moments before an
    # import are re-read every time (they may still be being written).
    for i, path in enumerate(sorted(root.rglob("*"), reverse=True)):
        t = 1_700_000_000 + i * 3_600
        os.utime(path, (t, t), follow_symlinks=False)


def walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames + filenames):
            yield Path(dirpath) / name


def compare(src: Path, mnt: Path) -> tuple[int, int, list[str]]:
    files = nbytes = 0
    problems = []
    for s in walk(src):
        rel = s.relative_to(src)
        m = mnt / rel
        ss, ms = os.lstat(s), os.lstat(m)
        if stat.S_IFMT(ss.st_mode) != stat.S_IFMT(ms.st_mode) or stat.S_IMODE(
            ss.st_mode
        ) != stat.S_IMODE(ms.st_mode):
            problems.append(f"{rel}: mode {oct(ss.st_mode)} came out as {oct(ms.st_mode)}")
        if stat.S_ISLNK(ss.st_mode):
            if os.readlink(s) != os.readlink(m):
                problems.append(f"{rel}: link target differs")
        elif stat.S_ISREG(ss.st_mode):
            if ss.st_mtime_ns != ms.st_mtime_ns:
                problems.append(f"{rel}: mtime differs")
            a = content_id(s.read_bytes())
            b = content_id(m.read_bytes())
            if a != b:
                problems.append(f"{rel}: content differs")
            files += 1
            nbytes += ss.st_size
    return files, nbytes, problems


@contextlib.contextmanager
def mounted(home: Path, mnt: Path) -> Iterator[None]:
    p2pfs(home, "mount", str(mnt))
    try:
        yield
    finally:
        subprocess.run(
            [sys.executable, "-m", "p2pfs", "--home", str(home), "umount", str(mnt)],
            capture_output=True,
        )
        if os.path.ismount(mnt):
            subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)


def cleanup() -> None:
    mnt = WORK / "mnt"
    if os.path.ismount(mnt):
        subprocess.run(
            [sys.executable, "-m", "p2pfs", "--home", str(WORK / "admin"), "umount", str(mnt)],
            capture_output=True,
        )
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
    shutil.rmtree(WORK, ignore_errors=True)


def main() -> int:
    cleanup()
    home, src, mnt = WORK / "admin", WORK / "tools-tree", WORK / "mnt"
    print(f"p2pfs demo in {WORK}")
    make_tree(src)
    mnt.mkdir()
    print(p2pfs(home, "init").strip())
    vid = p2pfs(home, "volume", "create", "tools").strip()
    print(f"volume tools: {vid}")
    t0 = time.perf_counter()
    report = json.loads(p2pfs(home, "import", str(src), "tools", "--json"))
    dt = time.perf_counter() - t0
    print(
        f"imported {report['files']} files, {report['bytes'] / 1e6:.1f} MB in {dt:.2f} s: "
        f"{report['new_chunks']} new chunks, dedup ratio {report['dedup_ratio']:.2f}"
    )
    again = json.loads(p2pfs(home, "import", str(src), "tools", "--json"))
    print(
        f"reimport of the unchanged tree: {again['reused_files']} files skipped by stat, "
        f"{again['new_chunks']} new chunks"
    )
    with mounted(home, mnt):
        t0 = time.perf_counter()
        files, nbytes, problems = compare(src, mnt / "tools")
        dt = time.perf_counter() - t0
        status = json.loads(p2pfs(home, "status", "--json"))
    print(
        f"read back {files} files, {nbytes / 1e6:.1f} MB through the mount in {dt:.2f} s "
        "(both trees hashed)"
    )
    print(
        f"status: {status['store']['chunks']} chunks stored, "
        f"{status['bytes_from']['local'] / 1e6:.1f} MB verified from the local store, "
        f"corrupt chunks: {status['store']['corrupt_chunks']}"
    )
    if problems:
        print("MISMATCHES:")
        for p in problems:
            print(f"  {p}")
        return 1
    print("every file, mode, mtime and link came out as it went in")
    return estate_demo(src)


def estate_demo(src: Path) -> int:
    from concurrent.futures import ThreadPoolExecutor

    from .estate import estate_lab, wait_until_meshed
    from .netns import lab_unavailable

    reason = lab_unavailable()
    if reason:
        print(f"part 2 (an estate of 4 hosts) needs the lab: {reason}")
        return 1
    print("\npart 2: an estate of 4 hosts in network namespaces (a = admin and origin)")
    with estate_lab(WORK / "estate", ["a", "b", "c", "d"]) as lab:
        t0 = time.perf_counter()
        lab.publish(src)
        for node in lab.nodes:
            node.start()
        wait_until_meshed(lab.nodes)
        print(
            f"enrolled 3 desktops; all found each other by mDNS in {time.perf_counter() - t0:.1f} s"
        )
        b, c, d = lab.nodes[1:]
        t0 = time.perf_counter()
        _, nbytes, problems = compare(src, b.mountpoint / "tools")
        print(f"b read {nbytes / 1e6:.1f} MB in {time.perf_counter() - t0:.2f} s")
        t0 = time.perf_counter()
        with ThreadPoolExecutor(2) as pool:
            results = list(pool.map(lambda n: compare(src, n.mountpoint / "tools"), (c, d)))
        print(f"c and d read it at the same time in {time.perf_counter() - t0:.2f} s")
        for _, _, more in results:
            problems += more
        print(f"\n{'host':<6}{'from peers':>14}{'from origin':>14}{'served':>14}  (MB)")
        for node in lab.nodes:
            st = node.status()
            fb = st["bytes_from"]
            print(
                f"{node.name:<6}{fb['peers'] / 1e6:>14.1f}{fb['origin'] / 1e6:>14.1f}"
                f"{st['bytes_served'] / 1e6:>14.1f}"
            )
        corrupt = sum(n.status()["corrupt_chunks_rejected"] for n in lab.nodes)
        first = b.status()["bytes_from"]  # b started cold: all it fetched is one copy
        copies = lab.admin.status()["bytes_served"] / max(1, first["origin"] + first["peers"])
        print(
            f"corrupt chunks rejected: {corrupt}; the origin served {copies:.2f} copies of the data"
        )
        problems += live_demo(lab.admin, [b, c, d])
    if problems:
        print("MISMATCHES:")
        for p in problems:
            print(f"  {p}")
        return 1
    print("every desktop read every byte correctly, mostly from its peers: demo OK")
    return 0


def live_demo(a: Node, desktops: list[Node]) -> list[str]:
    """The publisher writes through its mount and commits; the desktops switch to it."""
    from .estate import wait_for

    note = b"tools 2.0: written on a through its mount\n"
    (a.mountpoint / "tools" / "RELEASE-NOTES").write_bytes(note)
    t0 = time.perf_counter()
    commit = json.loads(p2pfs(a.home, "commit", "tools", "--json"))
    seen = []
    for node in desktops:
        path = node.mountpoint / "tools" / "RELEASE-NOTES"

        def arrived(path: Path = path) -> bool:
            return path.read_bytes() == note

        try:
            wait_for(f"{node.name} to see the commit", arrived)
        except TimeoutError as e:
            return [str(e)]
        seen.append(time.perf_counter() - t0)
    print(
        f"\na wrote RELEASE-NOTES through its mount and committed snapshot {commit['seq']}: "
        f"b, c, d showed it after {', '.join(f'{s:.2f}' for s in seen)} s"
    )
    return []


if __name__ == "__main__":
    sys.exit(main())
