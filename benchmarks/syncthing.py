"""Two Syncthing devices on two lab hosts, sharing one folder: the estate benchmark's
second reference for a 1 GiB transfer between peers (Debian package syncthing).

Each device gets its own home (``syncthing generate``), a config that knows only the
other device at its lab address (no discovery, relays, NAT or usage reports: nothing
leaves the lab) and a REST API on 127.0.0.1 inside its host, reached with curl run in
that host. The receiver starts with the folder paused, so that the time measured is
the transfer alone: the sender has hashed its file before, as a p2pfs publisher has
before a peer reads.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

from p2pfs.lab.netns import Host

from .common import drop_caches

PORT = 22000
GUI = "127.0.0.1:8384"
FOLDER = "bench"


class Device:
    """One Syncthing instance in one lab host, with the folder ``bench`` at ``folder``."""

    def __init__(self, host: Host, home: Path, folder: Path) -> None:
        self.host = host
        self.home = home
        self.folder = folder
        self.proc: subprocess.Popen[bytes] | None = None
        out = subprocess.run(
            [
                "syncthing",
                "generate",
                f"--home={home}",
                "--no-default-folder",
                "--skip-port-probing",
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        found = re.search(r"Device ID: (\S+)", out.stdout + out.stderr)
        if found is None:
            raise RuntimeError(f"syncthing generate printed no device ID: {out.stdout}{out.stderr}")
        self.device_id = found.group(1)
        self.api_key = ET.parse(home / "config.xml").findtext("gui/apikey") or ""
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ".stfolder").mkdir(exist_ok=True)

    def configure(self, other: Device, *, kind: str, paused: bool) -> None:
        """Know only ``other``, at its lab address; share the folder with it as ``kind``."""
        path = self.home / "config.xml"
        tree = ET.parse(path)
        root = tree.getroot()
        options = root.find("options")
        assert options is not None
        for name, value in {
            "listenAddress": f"tcp://{self.host.address}:{PORT}",
            "globalAnnounceEnabled": "false",
            "localAnnounceEnabled": "false",
            "relaysEnabled": "false",
            "natEnabled": "false",
            "urAccepted": "-1",
            "autoUpgradeIntervalH": "0",
            "crashReportingEnabled": "false",
            "startBrowser": "false",
        }.items():
            node = options.find(name)
            if node is None:
                node = ET.SubElement(options, name)
            node.text = value
        gui = root.find("gui")
        assert gui is not None
        address = gui.find("address")
        assert address is not None
        address.text = GUI
        peer = ET.SubElement(root, "device", id=other.device_id, name=other.host.name)
        ET.SubElement(peer, "address").text = f"tcp://{other.host.address}:{PORT}"
        folder = ET.Element(
            "folder",
            id=FOLDER,
            label=FOLDER,
            path=str(self.folder),
            type=kind,
            rescanIntervalS="3600",
            fsWatcherEnabled="false",
        )
        for device in (self.device_id, other.device_id):
            ET.SubElement(folder, "device", id=device)
        ET.SubElement(folder, "paused").text = "true" if paused else "false"
        root.insert(0, folder)
        tree.write(path)

    def start(self) -> None:
        self.proc = self.host.popen(
            [
                "syncthing",
                "serve",
                f"--home={self.home}",
                "--no-browser",
                "--no-restart",
                "--no-upgrade",
                f"--logfile={self.home / 'syncthing.log'}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={"STNOUPGRADE": "1", "HOME": str(self.home), "PATH": "/usr/bin:/bin"},
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, path: str, *, method: str = "GET", body: object = None) -> Any:
        argv = ["curl", "-sSf", "-m", "10", "-H", f"X-API-Key: {self.api_key}", "-X", method]
        if body is not None:
            argv += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
        out = self.host.run([*argv, f"http://{GUI}{path}"], capture_output=True, timeout=15)
        if out.returncode != 0:
            raise OSError(f"syncthing REST {method} {path}: {out.stderr.decode().strip()}")
        return json.loads(out.stdout) if out.stdout.strip() else None

    def status(self) -> dict[str, Any]:
        try:
            got: dict[str, Any] = self.api(f"/rest/db/status?folder={FOLDER}")
            return got
        except (OSError, ValueError):
            return {}  # not up yet

    def connected_to(self, other: Device) -> bool:
        try:
            conns = self.api("/rest/system/connections")["connections"]
        except (OSError, ValueError, KeyError):
            return False
        return bool(conns.get(other.device_id, {}).get("connected"))


def wait_for(what: str, check: Callable[[], bool], timeout: float, interval: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"syncthing: {what} not within {timeout:.0f} s")
        time.sleep(interval)


def transfer_seconds(sender_host: Host, receiver_host: Host, work: Path, src: Path) -> float:
    """Seconds for the receiver to hold every byte of ``src``'s files, sent by the sender.

    ``src`` is hard-linked into the sender's folder (same file system as ``work``).
    The page cache is dropped after the sender's scan, as before p2pfs's cold read.
    """
    size = 0
    a = Device(sender_host, work / "st-a", work / "st-a-folder")
    b = Device(receiver_host, work / "st-b", work / "st-b-folder")
    for f in sorted(src.iterdir()):
        (a.folder / f.name).hardlink_to(f)
        size += f.stat().st_size
    a.configure(b, kind="sendonly", paused=False)
    b.configure(a, kind="receiveonly", paused=True)
    try:
        a.start()
        b.start()
        wait_for(
            "the sender's scan",
            lambda: (s := a.status()).get("state") == "idle" and s.get("localBytes") == size,
            timeout=300,
        )
        wait_for("the connection", lambda: b.connected_to(a), timeout=60)
        drop_caches()
        t0 = time.perf_counter()
        b.api(f"/rest/config/folders/{FOLDER}", method="PATCH", body={"paused": False})

        def done() -> bool:
            s = b.status()
            return (
                s.get("state") == "idle"
                and s.get("globalBytes") == size
                and s.get("inSyncBytes") == size
            )

        wait_for("the receiver's copy", done, timeout=600, interval=0.05)
        seconds = time.perf_counter() - t0
        got = sum(p.stat().st_size for p in b.folder.iterdir() if p.is_file())
        if got != size:
            raise RuntimeError(f"syncthing: the receiver holds {got} of {size} bytes")
        return seconds
    finally:
        a.stop()
        b.stop()
