"""Discovery in the lab: how soon a new host is seen, and what mDNS costs when idle.

- a new host joins a running segment: time from starting its Discovery to the
  moment every other host reports it (goal <= 3 s), median and worst of --rounds;
  also how soon it sees all the others
- idle mDNS traffic per host after start-up, counted by a sniffer in another lab
  host (a UDP socket in the 224.0.0.251:5353 group, bytes per sender, IP + UDP
  headers included) over --window-s (default 5 minutes): goal < 1 KB/min per host

Everything runs inside lab namespaces (p2pfs.lab): nothing reaches this machine's
interfaces. Each host runs ``python -m p2pfs.net.discovery``, which prints its events
with ``time.monotonic()`` stamps (one clock for every process on the machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

from p2pfs.lab.netns import Host, Lab, lab_unavailable

GOAL_VISIBLE_S = 3.0
GOAL_IDLE_BYTES_PER_MIN = 1024.0
SETTLE_S = 20.0  # zeroconf's start-up queries go at 0, 1, 5 and 14 s
IP_UDP_HEADERS = 28

SNIFFER = textwrap.dedent(
    """
    import json, socket, sys, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("", 5353))
    group = socket.inet_aton("224.0.0.251") + socket.inet_aton(sys.argv[1])
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
    print(json.dumps({"event": "ready", "time": time.monotonic()}), flush=True)
    while True:
        data, (addr, _) = s.recvfrom(65535)
        print(json.dumps({"time": time.monotonic(), "src": addr, "len": len(data)}), flush=True)
    """
)


class Reader:
    """A lab process whose stdout is JSON lines, collected by a thread."""

    def __init__(self, host: Host, argv: list[str]) -> None:
        self.host = host
        self.proc = host.popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1
        )
        self.events: list[dict[str, Any]] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def first(self, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
        return next((e for e in list(self.events) if predicate(e)), None)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._thread.join(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Node(Reader):
    def __init__(self, host: Host, estate: bytes, port: int) -> None:
        self.node = os.urandom(32)
        argv = [
            sys.executable,
            "-m",
            "p2pfs.net.discovery",
            self.node.hex(),
            estate.hex(),
            str(port),
        ]
        super().__init__(host, argv)

    def seen(self, other: Node) -> float | None:
        e = self.first(lambda e: e["event"] == "found" and e["node"] == other.node.hex())
        return None if e is None else float(e["time"])

    def lost(self, other: Node) -> bool:
        return (
            self.first(lambda e: e["event"] == "lost" and e["node"] == other.node.hex()) is not None
        )

    def started_at(self) -> float | None:
        e = self.first(lambda e: e["event"] == "starting")
        return None if e is None else float(e["time"])


def wait(what: str, predicate: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"  timed out waiting for {what}")
        time.sleep(0.02)


def judge(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench_discovery")
    ap.add_argument("--hosts", type=int, default=5, help="hosts running discovery")
    ap.add_argument("--rounds", type=int, default=5, help="new-host joins to time")
    ap.add_argument("--window-s", type=float, default=300.0, help="idle window")
    args = ap.parse_args(argv)
    reason = lab_unavailable()
    if reason:
        print(f"  skipped: the lab is unavailable: {reason}")
        return 1
    if args.hosts < 2 or args.rounds < 1:
        ap.error("--hosts must be at least 2 and --rounds at least 1")
    estate = os.urandom(32)
    names = [f"n{i}" for i in range(args.hosts)] + ["sniffer"]
    with Lab(names=names) as lab:
        hosts, sniffer_host = lab.hosts[:-1], lab.hosts[-1]
        sniffer = Reader(sniffer_host, [sys.executable, "-c", SNIFFER, sniffer_host.address])
        wait("the sniffer", lambda: bool(sniffer.events))
        nodes = [Node(h, estate, 7400 + i) for i, h in enumerate(hosts[:-1])]
        wait(
            "the first hosts to meet",
            lambda: all(a.seen(b) for a in nodes for b in nodes if a is not b),
        )

        # 1. A new host joins (a fresh node id each round; it leaves with a goodbye).
        visible: list[float] = []
        sees: list[float] = []
        joiner: Node | None = None
        for r in range(args.rounds):
            joiner = Node(hosts[-1], estate, 7500 + r)
            new = joiner
            wait("the new host to start", lambda new=new: new.started_at() is not None)
            wait("every host to see the new one", lambda new=new: all(n.seen(new) for n in nodes))
            wait("the new host to see every host", lambda new=new: all(new.seen(n) for n in nodes))
            t0 = new.started_at()
            assert t0 is not None
            visible.append(max(n.seen(new) or 0.0 for n in nodes) - t0)
            sees.append(max(new.seen(n) or 0.0 for n in nodes) - t0)
            if r < args.rounds - 1:
                new.stop()
                wait("the others to drop it", lambda new=new: all(n.lost(new) for n in nodes))
        assert joiner is not None
        everyone = [*nodes, joiner]

        # 2. Idle: every host up, start-up over; count what each sends.
        time.sleep(SETTLE_S)
        w0 = time.monotonic()
        time.sleep(args.window_s)
        w1 = time.monotonic()
        packets = list(sniffer.events)
        per_host: dict[str, tuple[int, int]] = {}
        for n in everyone:
            mine = [p for p in packets if p.get("src") == n.host.address and w0 <= p["time"] < w1]
            per_host[n.host.name] = (len(mine), sum(p["len"] + IP_UDP_HEADERS for p in mine))
        startup = {
            n.host.address: sum(
                p["len"] + IP_UDP_HEADERS
                for p in packets
                if p.get("src") == n.host.address and p["time"] < w0
            )
            for n in everyone
        }
        strangers = {p["src"] for p in packets if "src" in p} - {n.host.address for n in everyone}
        # The sniffer was listening all along: the last joiner's goodbye reaches it.
        joiner.stop()
        alive = True
        try:
            wait(
                "the sniffer to hear a goodbye",
                lambda: any(
                    p.get("src") == joiner.host.address and p["time"] >= w1
                    for p in list(sniffer.events)
                ),
                timeout=10,
            )
        except SystemExit:
            alive = False
        for n in everyone:
            n.stop()
        sniffer.stop()

    minutes = (w1 - w0) / 60
    rates = {name: b / minutes for name, (_, b) in per_host.items()}
    med_v, worst_v = statistics.median(visible), max(visible)
    print(
        f"  {args.hosts} hosts + a sniffer; {args.rounds} joins timed; "
        f"idle window {w1 - w0:.0f} s after a {SETTLE_S:.0f} s settle"
    )
    print(
        f"  new host visible to all others: median {med_v:.2f} s, worst {worst_v:.2f} s "
        f"(goal <= {GOAL_VISIBLE_S:.0f} s: {judge(worst_v <= GOAL_VISIBLE_S)})"
    )
    print(
        f"  new host sees all others: median {statistics.median(sees):.2f} s, "
        f"worst {max(sees):.2f} s"
    )
    print(f"  {'host':<8}{'packets':>9}{'bytes':>9}{'B/min':>9}  (idle window)")
    for name, (count, nbytes) in per_host.items():
        print(f"  {name:<8}{count:>9}{nbytes:>9}{rates[name]:>9.1f}")
    worst_rate = max(rates.values())
    print(
        f"  idle mDNS per host: mean {statistics.mean(rates.values()):.1f} B/min, worst "
        f"{worst_rate:.1f} B/min (goal < {GOAL_IDLE_BYTES_PER_MIN:.0f} B/min: "
        f"{judge(worst_rate < GOAL_IDLE_BYTES_PER_MIN)})"
    )
    print(
        f"  for reference, start-up and joins before the window: "
        f"{statistics.mean(startup.values()) / 1024:.1f} KiB per host on average"
    )
    if not alive:
        print("  WARNING: the sniffer heard nothing after the window: idle figures are void")
    if strangers:
        print(f"  note: packets from outside the lab's hosts: {sorted(strangers)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
