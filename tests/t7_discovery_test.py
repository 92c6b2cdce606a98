"""mDNS discovery: TXT validation (pure), then real zeroconf between lab hosts.

Discovery is only ever run inside lab namespaces here: nothing is sent on this
machine's interfaces. Each host runs ``python -m p2pfs.net.discovery``, which prints a
JSON line per event; waits have generous deadlines and nothing asserts timing.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing
from harness import require_lab
from zeroconf import ServiceStateChange

from p2pfs.lab.netns import Host, Lab
from p2pfs.net.discovery import (
    INSTANCE_PREFIX,
    PROTOCOL_VERSION,
    SERVICE_TYPE,
    Candidate,
    Discovery,
    instance_label,
    parse_candidate,
    txt_record,
    usable_address,
)

NODE = bytes(range(32))
ESTATE = bytes(range(100, 132))
NAME = f"{instance_label(NODE)}.{SERVICE_TYPE}"
DEADLINE_S = 60.0


def good_txt(**override: bytes | None) -> dict[bytes, bytes | None]:
    txt: dict[bytes, bytes | None] = {
        k.encode(): v.encode() for k, v in txt_record(NODE, ESTATE, 7420).items()
    }
    for key, value in override.items():
        if value is None:
            txt.pop(key.encode(), None)
        else:
            txt[key.encode()] = value
    return txt


# -- validation of what the network says (no network) ------------------------------------


@pytest.mark.unit
def test_a_well_formed_service_is_a_candidate() -> None:
    cand = parse_candidate(NAME, good_txt(), ["127.0.0.1", "10.1.2.3", "10.1.2.4"])
    assert cand == Candidate(NODE, ESTATE, PROTOCOL_VERSION, "10.1.2.3", 7420)
    assert NAME.startswith(INSTANCE_PREFIX + NODE.hex()[:32])
    assert len(NAME.split(".")[0]) <= 63


@pytest.mark.parametrize(
    ("override", "why"),
    [
        ({"node": None}, "node is missing"),
        ({"node": b""}, "node is missing"),
        ({"node": b"zz" * 32}, "hex"),
        ({"node": NODE.hex().upper().encode()}, "hex"),
        ({"node": b"a" * 63}, "hex"),
        ({"node": b"ab" * 65}, "hex"),
        ({"estate": None}, "estate is missing"),
        ({"estate": b"\xff\xfe"}, "hex"),
        ({"v": None}, "v is missing"),
        ({"v": b"-1"}, "decimal"),
        ({"v": b"1" * 6}, "decimal"),
        ({"v": b"\xd9\xa1"}, "decimal"),  # an Arabic-Indic digit one, which int() would take
        ({"port": b"0"}, "out of range"),
        ({"port": b"65536"}, "out of range"),
        ({"port": b" 7420"}, "decimal"),
    ],
)
@pytest.mark.unit
def test_malformed_txt_is_refused_with_a_reason(
    override: dict[str, bytes | None], why: str
) -> None:
    with pytest.raises(ValueError, match=why):
        parse_candidate(NAME, good_txt(**override), ["10.1.2.3"])


@pytest.mark.unit
def test_names_and_addresses_are_checked() -> None:
    other = f"{instance_label(bytes(32))}.{SERVICE_TYPE}"
    with pytest.raises(ValueError, match="does not carry its node id"):
        parse_candidate(other, good_txt(), ["10.1.2.3"])
    renamed = f"{instance_label(NODE)}-2.{SERVICE_TYPE}"  # zeroconf's rename on a conflict
    assert parse_candidate(renamed, good_txt(), ["10.1.2.3"]).node_id == NODE
    for bad in (["127.0.0.1"], ["0.0.0.0"], ["224.0.0.251"], ["255.255.255.255"], ["fe80::1"], []):
        with pytest.raises(ValueError, match="no usable IPv4 address"):
            parse_candidate(NAME, good_txt(), bad)
    assert usable_address("192.168.1.20") and not usable_address("not an address")
    # A multi-homed peer: the address on one of our networks is preferred.
    near = [ipaddress.IPv4Network("192.168.7.0/24")]
    two = ["10.1.2.3", "192.168.7.20"]
    assert parse_candidate(NAME, good_txt(), two, near).address == "192.168.7.20"
    assert parse_candidate(NAME, good_txt(), two).address == "10.1.2.3"
    # Unknown keys and valueless keys do no harm.
    txt = {**good_txt(), b"junk": None, b"x" * 200: b"y" * 200}
    assert parse_candidate(NAME, txt, ["10.1.2.3"]).port == 7420


# -- the trio side, with zeroconf's resolve replaced (no network) ----------------------------

Added, Updated, Removed = (
    ServiceStateChange.Added,
    ServiceStateChange.Updated,
    ServiceStateChange.Removed,
)


class FakeResolver:
    """Stands in for zeroconf's resolve: answers what ``records`` holds once ``gate`` opens."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.records: dict[str, tuple[dict[bytes, bytes | None], tuple[str, ...]] | None] = {}
        self.gate = threading.Event()
        self.gate.set()
        self.calls = 0

        def lookup(zc: object, name: str) -> object:
            self.calls += 1
            assert self.gate.wait(10)
            return self.records.get(name)

        monkeypatch.setattr(Discovery, "_lookup", staticmethod(lookup))


