"""Running an estate: systemd's notify protocol, journald logging, the metrics endpoint
and the unit files.

The notify tests bind the datagram socket systemd would and read what a real daemon
sends; the metrics tests scrape a real daemon over HTTP and hold the numbers to
``p2pfs status --json``. No assertion depends on how long anything takes.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio
from harness import mounted, run_cli
from prometheus_client.parser import text_string_to_metric_families

from p2pfs import __version__
from p2pfs.cli import main as cli_main
from p2pfs.errors import UsageError
from p2pfs.home import Home
from p2pfs.net.fetcher import FETCH_SECONDS_BUCKETS, FetchStats
from p2pfs.net.peers import PeerStats
from p2pfs.net.service import NetworkStats
from p2pfs.node import metrics, notify, status
from p2pfs.node.notify import Notifier, watchdog_interval

REPO = Path(__file__).resolve().parents[1]
WAIT_S = 60.0  # a bound on waiting for a datagram, never a measurement


# -- notify, against a socket the test binds -----------------------------------------


@dataclass
class Listener:
    """The service manager's end: every datagram, and whether the mount was up when it came."""

    path: str
    sock: socket.socket
    mountpoint: Path | None = None
    got: list[tuple[str, bool]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def run(self) -> None:
        while True:
            try:
                data = self.sock.recv(65536)
            except OSError:
                return
            up = self.mountpoint is not None and os.path.ismount(self.mountpoint)
            with self._cond:
                self.got.append((data.decode(), up))
                self._cond.notify_all()

    def wait_for(self, line: str, count: int = 1) -> list[tuple[str, bool]]:
        """The datagrams so far, once ``count`` of them hold ``line``."""

        def enough() -> bool:
            return sum(line in m.split("\n") for m, _ in self.got) >= count

        with self._cond:
            assert self._cond.wait_for(enough, timeout=WAIT_S), f"no {line}: {self.got}"
            return list(self.got)

    def lines(self) -> list[str]:
        with self._cond:
            return [line for m, _ in self.got for line in m.split("\n")]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    lis = Listener(path, sock)
    thread = threading.Thread(target=lis.run, daemon=True)
    thread.start()
    yield lis
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    thread.join(timeout=WAIT_S)


@pytest.mark.unit
def test_notifier_sends_one_datagram_per_notification(listener: Listener) -> None:
    env = {"NOTIFY_SOCKET": listener.path}
    n = Notifier(env)
    assert env == {}, "the variables are not handed on to children"
    n.ready("2 volumes")
    n.status("2 volumes")  # unchanged: not sent again
    n.status("1 peer, 2 volumes")
    n.stopping()
    n.stopping()
    got = listener.wait_for("STOPPING=1")
    assert [m for m, _ in got] == [
        "READY=1\nSTATUS=2 volumes",
        "STATUS=1 peer, 2 volumes",
        "STOPPING=1\nSTATUS=stopping: unmounting",
    ]
    n.close()


@pytest.mark.unit
def test_notifier_reaches_the_abstract_namespace() -> None:
    name = f"p2pfs-test-{os.getpid()}-{id(object())}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(b"\0" + name.encode())
    sock.settimeout(WAIT_S)
    try:
        n = Notifier({"NOTIFY_SOCKET": "@" + name})
        assert n.send("READY=1")
        assert sock.recv(100) == b"READY=1"
        n.close()
    finally:
        sock.close()


@pytest.mark.unit
def test_without_notify_socket_nothing_is_sent() -> None:
    n = Notifier({})
    assert not n.enabled and not n.send("READY=1") and n.watchdog_s is None
    n.ready("x")  # and nothing fails


@pytest.mark.unit
def test_a_lost_notification_never_fails_the_daemon(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    n = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING):
        assert not n.send("READY=1")
        assert not n.send("STATUS=x")
    n.close()
    assert len([r for r in caplog.records if "notification lost" in r.message]) == 1


@pytest.mark.unit
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # another process's
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    env: dict[str, str], expected: float | None
) -> None:
    assert watchdog_interval(env) == expected


@pytest.mark.unit
@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"NOTIFY_SOCKET": "relative/path"}, "NOTIFY_SOCKET='relative/path' is neither"),
        ({"WATCHDOG_USEC": "soon"}, "WATCHDOG_USEC='soon' is not a positive number"),
        ({"WATCHDOG_USEC": "0"}, "WATCHDOG_USEC='0' is not a positive number"),
    ],
)
def test_bad_notify_variables_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        Notifier(env)


