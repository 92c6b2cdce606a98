"""Live volumes in the lab: how soon a follower sees what the publisher wrote.

An estate of ``--hosts`` hosts (default 3): ``a`` publishes ``tools`` and writes through its
writable mount; every other host follows it through its own mount. Each round writes a new
small file on ``a`` and polls ``stat`` of it on every follower's mount every 10 ms (the
pollers start before the write, as a user waiting for it would).

1. ``p2pfs commit tools`` right after the file is closed: the time from the command
   returning (and from it starting) until each follower sees the file.
2. An automatic commit (``[publish] settle_s``, 1 s by default): the time from the file's
   close until each follower sees it (``settle_s`` included, and shown without it).

Figures are the median and the worst over every round and follower.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

from p2pfs.lab.estate import EstateLab, Node, wait_until_meshed
from p2pfs.lab.netns import Lab, lab_unavailable

from .common import workdir

VOLUME = "tools"
POLL_S = 0.010
VISIBLE_TIMEOUT_S = 60.0


class Watch:
    """Threads that stat ``rel`` under every follower's mount until it appears."""

    def __init__(self, followers: list[Node], rel: str) -> None:
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._poll, args=(n.name, n.mountpoint / VOLUME / rel))
            for n in followers
        ]
        for t in self._threads:
            t.start()

    def _poll(self, name: str, path: Path) -> None:
        deadline = time.monotonic() + VISIBLE_TIMEOUT_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                path.stat()
            except OSError:
                time.sleep(POLL_S)
                continue
            self.seen[name] = time.perf_counter()
            return

    def wait(self) -> dict[str, float]:
        for t in self._threads:
            t.join()
        if len(self.seen) != len(self._threads):
            raise SystemExit(
                f"followers never saw the file in {VISIBLE_TIMEOUT_S:g} s: {self.seen}"
            )
        return self.seen

    def cancel(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def configure(node: Node, settle_s: float) -> None:
    node.configure()
    with open(node.home / "config.toml", "a") as f:
        f.write(f"[publish]\nsettle_s = {settle_s}\nmax_delay_s = 30.0\n")


def write_file(path: Path, text: str) -> float:
    """Write and close a small file; returns the time of the close."""
    with open(path, "w") as f:
        f.write(text)
    return time.perf_counter()


def commit(a: Node) -> float:
    """``p2pfs commit``; returns the seconds the daemon says the commit took."""
    proc = subprocess.run(
        [sys.executable, "-m", "p2pfs", "--home", str(a.home), "commit", VOLUME, "--json"],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise SystemExit(f"p2pfs commit failed: {proc.stderr}")
    report = json.loads(proc.stdout)
    if not report["changed"]:
        raise SystemExit(f"p2pfs commit made no snapshot: {report}")
    return float(report["seconds"])


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.0f} ms, worst {max(values) * 1000:7.0f} ms"


def explicit_commits(a: Node, followers: list[Node], rounds: int) -> None:
    from_return: list[float] = []
    from_start: list[float] = []
    command: list[float] = []
    in_daemon: list[float] = []
    for i in range(rounds):
        rel = f"commit-{i}.txt"
        watch = Watch(followers, rel)
        try:
            write_file(a.mountpoint / VOLUME / rel, f"round {i}\n")
            t_start = time.perf_counter()
            in_daemon.append(commit(a))
            t_return = time.perf_counter()
            seen = watch.wait()
        finally:
            watch.cancel()
        command.append(t_return - t_start)
        from_return += [t - t_return for t in seen.values()]
        from_start += [t - t_start for t in seen.values()]
        time.sleep(0.5)
    print(f"  1. `p2pfs commit` right after the close ({rounds} rounds)")
    print(f"     the command, start to exit:         {ms(command)}")
    print(f"     the commit in the daemon:           {ms(in_daemon)}")
    print(f"     visible after the command starts:   {ms(from_start)}")
    print(f"     visible after the command returns:  {ms(from_return)}")


def automatic_commits(a: Node, followers: list[Node], rounds: int, settle_s: float) -> None:
    from_close: list[float] = []
    for i in range(rounds):
        rel = f"auto-{i}.txt"
        watch = Watch(followers, rel)
        try:
            t_close = write_file(a.mountpoint / VOLUME / rel, f"round {i}\n")
            seen = watch.wait()
        finally:
            watch.cancel()
        from_close += [t - t_close for t in seen.values()]
        time.sleep(settle_s + 0.5)
    beyond = [t - settle_s for t in from_close]
    print(f"  2. automatic commit, settle_s = {settle_s:g} ({rounds} rounds)")
    print(f"     visible after the close:            {ms(from_close)}")
    print(f"     ... less settle_s:                  {ms(beyond)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_live")
    ap.add_argument("--hosts", type=int, default=3, help="the publisher and its followers")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--settle-s", type=float, default=1.0)
    args = ap.parse_args(argv)
    reason = lab_unavailable()
    if reason:
        print(f"  skipped: the lab is unavailable ({reason})")
        return 1
    if args.hosts < 2:
        raise SystemExit("--hosts must be at least 2")
    with workdir("live") as tmp, Lab(args.hosts) as lab:
        work = Path(tmp)
        source = work / "tree"
        source.mkdir()
        (source / "README").write_text("a live volume\n")
        estate = EstateLab(lab, work)
        try:
            for i, host in enumerate(lab.hosts):
                node = estate.add_node("a" if i == 0 else f"f{i}", host)
                configure(node, settle_s=0)  # no automatic commits in part 1
            estate.publish(source, VOLUME)
            for node in estate.nodes:
                node.start()
            wait_until_meshed(estate.nodes, timeout=120)
            a, followers = estate.nodes[0], estate.nodes[1:]
            print(f"  followers: {len(followers)}; stat polled every {POLL_S * 1000:g} ms")
            explicit_commits(a, followers, args.rounds)
            a.stop()
            configure(a, settle_s=args.settle_s)
            a.start()
            wait_until_meshed(estate.nodes, timeout=120)
            automatic_commits(a, followers, args.rounds, args.settle_s)
        finally:
            estate.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
