"""Three sites with an S3 origin (moto's server in the lab's cloud), the publisher gone:
origin copies per site and completion time, against the same run with origin-only
fetching (``[network] peer_fetch = false``: every desktop asks only the origin).

Every desktop reads the same file at once. Copies are what the S3 host sent (its
link's counter) and what entered each site over its shaped uplink, in copies of the
file. Goal: about one copy per site with peers (the site's home fetches a chunk once),
against one per desktop without; completion no slower than origin-only.
"""

from __future__ import annotations

import argparse
import random
import sys
import threading
import time
from pathlib import Path

from p2pfs.lab.netns import lab_unavailable
from p2pfs.lab.origin_estate import OriginEstate, origin_estate

from .common import workdir

MIB = 1024 * 1024


def _read(path: Path) -> None:
    buf = bytearray(MIB)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buf):
            pass


def run(
    work: Path, tree: Path, sites: dict[str, int], mbit: float, peers: bool
) -> tuple[float, float, dict[str, float]]:
    size = (tree / "image.bin").stat().st_size
    with origin_estate(work, tree, sites, uplink_mbit=mbit, peer_fetch=peers, deadline_s=10) as w:
        return measure(w, size)


def measure(w: OriginEstate, size: int) -> tuple[float, float, dict[str, float]]:
    desktops = [n for nodes in w.desktops.values() for n in nodes]
    before = w.origin_sent()
    into = {s: w.lab.uplink_bytes(s)[0] for s in w.lab.sites}
    threads = [
        threading.Thread(target=_read, args=(n.mountpoint / "tools" / "image.bin",))
        for n in desktops
    ]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    copies = (w.origin_sent() - before) / size
    per_site = {s: (w.lab.uplink_bytes(s)[0] - into[s]) / size for s in w.lab.sites}
    return elapsed, copies, per_site


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_origins")
    parser.add_argument("--size-mib", type=int, default=128)
    parser.add_argument("--desktops", type=int, default=3, help="per site")
    parser.add_argument("--mbit", type=float, default=100, help="each site's uplink")
    args = parser.parse_args(argv)
    reason = lab_unavailable()
    if reason:
        print(f"  skipped: the lab is unavailable ({reason})")
        return 1
    sites = {s: args.desktops for s in ("a", "b", "c")}
    rows = []
    with workdir("origins") as d:
        root = Path(d)
        tree = root / "tree"
        tree.mkdir()
        rng = random.Random(1)
        with open(tree / "image.bin", "wb") as f:
            for _ in range(args.size_mib):
                f.write(rng.randbytes(MIB))
        for peers in (True, False):
            elapsed, copies, per_site = run(root / f"run-{peers}", tree, sites, args.mbit, peers)
            rows.append((peers, elapsed, copies, per_site))
    n = len(sites) * args.desktops
    print(
        f"3 sites x {args.desktops} desktops, {args.size_mib} MiB read by all {n} at once, "
        f"uplinks {args.mbit:g} Mbit/s, S3 origin (moto) in the cloud, publisher stopped"
    )
    print(f"{'fetching':<14} {'seconds':>8} {'origin copies':>14} {'per site (into each)':>28}")
    for peers, elapsed, copies, per_site in rows:
        sites_text = " ".join(f"{s}={c:.2f}" for s, c in per_site.items())
        name = "peers+origin" if peers else "origin only"
        print(f"{name:<14} {elapsed:>8.1f} {copies:>14.2f} {sites_text:>28}")
    (p_el, p_cp, _), (o_el, o_cp, _) = (r[1:] for r in rows)
    met_copies = p_cp <= 1.5 * len(sites)
    print(
        f"origin copies with peers vs origin-only: {p_cp:.2f} vs {o_cp:.2f} "
        f"(goal: about one per site, <= {1.5 * len(sites):g}): {'met' if met_copies else 'missed'}"
    )
    print(
        f"completion with peers vs origin-only: {p_el:.1f} s vs {o_el:.1f} s = "
        f"{o_el / p_el:.2f}x (goal >= 1.0): {'met' if o_el >= p_el else 'missed'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