@pytest.mark.unit
def test_watchdog_keepalives_come_from_the_event_loop(listener: Listener) -> None:
    n = Notifier({"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "20000"})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(n.run, lambda: "3 peers, 2 volumes")
            await trio.to_thread.run_sync(listener.wait_for, "WATCHDOG=1", 3)
            nursery.cancel_scope.cancel()

    trio.run(main)
    assert "STATUS=3 peers, 2 volumes" in listener.lines()
    n.close()


@pytest.mark.unit
def test_a_long_last_commit_extends_the_stop_timeout_while_the_loop_lives(
    listener: Listener,
) -> None:
    n = Notifier({"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "20000"})

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            await nursery.start(n.run)
            await trio.to_thread.run_sync(listener.wait_for, "WATCHDOG=1", 3)
            assert not any(line.startswith("EXTEND_TIMEOUT_USEC=") for line in listener.lines())
            n.stopping("stopping: committing")
            assert n.watchdog_s is not None
            usec = int(notify.EXTEND_PERIODS * n.watchdog_s * 1e6)  # a few ticks ahead
            await trio.to_thread.run_sync(listener.wait_for, f"EXTEND_TIMEOUT_USEC={usec}", 3)
            nursery.cancel_scope.cancel()

    trio.run(main)
    n.close()


# -- a real daemon under NOTIFY_SOCKET -------------------------------------------------


def _volume(home: Path, tmp_path: Path, data: bytes = b"hello\n") -> Path:
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(data)
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(src), "tools", check=True)
    return src


@pytest.mark.mount
def test_a_daemon_says_ready_once_its_mount_answers_and_stopping_at_stop(
    home: Path, tmp_path: Path, listener: Listener
) -> None:
    _volume(home, tmp_path)
    mp = tmp_path / "mnt"
    listener.mountpoint = mp
    env = {"NOTIFY_SOCKET": listener.path, "WATCHDOG_USEC": "200000"}
    with mounted(home, mp, env=env):  # writable: the last commit runs after STOPPING=1
        got = listener.wait_for("READY=1")
        ready = next(i for i, (m, _) in enumerate(got) if "READY=1" in m.split("\n"))
        assert got[ready][1], "READY=1 came before the mount was up"
        assert "STATUS=1 volume, mounted on " + str(mp) in got[ready][0].split("\n")
        assert os.listdir(mp) == ["tools"]
        (mp / "tools" / "new.txt").write_text("committed at stop\n")
        # Keepalives, at half of WATCHDOG_USEC, for as long as the daemon runs.
        listener.wait_for("WATCHDOG=1", 3)
        assert "STOPPING=1" not in listener.lines()
    got = listener.wait_for("STOPPING=1")
    stopping = next(i for i, (m, _) in enumerate(got) if "STOPPING=1" in m.split("\n"))
    assert stopping > ready
    after = json.loads(run_cli(home, "status", "--json", check=True).stdout)
    assert [v["seq"] for v in after["volumes"]] == [2]  # the write became a snapshot at stop


@pytest.mark.mount
def test_a_daemon_without_watchdog_usec_sends_no_keepalive(
    home: Path, tmp_path: Path, listener: Listener
) -> None:
    _volume(home, tmp_path)
    with mounted(home, tmp_path / "mnt", env={"NOTIFY_SOCKET": listener.path}, read_only=True):
        listener.wait_for("READY=1")
    listener.wait_for("STOPPING=1")
    assert "WATCHDOG=1" not in listener.lines()


# -- journald ----------------------------------------------------------------------------


@pytest.mark.unit
def test_under_journald_the_daemon_logs_priorities_without_timestamps(tmp_path: Path) -> None:
    err = open(tmp_path / "stderr", "w")  # noqa: SIM115
    st = os.fstat(err.fileno())
    script = (
        "import logging, sys, types; from p2pfs.cli import main;"
        "main._configure_logging(types.SimpleNamespace(command='daemon', verbose=0));"
        "logging.getLogger('p2pfs.x').warning('disk %s', 'full');"
        "logging.getLogger('p2pfs.x').info('fine')"
    )
    for stream, timestamps in ((f"{st.st_dev}:{st.st_ino}", False), ("1:2", True), ("", True)):
        err.truncate(0)
        err.seek(0)
        env = {**os.environ, "JOURNAL_STREAM": stream}
        subprocess.run([sys.executable, "-c", script], stderr=err, env=env, check=True)
        lines = (tmp_path / "stderr").read_text().splitlines()
        if timestamps:  # not journald's stream (or a parent's): the usual lines
            assert lines[0].endswith("WARNING p2pfs.x: disk full") and lines[0][:4].isdigit()
        else:
            assert lines == ["<4>WARNING p2pfs.x: disk full", "<6>INFO p2pfs.x: fine"]
    err.close()


@pytest.mark.unit
def test_stderr_is_journal_checks_the_stream(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # no file descriptor
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")
    assert not cli_main.stderr_is_journal()
    monkeypatch.setenv("JOURNAL_STREAM", "garbage")
    assert not cli_main.stderr_is_journal()


# -- metrics -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=WAIT_S) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@pytest.mark.unit
def test_the_endpoint_serves_a_status_snapshot_and_nothing_else(home: Path) -> None:
    snapshot = status.offline(Home(home))
    scraped: list[tuple[int, str, str]] = []

    async def snap() -> status.NodeStatus:
        return snapshot

    async def main() -> None:
        server = metrics.MetricsServer(("127.0.0.1", 0), snap)
        await server.listen()
        port = server.http.port
        async with trio.open_nursery() as nursery:
            await nursery.start(server.run)
            for path in ("/metrics", "/elsewhere"):
                scraped.append(
                    await trio.to_thread.run_sync(_get, f"http://127.0.0.1:{port}{path}")
                )
            assert server.scrapes == 1
            nursery.cancel_scope.cancel()

    trio.run(main)
    (code, ctype, text), (missing, _, _) = scraped
    assert code == 200 and ctype.startswith("text/plain; version=")
    got = samples(text)
    assert (
        got[
            (
                "p2pfs_node_info",
                (("estate", ""), ("node_id", snapshot.disk.node_id), ("version", __version__)),
            )
        ]
        == 1
    )
    assert got[("p2pfs_offline_ready", ())] == 1
    assert got[("p2pfs_read_bytes_total", (("source", "peers"),))] == 0
    assert missing == 404


@pytest.mark.unit
def test_network_metrics_fetch_histogram_and_peer_states(home: Path) -> None:
    peer = PeerStats(
        "ab" * 16, "10.0.0.5:7420", "connected", 1, 10, 1, 0, 5.0, (), None, None, None
    )
    bad = dataclasses.replace(peer, node_id="cd" * 16, state="quarantined")
    buckets = [0] * (len(FETCH_SECONDS_BUCKETS) + 1)
    buckets[0], buckets[3], buckets[-1] = 2, 1, 1  # <= 5 ms twice, <= 50 ms, over 30 s
    fetch = FetchStats(100, 200, 4, 1, 0, 0, tuple(buckets), 40.5)
    net = NetworkStats(7420, (peer, bad), 1, 300, 3, 0, 0, 0, fetch)
    snap = dataclasses.replace(status.offline(Home(home)), network=net)
    text = metrics.render(snap).decode()
    got = samples(text)
    assert got[("p2pfs_read_bytes_total", (("source", "peers"),))] == 100
    assert got[("p2pfs_read_bytes_total", (("source", "origin"),))] == 200
    assert got[("p2pfs_served_bytes_total", ())] == 300
    assert got[("p2pfs_corrupt_chunks_rejected_total", ())] == 1
    assert got[("p2pfs_quarantined_peers", ())] == 1
    assert got[("p2pfs_peers", (("state", "connected"),))] == 1
    assert got[("p2pfs_peers", (("state", "quarantined"),))] == 1
    assert got[("p2pfs_peers", (("state", "unreachable"),))] == 0
    assert got[("p2pfs_chunk_fetch_seconds_bucket", (("le", "0.005"),))] == 2
    assert got[("p2pfs_chunk_fetch_seconds_bucket", (("le", "0.05"),))] == 3
    assert got[("p2pfs_chunk_fetch_seconds_bucket", (("le", "30.0"),))] == 3
    assert got[("p2pfs_chunk_fetch_seconds_bucket", (("le", "+Inf"),))] == 4
    assert got[("p2pfs_chunk_fetch_seconds_count", ())] == 4
    assert got[("p2pfs_chunk_fetch_seconds_sum", ())] == 40.5


@pytest.mark.unit
def test_a_busy_metrics_address_is_a_clear_start_up_error(home: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        (home / "config.toml").write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
        proc = run_cli(home, "daemon", timeout=120)
    assert proc.returncode != 0
    assert f"cannot serve metrics on 127.0.0.1:{port} ([metrics] listen)" in proc.stderr


@pytest.mark.mount
def test_a_scrape_matches_status_after_a_read(home: Path, tmp_path: Path) -> None:
    data = os.urandom(3 << 20)
    _volume(home, tmp_path, data)
    port = _free_port()
    (home / "config.toml").write_text(f'[metrics]\nlisten = "127.0.0.1:{port}"\n')
    with mounted(home, tmp_path / "mnt", read_only=True) as mp:
        assert (mp / "tools" / "a.txt").read_bytes() == data
        # Background work (pinning the volume as its origin, other writers on the disk) may
        # move the numbers:
        # compare a scrape with the status taken on either side of it when those agree.
        for _ in range(20):
            before = json.loads(run_cli(home, "status", "--json", check=True).stdout)
            code, _, text = _get(f"http://127.0.0.1:{port}/metrics")
            after = json.loads(run_cli(home, "status", "--json", check=True).stdout)
            keys = ("bytes_from", "cache", "fuse_requests", "store", "offline_ready", "pins")
            for st in (before, after):  # the effective quota follows the disk's free space
                st["cache"].pop("quota")
            if all(before[k] == after[k] for k in keys):
                break
        else:
            moved = [k for k in keys if before[k] != after[k]]
            pytest.fail(f"the status never held still: {[(before[k], after[k]) for k in moved]}")
    assert code == 200
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["p2pfs_read_bytes"].type == "counter"
    assert families["p2pfs_cache_bytes"].type == "gauge"
    got = samples(text)
    for source in ("local", "peers", "origin"):
        value = got[("p2pfs_read_bytes_total", (("source", source),))]
        assert value == after["bytes_from"][source]
    assert after["bytes_from"]["local"] >= len(data)
    assert got[("p2pfs_cache_bytes", ())] == after["cache"]["bytes"]
    assert got[("p2pfs_cache_evictions_total", ())] == after["cache"]["evictions"]
    assert got[("p2pfs_cache_pinned_bytes", ())] == after["cache"]["pinned_bytes"]
    assert got[("p2pfs_store_corrupt_chunks_total", ())] == after["store"]["corrupt_chunks"]
    assert got[("p2pfs_offline_ready", ())] == after["offline_ready"]
    assert got[("p2pfs_pins", ())] == after["pins"]
    assert got[("p2pfs_volume_snapshot_seq", (("volume", "tools"),))] == 1
    calls = after["fuse_requests"]["calls"]
    assert calls["read"] > 0
    pushed = after["fuse_requests"]["page_cache_pushed_bytes"]
    assert got[("p2pfs_page_cache_pushed_bytes_total", ())] == pushed
    for op, n in calls.items():
        assert got[("p2pfs_fuse_requests_total", (("operation", op),))] == n
    for op, n in after["fuse_requests"]["errors"].items():
        assert got[("p2pfs_fuse_errors_total", (("operation", op),))] == n
    assert got[("p2pfs_mounted", ())] == 1
    assert got[("p2pfs_event_loop_stalls_total", ())] == after["daemon"]["loop_stalls"]
    assert got[("p2pfs_scrub_checked_chunks_total", ())] == after["scrub"]["chunks_checked"]


# -- the unit files ----------------------------------------------------------------------


UNITS = [
    REPO / "contrib" / "systemd" / "p2pfs.service",
    REPO / "contrib" / "systemd" / "p2pfs@.service",
    REPO / "contrib" / "systemd" / "p2pfs-web.service",
    REPO / "p2pfs" / "appliance" / "files" / "units" / "p2pfs.service",
]


@pytest.mark.unit
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: str(p.relative_to(REPO)))
def test_unit_files_verify(unit: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    text = unit.read_text()
    if unit.name != "p2pfs-web.service":  # the daemons; the web view is a plain process
        assert "Type=notify" in text and "WatchdogSec=" in text
    # verify wants ExecStart's program to exist: this venv's stands in for /opt/p2pfs's,
    # and the appliance's unit wants its siblings beside it.
    p2pfs = str(Path(sys.executable).parent / "p2pfs")
    for sibling in unit.parent.glob("*.service"):
        body = sibling.read_text().replace("/opt/p2pfs/.venv/bin/p2pfs", p2pfs)
        (tmp_path / sibling.name).write_text(body.replace("/opt/p2pfs/bin/p2pfs", p2pfs))
    name = unit.name.replace("@.", "@demo.")
    if name != unit.name:
        (tmp_path / name).write_text((tmp_path / unit.name).read_text())
    proc = subprocess.run(
        ["systemd-analyze", "verify", f"./{name}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    # verify exits 0 on unknown keys and bad values too: it only says so.
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr
