"""The estate in the lab: fan-out from one origin, and one peer against nginx.

1. Fan-out: a volume (256 MiB) from one origin to N = 1, 2, 4, 8 desktops, every
   host's link shaped to 100 Mbit/s, all desktops reading at once: time until each
   has read every byte, and how many copies the origin sent. Baseline in the same
   run: the same with peer fetching off (every desktop asks only the origin).
   Goals: the origin sends at most 1.2 copies at N = 8; N = 8 completes within
   1.5x the time of N = 1.
2. One peer, unshaped link: a cold read of a 1 GiB file through B's mount from A,
   against curl fetching the same file from nginx on A over the same link (goal
   at least 0.5), and against Syncthing sending it from A to B once A has hashed it
   (goal at least 1.0; a missed row naming why when syncthing is not installed).
   Beside them, for admins choosing chunk sizes: the same file read from a volume cut
   into 1 MiB chunks on average (``volume create --avg-chunk 1M``), not 256 KiB.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import threading
import time
from pathlib import Path

from p2pfs.lab.estate import EstateLab, Node, wait_until_meshed
from p2pfs.lab.netns import Lab, lab_unavailable

from . import syncthing
from .common import drop_caches, ratio_line, unmeasured_line, workdir

MIB = 1024 * 1024
# The chunk sizes an admin can give a volume of large files (VM images, data sets):
# four times fewer chunks to ask for, verify and store per byte.
BIG_CHUNKS = ("--min-chunk", "256K", "--avg-chunk", "1M", "--max-chunk", "4M")
BIG_CHUNKS_VOLUME = "big-chunks"


def make_volume(root: Path, size_mib: int, files: int = 4) -> None:
    root.mkdir(parents=True)
    per = size_mib // files
    for i in range(files):
        with open(root / f"part-{i}.bin", "wb") as f:
            for _ in range(per):
                f.write(os.urandom(MIB))


def read_tree(path: Path) -> int:
    total = 0
    buf = bytearray(MIB)
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(buf):
                    total += n
    return total


def start_estate(
    lab: Lab,
    work: Path,
    n_desktops: int,
    src: Path,
    *,
    big_chunks: bool = False,
    **network: object,
) -> EstateLab:
    """``big_chunks``: ``src`` is also published as the volume BIG_CHUNKS_VOLUME, cut
    into 1 MiB chunks on average instead of the default 256 KiB."""
    estate = EstateLab(lab, work)
    for i, host in enumerate(lab.hosts[: n_desktops + 1]):
        node = estate.add_node("origin" if i == 0 else f"d{i}", host)
        node.configure(network=network)
    estate.publish(src)
    if big_chunks:
        estate.admin.cli("volume", "create", BIG_CHUNKS_VOLUME, *BIG_CHUNKS)
        estate.publish(src, BIG_CHUNKS_VOLUME)
    for node in estate.nodes:
        node.start()
    wait_until_meshed(estate.nodes, timeout=120)
    if big_chunks:
        wait_until_meshed(estate.nodes, BIG_CHUNKS_VOLUME, timeout=120)
    return estate


def fan_out(
    work: Path, src: Path, size: int, n: int, peer_fetch: bool, mbit: float
) -> tuple[float, float]:
    with Lab(n + 1) as lab:
        for host in lab.hosts:
            host.shape(mbit)
        estate = start_estate(lab, work, n, src, peer_fetch=peer_fetch)
        try:
            desktops = estate.nodes[1:]
            errors: list[BaseException] = []

            def read(node: Node) -> None:
                try:
                    got = read_tree(node.mountpoint / "tools")
                    assert got == size, (got, size)
                except BaseException as e:
                    errors.append(e)

            t0 = time.perf_counter()
            threads = [threading.Thread(target=read, args=(d,)) for d in desktops]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            if errors:
                raise errors[0]
            served = estate.admin.status()["bytes_served"]
            return elapsed, served / size
        finally:
            estate.stop_all()


def one_peer(work: Path, size_mib: int) -> tuple[float, float, float | None, float]:
    src = work / "big"
    src.mkdir()
    with open(src / "big.bin", "wb") as f:
        for _ in range(size_mib):
            f.write(os.urandom(MIB))
    with Lab(2) as lab:
        estate = start_estate(lab, work / "estate1", 1, src, big_chunks=True)
        a, b = estate.nodes
        conf = work / "nginx.conf"
        conf.write_text(
            # user root: the benchmark's work directory is private (0700).
            f"user root; daemon off; pid {work}/nginx.pid; error_log {work}/nginx.err;\n"
            "events {}\n"
            f"http {{ access_log off; sendfile on; server {{ listen {a.address}:8080; "
            f"root {src}; }} }}\n"
        )
        nginx = a.host.popen(["nginx", "-c", str(conf)])
        try:
            time.sleep(1)
            drop_caches()
            curl = b.host.run(
                [
                    "curl",
                    "-sSf",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{time_total}",
                    f"http://{a.address}:8080/big.bin",
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            t_curl = float(curl.stdout)
            drop_caches()
            t0 = time.perf_counter()
            got = read_tree(b.mountpoint / "tools")
            t_p2p = time.perf_counter() - t0
            assert got == size_mib * MIB
            drop_caches()
            t0 = time.perf_counter()
            got = read_tree(b.mountpoint / BIG_CHUNKS_VOLUME)
            t_big = time.perf_counter() - t0
            assert got == size_mib * MIB
        finally:
            nginx.terminate()
            nginx.wait()
            estate.stop_all()
        t_sync = None
        if shutil.which("syncthing"):
            t_sync = syncthing.transfer_seconds(a.host, b.host, work / "syncthing", src)
        return t_p2p, t_curl, t_sync, t_big


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_estate")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--big-mib", type=int, default=1024)
    parser.add_argument("--mbit", type=float, default=100)
    parser.add_argument("--ns", default="1,2,4,8")
    parser.add_argument("--no-baseline", action="store_true", help="skip the origin-only runs")
    parser.add_argument("--no-nginx", action="store_true", help="skip the one-peer comparison")
    args = parser.parse_args(argv)
    reason = lab_unavailable()
    if reason:
        print(f"  skipped: the lab is unavailable ({reason})")
        return 1
    if shutil.which("nginx") is None or shutil.which("curl") is None:
        print("  nginx and curl are needed (make bench installs them)")
        return 1
    size = args.size_mib * MIB
    ns = [int(x) for x in args.ns.split(",")]
    with workdir("estate") as tmp:
        work = Path(tmp)
        src = work / "volume"
        make_volume(src, args.size_mib)
        print(f"fan-out of a {args.size_mib} MiB volume, every link shaped to {args.mbit:g} Mbit/s")
        print(
            f"  {'N':>3} {'p2p time s':>11} {'origin copies':>14} {'baseline s':>11} {'baseline copies':>16}"
        )
        results = {}
        for n in ns:
            t, copies = fan_out(work / f"p{n}", src, size, n, True, args.mbit)
            tb, copies_b = (
                fan_out(work / f"b{n}", src, size, n, False, args.mbit)
                if not args.no_baseline
                else (float("nan"), float("nan"))
            )
            results[n] = (t, copies)
            print(f"  {n:>3} {t:>11.1f} {copies:>14.2f} {tb:>11.1f} {copies_b:>16.2f}", flush=True)
        if 1 in results and max(ns) in results:
            top = max(ns)
            t1, tn = results[1][0], results[top][0]
            copies = results[top][1]
            print(
                f"  origin copies at N={top}: {copies:.2f} (goal <= 1.2: "
                f"{'met' if copies <= 1.2 else 'MISSED'}); time N={top} / N=1: {tn / t1:.2f} "
                f"(goal <= 1.5: {'met' if tn / t1 <= 1.5 else 'MISSED'})"
            )
        if args.no_nginx:
            return 0
        print(f"one peer, unshaped link: cold read of a {args.big_mib} MiB file")
        t_p2p, t_curl, t_sync, t_big = one_peer(work, args.big_mib)
        mb = args.big_mib * MIB / 1e6
        print(
            ratio_line(
                "cold read from one LAN peer vs curl from nginx",
                mb / t_p2p,
                mb / t_curl,
                "MB/s",
                0.5,
            )
        )
        if t_sync is None:
            print(
                unmeasured_line(
                    "1 GiB from a LAN peer vs Syncthing",
                    ">= 1.00",
                    "syncthing not installed (Debian package syncthing)",
                )
            )
        else:
            print(
                ratio_line(
                    "1 GiB from a LAN peer vs Syncthing", mb / t_p2p, mb / t_sync, "MB/s", 1.0
                )
            )
        print(
            f"  the same file in a volume of 1 MiB chunks (volume create {' '.join(BIG_CHUNKS)}): "
            f"{mb / t_big:.0f} MB/s, {t_p2p / t_big:.2f}x the default's"
            + (f", {t_sync / t_big:.2f} of Syncthing's" if t_sync else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