async def settle(d: Discovery) -> None:
    """Until every resolve has landed (they run in worker threads)."""
    with trio.fail_after(10):
        await trio.testing.wait_all_tasks_blocked()
        while d._resolving:  # noqa: ASYNC110 (a test polls what worker threads finish)
            await trio.sleep(0.01)


@pytest.mark.unit
async def test_events_become_candidates_updates_and_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeResolver(monkeypatch)
    me = os.urandom(32)
    d = Discovery(me, ESTATE, 7000)
    found: list[Candidate] = []
    lost: list[bytes] = []
    stranger = b"o" * 32
    other_estate = f"{instance_label(stranger)}.{SERVICE_TYPE}"
    myself = f"{instance_label(me)}.{SERVICE_TYPE}"
    fake.records[NAME] = (good_txt(), ("10.1.2.3",))
    fake.records[myself] = (
        {k.encode(): v.encode() for k, v in txt_record(me, ESTATE, 7000).items()},
        ("10.1.2.9",),
    )
    fake.records[other_estate] = (
        {k.encode(): v.encode() for k, v in txt_record(stranger, b"e" * 32, 7000).items()},
        ("10.1.2.8",),
    )
    async with trio.open_nursery() as nursery:

        def event(name: str, change: ServiceStateChange) -> None:
            d._on_event(nursery, None, name, change, found.append, lost.append)  # type: ignore[arg-type]

        for name in (NAME, myself, other_estate):
            event(name, Added)
        await settle(d)
        assert found == [Candidate(NODE, ESTATE, PROTOCOL_VERSION, "10.1.2.3", 7420)]
        assert d.candidates() == found
        event(NAME, Updated)  # nothing changed: no callback
        await settle(d)
        assert len(found) == 1
        fake.records[NAME] = (good_txt(port=b"7421"), ("10.1.2.3",))
        event(NAME, Updated)
        await settle(d)
        assert [c.port for c in found] == [7420, 7421]
        assert [c.port for c in d.candidates()] == [7421]
        event(NAME, Removed)
        assert lost == [NODE] and d.candidates() == []
        assert d.statistics().ignored == 1  # the other estate (itself is not counted)


