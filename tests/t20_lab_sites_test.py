"""The lab beyond one LAN: three sites of two desktops and a cloud host behind a router,
with real origin servers (moto's S3 API server and nginx) as processes of their own.

Checked here: every host reaches every other and the server, and nothing outside the
lab; mDNS-style multicast stays inside its site; site uplinks are shaped (their qdiscs,
and the rates measured are printed, never asserted); the S3 server and nginx answer
from a site host; a server host's byte counters see what it served; everything is gone
afterwards, and a lab whose owner was killed is removed by the next ``cleanup_stale``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from harness import require_lab

from p2pfs.lab.netns import STATE_DIR, cleanup_stale
from p2pfs.lab.servers import HttpServer, S3Server, start_nginx, start_s3
from p2pfs.lab.sites import SiteHost, SitesLab

pytestmark = pytest.mark.lab
MIB = 1024 * 1024
BIG = 20 * MIB
UPLINK_MBIT = 100
SITES = {"a": 2, "b": 2, "c": 2}


def _require(tool: str) -> None:
    if shutil.which(tool) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} must be installed in CI (.ci/system-deps)")
        pytest.skip(f"{tool} is not installed (.ci/system-deps)")


def _netns() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _root_links() -> list[str]:
    out = subprocess.run(["ip", "-br", "link"], capture_output=True, text=True).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


def _sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(MIB):
            h.update(block)
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require_lab()
    _require("nginx")
    _require("curl")
    work = tmp_path_factory.mktemp("sites")
    root = work / "www"
    (root / "sub").mkdir(parents=True)
    (root / "big.bin").write_bytes(os.urandom(BIG))
    (root / "sub" / "small.txt").write_bytes(b"hello from the cloud\n" * 100)
    links = _root_links()
    with SitesLab(SITES, uplink_mbit=UPLINK_MBIT, servers=1) as lab:
        server = lab.server(0)
        s3 = start_s3(server)
        web = start_nginx(server, root)
        # The same files served inside site a, for the rate of an unshaped LAN.
        local = start_nginx(lab.site("a")[1], root)
        yield {"lab": lab, "s3": s3, "web": web, "local": local, "root": root, "work": work}
        lab_ns = f"{lab.prefix}{lab.id}-"
        procs = [s.proc for s in (s3, web, local) if s.proc is not None]
    assert not [ns for ns in _netns() if ns.startswith(lab_ns)]
    assert not (STATE_DIR / f"{lab.id}.json").exists()
    assert not (STATE_DIR / f"{lab.id}.d").exists()  # the servers' configs and logs
    assert all(p.poll() is not None for p in procs)
    assert _root_links() == links  # this machine's own namespace untouched


def test_the_layout(world: dict[str, Any]) -> None:
    lab: SitesLab = world["lab"]
    assert lab.sites == ["a", "b", "c"]
    assert [h.name for h in lab.site("a")] == ["a1", "a2"]
    assert [h.name for h in lab.servers] == ["server0"]
    subnets = {s: lab.subnet_of(s) for s in [*lab.sites, "cloud"]}
    assert len(set(subnets.values())) == 4
    for site, subnet in subnets.items():
        hosts = lab.servers if site == "cloud" else lab.site(site)
        for h in hosts:
            assert h.site == site
            assert h.address.startswith(subnet.removesuffix("0/24"))
            assert h.address.startswith("10.213.")
    ns = _netns()
    prefix = f"{lab.prefix}{lab.id}-"
    # 7 hosts, 4 switches (three sites and the cloud), the router.
    assert sorted(n.removeprefix(prefix) for n in ns if n.startswith(prefix)) == sorted(
        [f"h{i}" for i in range(7)] + [f"sw{j}" for j in range(4)] + ["wan"]
    )


def test_every_host_reaches_every_other_and_the_server_and_nothing_else(
    world: dict[str, Any],
) -> None:
    lab: SitesLab = world["lab"]
    addresses = [h.address for h in lab.hosts]
    loop = 'for a in "$@"; do ping -c1 -W2 -q "$a" >/dev/null 2>&1 || echo "$a"; done'
    for host in lab.hosts:
        others = [a for a in addresses if a != host.address]
        proc = host.run(["sh", "-c", loop, "ping", *others], capture_output=True, text=True)
        assert proc.stdout.split() == [], f"{host.name} cannot reach {proc.stdout.split()}"
        # No default route anywhere: the lab's own subnets only.
        out = host.run(["ip", "route", "get", "8.8.8.8"], capture_output=True, text=True)
        assert out.returncode != 0, out.stdout
    routes = subprocess.run(
        ["ip", "-n", lab.router_netns, "route"], capture_output=True, text=True, check=True
    ).stdout
    assert "default" not in routes
    assert sorted(line.split()[0] for line in routes.splitlines()) == sorted(
        lab.subnet_of(s) for s in [*lab.sites, "cloud"]
    )


RECEIVER = textwrap.dedent(
    """
    import json, socket, sys
    me, groups = sys.argv[1], sys.argv[2:]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("", 5353))
    for g in groups:
        mreq = socket.inet_aton(g) + socket.inet_aton(me)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, mreq)
    s.settimeout(30)
    print("ready", flush=True)
    got = set()
    while True:
        data, _ = s.recvfrom(2048)
        if data == b"end":  # unicast from the sender, after its multicasts
            break
        got.add(data.decode())
    print(json.dumps(sorted(got)), flush=True)
    """
)

SENDER = textwrap.dedent(
    """
    import socket, sys, time
    me, receivers = sys.argv[1], sys.argv[2:]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(me))
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 0)
    for _ in range(5):
        for group, ttl in (("224.0.0.251", 255), ("239.255.42.42", 64)):
            s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, ttl)
            s.sendto(group.encode(), (group, 5353))
        time.sleep(0.05)
    time.sleep(0.2)
    for _ in range(3):
        for r in receivers:
            s.sendto(b"end", (r, 5353))
        time.sleep(0.05)
    """
)


def test_multicast_stays_inside_its_site(world: dict[str, Any]) -> None:
    """mDNS (224.0.0.251, TTL 255) from a1 reaches a2, not b, c or the cloud; nor does a
    routable group (239.255.42.42): the router does no multicast routing."""
    lab: SitesLab = world["lab"]
    a1, a2 = lab.site("a")
    listeners: list[SiteHost] = [a2, *lab.site("b"), *lab.site("c"), lab.server(0)]
    groups = ["224.0.0.251", "239.255.42.42"]
    procs = {}
    for h in listeners:
        p = h.popen(
            [sys.executable, "-c", RECEIVER, h.address, *groups], stdout=subprocess.PIPE, text=True
        )
        procs[h.name] = p
    for name, p in procs.items():
        assert p.stdout is not None and p.stdout.readline().strip() == "ready", name
    a1.run(
        [sys.executable, "-c", SENDER, a1.address, *(h.address for h in listeners)],
        timeout=30,
        check=True,
    )
    got = {}
    for name, p in procs.items():
        out, _ = p.communicate(timeout=30)
        assert p.returncode == 0, name
        got[name] = json.loads(out)
    assert got == {"a2": groups, "b1": [], "b2": [], "c1": [], "c2": [], "server0": []}


def _qdiscs(ns: str, dev: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        ["tc", "-n", ns, "-j", "qdisc", "show", "dev", dev],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result: list[dict[str, Any]] = json.loads(out)
    return result


def _curl(host: SiteHost, url: str, out: Path) -> tuple[int, float]:
    """(bytes, bytes per second) of one GET, as curl measured it."""
    proc = host.run(
        ["curl", "-sSf", "-o", str(out), "-w", "%{size_download} %{speed_download}", url],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    size, speed = proc.stdout.split()
    return int(size), float(speed)


def test_uplinks_are_shaped_and_the_lan_is_not(
    world: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    lab: SitesLab = world["lab"]
    web: HttpServer = world["web"]
    local: HttpServer = world["local"]
    work: Path = world["work"]
    for site in lab.sites:
        for ns, dev in lab.uplink_ends(site):
            (q,) = [q for q in _qdiscs(ns, dev) if q.get("root")]
            assert q["kind"] == "tbf", (site, ns, dev, q)
            assert q["options"]["rate"] == UPLINK_MBIT * 1_000_000 // 8
    for ns, dev in lab.uplink_ends("cloud"):
        assert all(q["kind"] != "tbf" for q in _qdiscs(ns, dev))
    for h in lab.hosts:  # inside a site (and the servers' own cables): unshaped
        assert all(q["kind"] not in ("tbf", "netem") for q in _qdiscs(h.netns, "eth0"))
    a1 = lab.site("a")[0]
    digest = _sha(world["root"] / "big.bin")
    server_rx_tx = lab.server(0).link_bytes()
    into_a = lab.uplink_bytes("a")[0]
    far_size, far = _curl(a1, f"{web.url}/big.bin", work / "far.bin")
    near_size, near = _curl(a1, f"{local.url}/big.bin", work / "near.bin")
    assert far_size == near_size == BIG
    assert _sha(work / "far.bin") == _sha(work / "near.bin") == digest
    # What the server sent and what went into site a: at least the file, once.
    assert lab.server(0).link_bytes()[1] - server_rx_tx[1] >= BIG
    assert lab.uplink_bytes("a")[0] - into_a >= BIG
    with capsys.disabled():
        print(
            f"\n  20 MiB from the cloud over a {UPLINK_MBIT} Mbit/s uplink: "
            f"{far * 8 / 1e6:.0f} Mbit/s; inside site a: {near * 8 / 1e6:.0f} Mbit/s"
        )


def test_the_s3_server_from_a_site_host(world: dict[str, Any]) -> None:
    lab: SitesLab = world["lab"]
    s3: S3Server = world["s3"]
    b1 = lab.site("b")[0]
    assert s3.endpoint == f"http://{lab.server(0).address}:{s3.port}"
    env = s3.env()
    assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    assert env["AWS_DEFAULT_REGION"] == "us-east-1"
    assert not [k for k in env if k.lower().endswith("_proxy")]
    sent = lab.server(0).link_bytes()[1]
    s3.create_bucket("lab-tools", via=b1)
    body = os.urandom(300_000)
    result = s3.call(
        "import base64\n"
        f"body = base64.b64decode({__import__('base64').b64encode(body).decode()!r})\n"
        "s3.put_object(Bucket='lab-tools', Key='v/objects/ab/cd', Body=body)\n"
        "got = s3.get_object(Bucket='lab-tools', Key='v/objects/ab/cd')['Body'].read()\n"
        "listed = s3.list_objects_v2(Bucket='lab-tools', Prefix='v/')['Contents']\n"
        "result = {'same': got == body, 'keys': [(o['Key'], o['Size']) for o in listed],\n"
        "          'buckets': [b['Name'] for b in s3.list_buckets()['Buckets']]}",
        via=b1,
    )
    assert result == {
        "same": True,
        "keys": [["v/objects/ab/cd", len(body)]],
        "buckets": ["lab-tools"],
    }
    assert lab.server(0).link_bytes()[1] - sent >= len(body)
    # Its requests came from b1, across the router.
    assert f"{b1.address} - - " in s3.log() and "PUT /lab-tools/v/objects/ab/cd" in s3.log()


def test_nginx_serves_read_only_with_etags_and_can_be_stopped(world: dict[str, Any]) -> None:
    lab: SitesLab = world["lab"]
    web: HttpServer = world["web"]
    c1 = lab.site("c")[0]
    out = world["work"] / "small.txt"
    sent = lab.server(0).link_bytes()[1]
    proc = c1.run(
        ["curl", "-sSf", "-D", "-", "-o", str(out), f"{web.url}/sub/small.txt"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert out.read_bytes() == (world["root"] / "sub" / "small.txt").read_bytes()
    headers = {
        k.strip().lower(): v.strip()
        for k, _, v in (line.partition(":") for line in proc.stdout.splitlines()[1:])
        if k.strip()
    }
    assert headers["etag"].startswith('"'), headers
    assert lab.server(0).link_bytes()[1] - sent >= out.stat().st_size
    assert (c1.address, "GET /sub/small.txt HTTP/1.1", 200, out.stat().st_size) in web.requests()

    def status(*args: str) -> str:
        argv = ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", *args]
        return c1.run(argv, capture_output=True, text=True, timeout=30).stdout

    assert status("-X", "PUT", "--data", "x", f"{web.url}/sub/small.txt") in ("403", "405")
    assert status(f"{web.url}/sub/") == "403"  # no listings
    assert status(f"{web.url}/missing") == "404"
    web.stop()
    assert not web.answers() and status(f"{web.url}/sub/small.txt") == "000"
    web.start()
    assert status(f"{web.url}/sub/small.txt") == "200"


def test_a_killed_owners_sites_lab_is_removed_by_cleanup_stale() -> None:
    require_lab()
    script = textwrap.dedent(
        """
        import json, time
        from p2pfs.lab.sites import SitesLab
        lab = SitesLab({"x": 1, "y": 1}, uplink_mbit=50, prefix="p2ls").start()
        p = lab.server(0).popen(["sleep", "1000"])
        (lab.scratch_dir("keep") / "f").write_text("x")
        print(json.dumps([lab.id, p.pid]), flush=True)
        time.sleep(1000)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as proc:
        assert proc.stdout is not None
        lab_id, sleeper = json.loads(proc.stdout.readline())
        proc.kill()  # no cleanup at all: a crash
    mine = [ns for ns in _netns() if ns.startswith(f"p2ls{lab_id}-")]
    assert len(mine) == 3 + 3 + 1  # x1, y1, server0; three switches; the router
    assert (STATE_DIR / f"{lab_id}.d").is_dir() and not _gone(sleeper)
    assert lab_id in cleanup_stale("p2ls")
    assert not [ns for ns in _netns() if ns.startswith(f"p2ls{lab_id}-")]
    assert not (STATE_DIR / f"{lab_id}.d").exists()
    assert not (STATE_DIR / f"{lab_id}.json").exists()
    deadline = time.monotonic() + 10
    while not _gone(sleeper):
        assert time.monotonic() < deadline, "the dead lab's process is still running"
        time.sleep(0.05)
