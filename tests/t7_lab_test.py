"""The lab: hosts in network namespaces on one bridge, isolated from this machine's network.

Everything here runs inside lab namespaces; nothing is sent on this machine's
interfaces. No timing assertions: deadlines only bound waits.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness import require_lab

from p2pfs.lab.netns import STATE_DIR, Host, Lab, cleanup_stale
from p2pfs.lab.plumbing import LabError

pytestmark = pytest.mark.lab


def netns_names() -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def root_links() -> list[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    return sorted(line.split(":")[1].strip().split("@")[0] for line in out.splitlines())


def gone(pid: int) -> bool:
    """Dead (or a zombie waiting for a reaper that is not us)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


def pings(src: Host, dst: Host) -> bool:
    return src.run(["ping", "-c1", "-W2", dst.address], capture_output=True).returncode == 0


def eventually(what: str, predicate: object, timeout: float = 20.0) -> None:
    assert callable(predicate)
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def assert_removed(lab_id: str, prefix: str = "p2l") -> None:
    assert not [ns for ns in netns_names() if ns.startswith(f"{prefix}{lab_id}-")]
    assert not (STATE_DIR / f"{lab_id}.json").exists()
    assert not [link for link in root_links() if link.startswith(f"{prefix}{lab_id}")]


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    require_lab()
    with Lab(3) as lab:
        yield lab


def test_hosts_reach_each_other_and_nothing_else(lab: Lab) -> None:
    before = root_links()
    assert [h.name for h in lab.hosts] == ["a", "b", "c"]
    assert len({h.address for h in lab.hosts}) == 3
    for src in lab.hosts:
        for dst in lab.hosts:
            if src is not dst:
                assert pings(src, dst), f"{src.name} cannot ping {dst.name}"
        routes = src.run(["ip", "-4", "route"], capture_output=True, text=True, check=True)
        dests = sorted(line.split()[0] for line in routes.stdout.splitlines())
        assert dests == sorted([lab.subnet, "224.0.0.0/4"]), routes.stdout
        # A routing lookup (no packet is sent): the world outside is unreachable.
        outside = src.run(["ip", "-4", "route", "get", "8.8.8.8"], capture_output=True, text=True)
        assert outside.returncode != 0, outside.stdout
        links = src.run(["ip", "-o", "link"], capture_output=True, text=True, check=True).stdout
        names = sorted(line.split(":")[1].strip().split("@")[0] for line in links.splitlines())
        assert names == ["eth0", "lo"]
    # The lab put nothing into this machine's own network namespace.
    assert root_links() == before
    assert not [n for n in before if n.startswith(f"{lab.prefix}{lab.id}")]


LISTENER = textwrap.dedent(
    """
    import socket, sys
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("", 5353))
    group = socket.inet_aton("224.0.0.251") + socket.inet_aton(sys.argv[1])
    s.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
    s.settimeout(30)
    print("ready", flush=True)
    while True:
        data, (addr, port) = s.recvfrom(9000)
        if data == b"p2pfs-lab-test":
            print("got", addr, flush=True)
            break
    """
)

SENDER = textwrap.dedent(
    """
    import socket, time
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_TTL, 255)
    for _ in range(3):
        s.sendto(b"p2pfs-lab-test", ("224.0.0.251", 5353))
        time.sleep(0.1)
    """
)


def test_mdns_multicast_crosses_the_bridge(lab: Lab) -> None:
    a, b, _ = lab.hosts
    listener = b.popen(
        [sys.executable, "-c", LISTENER, b.address], stdout=subprocess.PIPE, text=True
    )
    assert listener.stdout is not None
    assert listener.stdout.readline().strip() == "ready"
    a.run([sys.executable, "-c", SENDER], check=True, timeout=30)
    assert listener.stdout.readline().split() == ["got", a.address]
    assert listener.wait(timeout=30) == 0
    listener.stdout.close()


def test_shape_installs_qdiscs_on_both_ends_and_unshape_removes_them(lab: Lab) -> None:
    a = lab.hosts[0]

    def qdiscs() -> tuple[str, str]:
        mine = a.run(["tc", "qdisc", "show", "dev", "eth0"], capture_output=True, text=True)
        switch = subprocess.run(
            ["tc", "-n", lab.switch_netns, "qdisc", "show", "dev", a.veth],
            capture_output=True,
            text=True,
            check=True,
        )
        return mine.stdout, switch.stdout

    a.shape(10)
    try:
        for out in qdiscs():
            assert "qdisc tbf" in out and "rate 10Mbit" in out, out
        try:
            a.shape(10, delay_ms=5)
        except LabError as e:  # kernels without sch_netem: a clear refusal
            assert "netem" in str(e)
        else:
            for out in qdiscs():
                assert "qdisc netem" in out and "delay 5ms" in out, out
    finally:
        a.unshape()
    for out in qdiscs():
        assert "tbf" not in out and "netem" not in out, out
    assert pings(a, lab.hosts[1])