@pytest.mark.unit
async def test_a_goodbye_during_a_resolve_wins(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeResolver(monkeypatch)
    fake.records[NAME] = (good_txt(), ("10.1.2.3",))
    fake.gate.clear()
    d = Discovery(os.urandom(32), ESTATE, 7000)
    found: list[Candidate] = []
    async with trio.open_nursery() as nursery:
        d._on_event(nursery, None, NAME, Added, found.append, None)  # type: ignore[arg-type]
        await trio.testing.wait_all_tasks_blocked()
        d._on_event(nursery, None, NAME, Removed, found.append, None)  # type: ignore[arg-type]
        fake.gate.set()
    assert found == [] and d.candidates() == []
    assert fake.calls == 1


@pytest.mark.unit
async def test_an_update_during_a_resolve_is_resolved_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeResolver(monkeypatch)
    fake.records[NAME] = (good_txt(), ("10.1.2.3",))
    fake.gate.clear()
    d = Discovery(os.urandom(32), ESTATE, 7000)
    found: list[Candidate] = []
    async with trio.open_nursery() as nursery:
        d._on_event(nursery, None, NAME, Added, found.append, None)  # type: ignore[arg-type]
        await trio.testing.wait_all_tasks_blocked()
        fake.records[NAME] = (good_txt(port=b"9999"), ("10.1.2.3",))
        d._on_event(nursery, None, NAME, Updated, found.append, None)  # type: ignore[arg-type]
        fake.gate.set()
    # The first answer was superseded before it landed: only the newest is reported.
    assert [c.port for c in found] == [9999]
    assert fake.calls == 2


# -- in the lab ---------------------------------------------------------------------------


class Probe:
    """``python -m p2pfs.net.discovery`` in a lab host; its JSON events collected by a thread."""

    def __init__(
        self, host: Host, node: bytes, estate: bytes, port: int, *extra: str, debug: bool = False
    ) -> None:
        self.host, self.node, self.estate, self.port = host, node, estate, port
        argv = [sys.executable, "-m", "p2pfs.net.discovery", node.hex(), estate.hex(), str(port)]
        argv += list(extra) + (["--debug"] if debug else [])
        self.proc = host.popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.events: list[dict[str, Any]] = []
        self.log: list[str] = []
        self._threads = [
            threading.Thread(target=self._read, args=(self.proc.stdout, True), daemon=True),
            threading.Thread(target=self._read, args=(self.proc.stderr, False), daemon=True),
        ]
        for t in self._threads:
            t.start()

    def _read(self, pipe: Any, events: bool) -> None:
        for line in pipe:
            if events:
                self.events.append(json.loads(line))
            else:
                self.log.append(line)

    def found(self) -> dict[str, dict[str, Any]]:
        """Node id hex -> the latest 'found' event for it, minus the ones lost since."""
        view: dict[str, dict[str, Any]] = {}
        for e in list(self.events):
            if e["event"] == "found":
                view[e["node"]] = e
            elif e["event"] == "lost":
                view.pop(e["node"], None)
        return view

    def ever_found(self) -> set[str]:
        return {e["node"] for e in list(self.events) if e["event"] == "found"}

    def stop(self) -> int:
        self.proc.terminate()
        code = self.proc.wait(timeout=30)
        for t in self._threads:
            t.join(10)
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for t in self._threads:
            t.join(10)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()

    def describe(self) -> str:
        return f"{self.host.name}: events {self.events}\nlog tail:\n{''.join(self.log[-20:])}"


def wait_for(what: str, predicate: Callable[[], bool], probes: list[Probe]) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not predicate():
        for p in probes:
            assert p.proc.poll() is None, f"{p.host.name} exited\n{p.describe()}"
        if time.monotonic() > deadline:
            details = "\n".join(p.describe() for p in probes)
            raise AssertionError(f"timed out waiting for {what}\n{details}")
        time.sleep(0.1)


def sees_exactly(probe: Probe, others: list[Probe]) -> bool:
    view = probe.found()
    want = {o.node.hex(): (o.host.address, o.port, o.estate.hex()) for o in others}
    got = {n: (e["address"], e["port"], e["estate"]) for n, e in view.items()}
    return got == want


@pytest.fixture
def lab() -> Iterator[Lab]:
    require_lab()
    with Lab(names=["a", "b", "c", "x", "v"]) as lab:
        yield lab


@pytest.mark.lab
def test_peers_find_each_other_and_only_their_estate(lab: Lab) -> None:
    estate, outsiders = os.urandom(32), os.urandom(32)
    probes: list[Probe] = []
    try:
        members = [
            Probe(lab.host(n), os.urandom(32), estate, 7400 + i) for i, n in enumerate("abc")
        ]
        probes += members
        # Same segment, another estate; and one of ours that speaks another protocol version.
        outsider = Probe(lab.host("x"), os.urandom(32), outsiders, 7410, debug=True)
        newer = Probe(
            lab.host("v"),
            os.urandom(32),
            estate,
            7411,
            "--protocol-version",
            str(PROTOCOL_VERSION + 1),
        )
        probes += [outsider, newer]
        a, b, c = members
        for m in members:
            wait_for(
                f"{m.host.name} to see the two other members",
                lambda m=m: sees_exactly(m, [o for o in members if o is not m]),
                probes,
            )
        # The outsider heard the members (so they heard it too) and refused them all.
        wait_for(
            "the outsider to refuse the three members",
            lambda: all(
                any(m.node.hex() in line and "not ours" in line for line in outsider.log)
                for m in members
            ),
            probes,
        )
        for m in members:
            assert outsider.node.hex() not in m.ever_found()
            assert newer.node.hex() not in m.ever_found()
            assert m.node.hex() not in newer.ever_found()
        assert outsider.ever_found() == set()

        # c stops (SIGTERM: goodbye): a and b drop it and carry on.
        assert c.stop() == 0
        assert c.events[-1]["event"] == "stopped"
        for m in (a, b):
            wait_for(
                f"{m.host.name} to drop c",
                lambda m=m: c.node.hex() not in m.found(),
                [a, b],
            )
            assert sees_exactly(m, [o for o in (a, b) if o is not m])

        # A host that joins later is found, and finds the others.
        late = Probe(lab.add_host("late"), os.urandom(32), estate, 7420)
        probes.append(late)
        for m in (a, b):
            wait_for(
                f"{m.host.name} to find the late host",
                lambda m=m: sees_exactly(m, [o for o in (a, b, late) if o is not m]),
                [a, b, late],
            )
        wait_for("the late host to find a and b", lambda: sees_exactly(late, [a, b]), [late])
        for p in (a, b, late):
            assert p.stop() == 0, p.describe()
    finally:
        for p in probes:
            p.close()


@pytest.mark.lab
def test_a_killed_peer_does_not_disturb_the_others(lab: Lab) -> None:
    estate = os.urandom(32)
    probes = [Probe(lab.host(n), os.urandom(32), estate, 7500 + i) for i, n in enumerate("ab")]
    try:
        a, b = probes
        wait_for("a and b to meet", lambda: sees_exactly(a, [b]) and sees_exactly(b, [a]), probes)
        b.proc.kill()  # no goodbye: a keeps b as a candidate (TLS will find it gone)
        b.proc.wait()
        restarted = Probe(lab.host("b"), b.node, estate, 7502)
        probes.append(restarted)
        wait_for("a to see b's new port", lambda: a.found()[b.node.hex()]["port"] == 7502, [a])
        assert a.stop() == 0, a.describe()
    finally:
        for p in probes:
            p.close()
