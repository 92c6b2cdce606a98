"""A whole estate in the lab: one admin/origin and desktops, each in its own namespace.

Used by the estate tests, the benchmarks and ``make demo``. Every host gets a
home under ``workdir``, is enrolled the way an admin would do it (request-join,
approve, join), and runs a real daemon with a real FUSE mount, started inside its
network namespace with nsenter so the mount stays visible here.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from p2pfs.errors import P2pfsError
from p2pfs.node import control

from .netns import Host, Lab

DAEMON_START_TIMEOUT = 60.0


def p2pfs(home: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "p2pfs", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and proc.returncode != 0:
        raise P2pfsError(
            f"p2pfs {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}"
        )
    return proc


@dataclass
class Node:
    name: str
    host: Host
    home: Path
    mountpoint: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.home.parent / f"{self.name}.log"

    @property
    def address(self) -> str:
        return self.host.address

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return p2pfs(self.home, *args, check=check)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = control.call(self.home / "run" / "control.sock", "status")
        return result

    def node_id(self) -> str:
        return str(json.loads((self.home / "node.json").read_text())["node_id"])

    def configure(
        self, network: dict[str, object] | None = None, *, site: str | None = None, **fetch: float
    ) -> None:
        lines = ["[node]", f"name = {json.dumps(self.name)}"]
        if site is not None:
            lines.append(f"site = {json.dumps(site)}")
        lines += ["[network]", "port = 7420"]
        for key, value in (network or {}).items():
            lines.append(f"{key} = {json.dumps(value)}")
        if fetch:
            lines.append("[fetch]")
            lines += [f"{k} = {v}" for k, v in fetch.items()]
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    def start(self, *extra: str) -> None:
        """Run the daemon in this host's namespace, mounted; return once the mount is up."""
        self.launch(*extra)
        self.wait_mounted()

    def launch(self, *extra: str, env: dict[str, str] | None = None) -> None:
        """Start the daemon in this host's namespace (with ``env``, else ours);
        ``wait_mounted`` waits for its mount."""
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")  # noqa: SIM115
        argv = [sys.executable, "-m", "p2pfs", "--home", str(self.home), "daemon"]
        argv += ["--mount", str(self.mountpoint), *extra]
        self.proc = self.host.popen(argv, stdout=log, stderr=log, env=env)
        log.close()
        self.host.track_mount(self.mountpoint)

    def wait_mounted(self) -> None:
        assert self.proc is not None
        deadline = time.monotonic() + DAEMON_START_TIMEOUT
        while not os.path.ismount(self.mountpoint):
            if self.proc.poll() is not None:
                raise P2pfsError(f"daemon of {self.name} exited:\n{self.log_path.read_text()}")
            if time.monotonic() > deadline:
                raise P2pfsError(f"daemon of {self.name} did not mount in time")
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # A killed daemon leaves a dead mount that stat() cannot see: always try.
        subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)], capture_output=True)
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


class EstateLab:
    """``nodes[0]`` is the admin: it holds the estate CA and publishes the volumes."""

    def __init__(self, lab: Lab, workdir: Path) -> None:
        self.lab = lab
        self.workdir = workdir
        self.nodes: list[Node] = []

    @property
    def admin(self) -> Node:
        return self.nodes[0]

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def add_node(self, name: str, host: Host | None = None) -> Node:
        host = host or self.lab.add_host(name)
        home = self.workdir / name / "home"
        node = Node(name, host, home, self.workdir / name / "mnt")
        p2pfs(home, "init")
        if not self.nodes:
            p2pfs(home, "estate", "init")
        else:
            req = self.workdir / name / "join.req"
            bundle = self.workdir / name / "join.bundle"
            p2pfs(home, "request-join", "--out", str(req))
            p2pfs(self.admin.home, "estate", "approve", str(req), "--out", str(bundle))
            p2pfs(home, "join", str(bundle))
        node.configure()
        self.nodes.append(node)
        return node

    def publish(self, source: Path, volume: str = "tools") -> None:
        if volume not in p2pfs(self.admin.home, "volume", "list").stdout.split():
            p2pfs(self.admin.home, "volume", "create", volume)
        p2pfs(self.admin.home, "import", str(source), volume)

    def start_all(self, nodes: list[Node] | None = None) -> None:
        """Start every daemon at once (as a power cut's end would), then wait for the mounts."""
        nodes = self.nodes if nodes is None else nodes
        for node in nodes:
            node.launch()
        for node in nodes:
            node.wait_mounted()

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.send_signal(signal.SIGTERM)  # all at once, then each waited for
        for node in self.nodes:
            with contextlib.suppress(Exception):
                node.stop()


@contextlib.contextmanager
def estate_lab(workdir: Path, names: list[str]) -> Iterator[EstateLab]:
    """A lab with one host per name, each enrolled in one estate (the first is the admin)."""
    with Lab(names=names) as lab:
        estate = EstateLab(lab, workdir)
        try:
            for name, host in zip(names, lab.hosts, strict=True):
                estate.add_node(name, host)
            yield estate
        finally:
            estate.stop_all()


def wait_for(what: str, predicate: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with contextlib.suppress(P2pfsError, OSError, KeyError):
            if predicate():
                return
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)


def connected_peers(node: Node) -> set[str]:
    return {p["node_id"] for p in node.status()["peers"] if p["state"] == "connected"}


def wait_until_meshed(nodes: list[Node], volume: str = "tools", timeout: float = 60.0) -> None:
    """Every node connected to every other, and showing ``volume`` in its mount."""
    ids = {n.node_id() for n in nodes}
    for node in nodes:

        def ready(node: Node = node) -> bool:
            return (
                connected_peers(node) == ids - {node.node_id()}
                and (node.mountpoint / volume).is_dir()
            )

        wait_for(f"{node.name} to reach every peer and show {volume}", ready, timeout)