def test_link_down_cuts_the_cable_and_link_up_restores_it(lab: Lab) -> None:
    a, b, c = lab.hosts
    assert pings(a, b)
    b.link_down()
    try:
        assert not pings(a, b)
        assert not pings(b, c)
        # b keeps its address: only the cable is cut.
        addr = b.run(["ip", "-4", "-o", "addr", "show", "eth0"], capture_output=True, text=True)
        assert b.address in addr.stdout
        assert pings(a, c)
    finally:
        b.link_up()
    eventually("b to be reachable again", lambda: pings(a, b) and pings(b, c))


def test_a_host_can_join_later(lab: Lab) -> None:
    late = lab.add_host("late")
    assert late.name == "late" and lab.host("late") is late
    assert late.address not in {h.address for h in lab.hosts[:-1]}
    assert pings(late, lab.hosts[0]) and pings(lab.hosts[1], late)


def test_everything_is_removed_even_when_the_body_raises() -> None:
    require_lab()
    with pytest.raises(RuntimeError, match="boom"), Lab(names=["x", "y"]) as lab:
        lab_id = lab.id
        x, y = lab.hosts
        assert (x.name, y.name) == ("x", "y")
        assert len([ns for ns in netns_names() if ns.startswith(f"p2l{lab_id}-")]) == 3
        tracked = x.popen(["sleep", "1000"])
        # A process that left our process group: found through its namespace.
        out = y.run(
            ["sh", "-c", "setsid sleep 1000 >/dev/null 2>&1 & echo $!"],
            capture_output=True,
            text=True,
            check=True,
        )
        escaped = int(out.stdout)
        assert not gone(escaped)
        raise RuntimeError("boom")
    assert tracked.poll() is not None
    eventually("the escaped process to die", lambda: gone(escaped), timeout=10)
    assert_removed(lab_id)
    lab.close()  # idempotent


def test_ctrl_c_removes_the_lab(tmp_path: Path) -> None:
    require_lab()
    script = textwrap.dedent(
        """
        import time
        from p2pfs.lab.netns import Lab
        with Lab(2) as lab:
            lab.hosts[0].popen(["sleep", "1000"])
            print(lab.id, flush=True)
            time.sleep(1000)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    ) as proc:
        try:
            assert proc.stdout is not None
            lab_id = proc.stdout.readline().strip()
            assert len([ns for ns in netns_names() if ns.startswith(f"p2l{lab_id}-")]) == 3
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
    assert_removed(lab_id)


def test_leftovers_of_a_killed_lab_are_removed_at_the_next_start() -> None:
    require_lab()
    script = textwrap.dedent(
        """
        import json, time
        from p2pfs.lab.netns import Lab
        lab = Lab(2, prefix="p2lt").start()
        p = lab.hosts[1].popen(["sleep", "1000"])
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
    assert len([ns for ns in netns_names() if ns.startswith(f"p2lt{lab_id}-")]) == 3
    assert (STATE_DIR / f"{lab_id}.json").exists() and not gone(sleeper)
    with Lab(1, prefix="p2lt") as lab:
        assert lab.id != lab_id
        assert_removed(lab_id, "p2lt")
        eventually("the dead lab's process to die", lambda: gone(sleeper), timeout=10)
        assert cleanup_stale("p2lt") == []  # a live lab is never stale
        assert len([ns for ns in netns_names() if ns.startswith(f"p2lt{lab.id}-")]) == 2
    assert_removed(lab.id, "p2lt")


def test_two_labs_at_once_get_different_subnets() -> None:
    require_lab()
    with Lab(1) as one, Lab(1) as two:
        assert one.subnet != two.subnet and one.id != two.id
        # Same-looking hosts, separate switches: they do not see each other.
        assert one.hosts[0].address != two.hosts[0].address
        assert not pings(one.hosts[0], two.hosts[0])
    with Lab(1, subnet_index=one.subnet_index) as three:
        clash = Lab(1, subnet_index=three.subnet_index)
        with pytest.raises(LabError, match="in use"):
            clash.start()
        assert pings(three.hosts[0], three.hosts[0])


def test_a_forked_child_does_not_remove_its_parents_lab() -> None:
    require_lab()
    with Lab(1) as lab:
        pid = os.fork()
        if pid == 0:  # the child: what its inherited atexit handler would do
            try:
                lab.close()
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        assert len([ns for ns in netns_names() if ns.startswith(f"p2l{lab.id}-")]) == 2
        assert pings(lab.hosts[0], lab.hosts[0])
    assert_removed(lab.id)


def test_tracked_mounts_are_unmounted_at_exit(tmp_path: Path) -> None:
    require_lab()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with Lab(1) as lab:
        host = lab.hosts[0]
        # A mount made from inside a host lands in this machine's mount namespace.
        host.run(["mount", "-t", "tmpfs", "lab-test", str(mnt)], check=True)
        host.track_mount(mnt)
        assert os.path.ismount(mnt)
        state = json.loads((STATE_DIR / f"{lab.id}.json").read_text())
        assert state["mounts"] == [str(mnt)]  # so a dead lab's mounts can be found too
    assert not os.path.ismount(mnt)
