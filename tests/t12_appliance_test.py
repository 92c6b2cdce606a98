"""Appliance mode: the desktop link's user/admin split, and the desktop's thin FUSE client.

The split tests run a real daemon (no mount, no estate) whose desktop link listens
on 127.0.0.1, and talk to it as a desktop would. The thin-client tests put the
appliance and the desktop in two lab namespaces (docs/lab.md) and mount through
the link with ``p2pfs mount --appliance``.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import trio
from harness import mounted, require_lab, run_cli

from p2pfs.appliance.link_client import (
    ApplianceLink,
    ApplianceUnavailable,
    LinkClient,
    LinkError,
    with_link,
)
from p2pfs.appliance.thin_fs import ThinFileSystem, read_state
from p2pfs.fs import fuse
from p2pfs.fsutil import pid_alive as cli_alive
from p2pfs.home import Home
from p2pfs.lab.netns import Host, Lab
from p2pfs.lab.smbd import start_smbd_in_lab
from p2pfs.net import wire
from p2pfs.net.link import Address, parse_address, vsock_unavailable
from p2pfs.node import control
from p2pfs.node.control import ControlServer
from p2pfs.node.daemon import Daemon
from p2pfs.node.desktop_api import ADMIN_OPERATIONS, ADMIN_REFUSED, INFO_OPERATIONS, PIN_OPERATIONS
from p2pfs.node.desktop_view import desktop_peers, desktop_status
from p2pfs.node.operations import Operations
from p2pfs.trust.desktop import ApplianceKeys, DesktopToken, TokenRefused, load_token

MIB = 1024 * 1024


def make_tree(root: Path, big_mib: int = 6) -> dict[str, str]:
    rng = random.Random(12)
    (root / "docs" / "deep").mkdir(parents=True)
    for i in range(12):
        (root / "docs" / f"n{i}.txt").write_bytes(rng.randbytes(rng.randint(0, 300_000)))
    (root / "docs" / "deep" / "x.bin").write_bytes(rng.randbytes(1_500_000))
    (root / "docs" / "empty").write_bytes(b"")
    with open(root / "big.img", "wb") as f:
        for _ in range(big_mib):
            f.write(rng.randbytes(MIB))
    (root / "link").symlink_to("docs/n1.txt")
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


def write_config(
    home: Path, listen: str, *, desktop_pin: bool = False, snapshots: bool = True
) -> None:
    (home / "config.toml").write_text(
        f'[appliance]\nuser_listen = ["{listen}"]\ndesktop_pin = {str(desktop_pin).lower()}\n'
        f"desktop_snapshots = {str(snapshots).lower()}\n"
    )


def second_snapshot(home: Path, src: Path) -> dict[str, str]:
    """Change the tree and import it again (snapshot 2); the new tree's digests."""
    (src / "docs" / "n0.txt").write_bytes(b"changed in snapshot 2\n")
    (src / "docs" / "n2.txt").unlink()
    (src / "added.txt").write_bytes(b"new in snapshot 2\n")
    run_cli(home, "import", str(src), "tools", check=True)
    return {
        str(p.relative_to(src)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in src.rglob("*")
        if p.is_file() and not p.is_symlink()
    }


@dataclass
class Appliance:
    home: Path
    address: Address
    token: Path
    proc: subprocess.Popen[bytes]
    tree: dict[str, str]
    source: Path
    first: dict[str, str]  # the tree of snapshot 1 (the same as ``tree`` without a second)

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = control.call(self.home / "run" / "control.sock", "status")
        return result


def wait_listening(home: Path, proc: subprocess.Popen[bytes], log: Path) -> str:
    deadline = time.monotonic() + 60
    while True:
        assert proc.poll() is None, log.read_text()
        try:
            st = control.call(home / "run" / "control.sock", "status", timeout=5)
            return str(st["desktop_link"]["listening"][0])
        except Exception:
            assert time.monotonic() < deadline, "the appliance daemon did not start"
            time.sleep(0.1)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Appliance]:
    with running_appliance(tmp_path_factory.mktemp("appliance")) as app:
        yield app


@contextlib.contextmanager
def running_appliance(
    work: Path, *, desktop_pin: bool = False, snapshots: bool = True, second: bool = False
) -> Iterator[Appliance]:
    """A daemon serving desktops on 127.0.0.1 (volume ``tools``; with ``second``, two
    snapshots of it)."""
    home = work / "home"
    first = tree = make_tree(work / "src", big_mib=3)
    run_cli(home, "init", check=True)
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(work / "src"), "tools", check=True)
    if second:
        tree = second_snapshot(home, work / "src")
    write_config(home, "127.0.0.1:0", desktop_pin=desktop_pin, snapshots=snapshots)
    run_cli(
        home, "appliance", "token", "add", "alice", "--out", str(work / "alice.token"), check=True
    )
    log = work / "daemon.log"
    with open(log, "ab") as logf:
        proc = subprocess.Popen(
            [sys.executable, "-m", "p2pfs", "--home", str(home), "daemon"], stdout=logf, stderr=logf
        )
    try:
        address = parse_address(wait_listening(home, proc, log))
        yield Appliance(home, address, work / "alice.token", proc, tree, work / "src", first)
    finally:
        stop(proc)


async def connect(app: Appliance, token: DesktopToken | None = None) -> LinkClient:
    return await LinkClient.connect(app.address, token or load_token(app.token), within=10)


async def call(app: Appliance, op: str, **args: Any) -> Any:
    async def one(link: ApplianceLink) -> Any:
        return await link.call(op, **args)

    return await with_link(app.address, load_token(app.token), 10, one)


# -- the user/admin split ------------------------------------------------------------


@pytest.mark.unit
def test_every_admin_operation_of_the_daemon_is_named(tmp_path: Path) -> None:
    """The daemon's admin face, all of it, is in the list the desktop link refuses."""
    server = ControlServer(tmp_path / "sock")
    Operations(Daemon(Home(tmp_path), None)).register(server, debug_faults=True)
    admin = {name for name, op in server.ops.items() if op.face == "admin"}
    assert admin and admin <= ADMIN_OPERATIONS
    user = {name for name, op in server.ops.items() if op.face == "user"}
    # Every user operation is either served (info, pins by policy) or refused by name.
    assert user <= set(INFO_OPERATIONS) | set(PIN_OPERATIONS) | ADMIN_OPERATIONS


@pytest.mark.unit
async def test_every_admin_operation_is_refused_over_the_desktop_link(
    appliance: Appliance,
) -> None:
    before = appliance.status()["desktop_link"]["refused_admin"]
    client = await connect(appliance)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        for op in sorted(ADMIN_OPERATIONS):
            with pytest.raises(LinkError) as e:
                await client.request(op, within=10, volume="tools", path="/", repair=True)
            assert str(e.value) == f"{ADMIN_REFUSED} ({op!r})", op
            assert e.value.errno == errno.EACCES
        # The link is still up and serves user operations after all those refusals.
        status = await client.request("status", within=10)
        assert status["volumes"][0]["name"] == "tools"
        await client.aclose()
    after = appliance.status()
    assert after["desktop_link"]["refused_admin"] == before + len(ADMIN_OPERATIONS)
    assert appliance.proc.poll() is None  # "stop" was refused: the daemon runs on


@pytest.mark.unit
async def test_pin_is_refused_by_the_default_policy(appliance: Appliance) -> None:
    for op in PIN_OPERATIONS:
        with pytest.raises(LinkError, match="not allowed from desktops by this appliance's policy"):
            await call(appliance, op, volume="tools", path="/docs")
    assert appliance.status()["pins"] == 0


@pytest.mark.unit
def test_desktops_pin_and_unpin_when_the_policy_allows(tmp_path: Path) -> None:
    with running_appliance(tmp_path, desktop_pin=True) as app:
        link = ["--token", str(app.token), "--appliance", str(app.address)]
        pin = run_cli(None, "appliance", "pin", *link, "tools:/docs", check=True)
        assert "pinned tools:/docs: complete" in pin.stdout
        assert [p["name"] for p in app_pins(app)] == ["tools:/docs"]
        run_cli(None, "appliance", "unpin", *link, "tools:/docs", check=True)
        assert app_pins(app) == []
        status = run_cli(None, "appliance", "status", *link, "--json", check=True)
        assert json.loads(status.stdout)["policy"]["pin"] is True
        assert app.status()["desktop_link"]["desktop_pin"] is True


@pytest.mark.unit
def test_a_bad_desktop_listen_address_is_a_clear_start_up_error(home: Path) -> None:
    # 192.0.2.1 (TEST-NET-1) is on no interface here: binding fails, nothing is sent.
    for listen, message in (
        ("192.0.2.1:7421", "cannot listen for desktops on 192.0.2.1:7421"),
        ("127.0.0.1:99999", "'127.0.0.1:99999': the port must be 0-65535"),
    ):
        write_config(home, listen)
        proc = run_cli(home, "daemon", timeout=120)
        assert proc.returncode != 0
        assert f"p2pfs: error: {message}" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr


def app_pins(app: Appliance) -> list[dict[str, Any]]:
    pins: list[dict[str, Any]] = control.call(app.home / "run" / "control.sock", "pins")["pins"]
    return pins


@pytest.mark.unit
async def test_unknown_operations_are_refused(appliance: Appliance) -> None:
    for op in ("get", "chunk", "object", "have", "snapshot", "", "x" * 1000):
        with pytest.raises(LinkError, match="unknown operation"):
            await call(appliance, op)


@pytest.mark.unit
async def test_a_wrong_token_is_refused(appliance: Appliance, tmp_path: Path) -> None:
    good = load_token(appliance.token)
    before = appliance.status()["desktop_link"]["refused_tokens"]
    wrong_secret = replace(good, secret=bytes(32))
    unknown_desktop = replace(good, desktop="mallory")
    for token in (wrong_secret, unknown_desktop):
        with pytest.raises(TokenRefused, match="refused: no valid token"):
            await connect(appliance, token)
    # A token pinning another appliance's certificate never sends its secret here.
    other = replace(good, server_fingerprint=bytes(32))
    with pytest.raises(TokenRefused, match="does not match the fingerprint"):
        await connect(appliance, other)
    assert appliance.status()["desktop_link"]["refused_tokens"] == before + 2
    # A removed token stops working at once; a new one works.
    bob = tmp_path / "bob.token"
    run_cli(appliance.home, "appliance", "token", "add", "bob", "--out", str(bob), check=True)
    client = await connect(appliance, load_token(bob))
    await client.aclose()
    run_cli(appliance.home, "appliance", "token", "remove", "bob", check=True)
    with pytest.raises(TokenRefused):
        await connect(appliance, load_token(bob))


@pytest.mark.unit
async def test_the_token_cannot_read_keys_or_chunks(appliance: Appliance) -> None:
    home = appliance.home
    secrets_on_disk = [
        (home / "node.key").read_bytes(),
        (home / "appliance" / "link.key").read_bytes(),
        (home / "appliance" / "handles.key").read_bytes(),
    ]
    # Paths are names inside the volumes, never the node's files.
    for path in (
        b"../node.key",
        b"tools/../../node.key",
        b"/node.key",
        b"node.key",
        b"tools/./big.img",
        b"store",
        b"appliance/link.key",
        b"tools//big.img",
        b"tools/big.img\0",
        b"tools/.snapshots/1/../../../node.key",
        b"tools/.snapshots/01/big.img",
        b"tools/.snapshots/2/big.img",  # no such snapshot
        b"tools/.snapshots/x/big.img",
    ):
        for op in ("stat", "list", "open"):
            with pytest.raises(LinkError) as e:
                await call(appliance, op, path=path)
            assert e.value.errno in (errno.ENOENT, errno.ENOTDIR), (op, path)
    # No object or chunk is readable by its id: a read needs a handle that open issued.
    chunk_files = [p for p in (home / "store").rglob("*") if p.is_file() and len(p.name) == 64]
    assert chunk_files
    chunk_id = bytes.fromhex(chunk_files[0].name)
    for handle in (bytes(32), b"", chunk_id):
        with pytest.raises(LinkError, match=r"read handle was not issued|blob and handle"):
            await call(appliance, "read", blob=chunk_id, handle=handle, offset=0, size=4096)
    # A handle is bound to its blob: it does not open another one.
    opened = await call(appliance, "open", path=b"tools/docs/n1.txt")
    with pytest.raises(LinkError, match="handle is for another file"):
        await call(appliance, "read", blob=chunk_id, handle=opened["handle"], offset=0, size=10)
    # Status answers hold no key.
    status = json.dumps(await call(appliance, "status")).encode()
    for secret in secrets_on_disk:
        assert secret not in status


@pytest.mark.unit
async def test_reads_over_the_link_are_byte_identical(appliance: Appliance) -> None:
    client = await connect(appliance)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.run)
        root = await client.request("list", within=10, path=b"")
        assert [e["name"] for e in root["entries"]] == [b"tools"]
        for rel, digest in appliance.tree.items():
            opened = await client.request("open", within=10, path=b"tools/" + rel.encode())
            data = bytearray()
            while len(data) < opened["size"]:
                data += await client.request(
                    "read",
                    within=10,
                    blob=opened["blob"],
                    handle=opened["handle"],
                    offset=len(data),
                    size=1 << 20,
                )
            assert hashlib.sha256(data).hexdigest() == digest, rel
        link = await client.request("stat", within=10, path=b"tools/link")
        assert link["kind"] == "symlink" and link["target"] == b"docs/n1.txt"
        await client.aclose()


# -- a removed or replaced token ends its desktop's live sessions ------------------------


def add_token(app: Appliance, desktop: str, out: Path) -> DesktopToken:
    run_cli(app.home, "appliance", "token", "add", desktop, "--out", str(out), check=True)
    return load_token(out)


def read_args(opened: dict[str, Any], offset: int, size: int = 4096) -> dict[str, Any]:
    return {"blob": opened["blob"], "handle": opened["handle"], "offset": offset, "size": size}


async def read_all(link: ApplianceLink, path: bytes) -> bytes:
    opened = await link.call("open", path=path)
    data = bytearray()
    while len(data) < opened["size"]:
        data += await link.call("read", **read_args(opened, len(data), 1 << 20))
    return bytes(data)


async def call_read_all(app: Appliance, path: bytes) -> bytes:
    async def one(link: ApplianceLink) -> bytes:
        return await read_all(link, path)

    return await with_link(app.address, load_token(app.token), 10, one)


async def wait_ended(link: ApplianceLink, within: float) -> float:
    """Seconds until the appliance ended the link's session; fails after ``within``."""
    assert link.client is not None
    start = time.monotonic()
    with trio.move_on_after(within):
        await link.client.closed.wait()
    took = time.monotonic() - start
    assert link.client.closed.is_set(), f"the session was still open after {within} s"
    return took


ENDED = "the appliance ended the session: the desktop's token was removed or replaced"


@pytest.mark.unit
async def test_removing_a_token_ends_the_open_session_within_a_second(
    appliance: Appliance, tmp_path: Path
) -> None:
    token = add_token(appliance, "carol", tmp_path / "carol.token")
    before = appliance.status()["desktop_link"]["sessions_ended"]
    async with trio.open_nursery() as nursery:
        link = ApplianceLink(appliance.address, token, 5, nursery)
        opened = await link.call("open", path=b"tools/big.img")
        assert len(await link.call("read", **read_args(opened, 0))) == 4096

        # What `p2pfs appliance token remove carol` does, timed from the moment it happens.
        ApplianceKeys(Home(appliance.home)).remove("carol")
        assert await wait_ended(link, 1.0) < 1.0
        assert link.client is not None and link.client.close_reason == ENDED
        # A read on the open session (its handle still in hand) fails like a broken link,
        # with that reason, and the link does not come back with the old token.
        for _ in range(2):
            with pytest.raises(ApplianceUnavailable, match=ENDED) as e:
                await link.call("read", **read_args(opened, 4096))
            assert e.value.errno == errno.EIO
        await link.aclose()
        nursery.cancel_scope.cancel()
    with pytest.raises(TokenRefused, match="refused: no valid token for desktop 'carol'"):
        await connect(appliance, token)
    assert appliance.status()["desktop_link"]["sessions_ended"] == before + 1


@pytest.mark.unit
async def test_replacing_a_token_ends_the_session_and_voids_its_handles(
    appliance: Appliance, tmp_path: Path
) -> None:
    old = add_token(appliance, "dave", tmp_path / "dave-1.token")
    async with trio.open_nursery() as nursery:
        link = ApplianceLink(appliance.address, old, 5, nursery)
        opened = await link.call("open", path=b"tools/docs/n1.txt")
        assert await link.call("read", **read_args(opened, 0, 10))
        new = add_token(appliance, "dave", tmp_path / "dave-2.token")  # the CLI, as an admin
        await wait_ended(link, 1.0)
        with pytest.raises(ApplianceUnavailable, match=ENDED):
            await link.call("stat", path=b"tools")
        await link.aclose()
        # The new token's session cannot use the handle the old token's session got.
        fresh = ApplianceLink(appliance.address, new, 5, nursery)
        with pytest.raises(LinkError, match="not issued to this desktop") as e:
            await fresh.call("read", **read_args(opened, 0, 10))
        assert e.value.errno == errno.EACCES
        reopened = await fresh.call("open", path=b"tools/docs/n1.txt")
        assert reopened["handle"] != opened["handle"]
        want = (appliance.source / "docs" / "n1.txt").read_bytes()
        assert await read_all(fresh, b"tools/docs/n1.txt") == want
        await fresh.aclose()
        nursery.cancel_scope.cancel()
    with pytest.raises(TokenRefused):
        await connect(appliance, old)


@pytest.mark.unit
async def test_a_read_handle_of_one_desktop_is_refused_to_another(
    appliance: Appliance, tmp_path: Path
) -> None:
    erin = add_token(appliance, "erin", tmp_path / "erin.token")
    opened = await call(appliance, "open", path=b"tools/docs/n3.txt")  # alice's handle

    async def read_as_erin(link: ApplianceLink) -> Any:
        return await link.call("read", **read_args(opened, 0, 10))

    with pytest.raises(LinkError, match="not issued to this desktop") as e:
        await with_link(appliance.address, erin, 10, read_as_erin)
    assert e.value.errno == errno.EACCES
    assert await call(appliance, "read", **read_args(opened, 0, 10))  # alice's own: fine


# -- what a desktop sees of the appliance ---------------------------------------------


@pytest.mark.unit
async def test_status_and_peers_over_the_link_name_no_path_and_no_address(
    appliance: Appliance,
) -> None:
    full = appliance.status()  # the admin's view holds both: the test would see them
    assert str(appliance.home) in json.dumps(full) and "127.0.0.1" in json.dumps(full)
    status = await call(appliance, "status")
    peers = await call(appliance, "peers")
    for answer in (status, peers):
        text = json.dumps(answer)
        assert str(appliance.home) not in text and "127.0.0.1" not in text, text
        assert "/" not in text, text  # no path at all
    assert set(status) == {
        "appliance",
        "estate",
        "health",
        "problems",
        "volumes",
        "offline_ready",
        "pins",
        "peers",
        "cache",
        "bytes_from",
        "corrupt_chunks_rejected",
        "uptime_s",
        "policy",
    }
    assert status["appliance"] == full["node_id"]
    assert status["estate"] is None
    # No estate: it can serve only what it holds.
    assert status["health"] == "offline"
    assert any("joined no estate" in p for p in status["problems"])
    [tools] = status["volumes"]
    assert (tools["name"], tools["seq"]) == ("tools", 1)
    assert abs(tools["snapshot_time"] - time.time()) < 3600
    assert status["pins"] == {"count": 0, "complete": 0, "bytes": 0}
    assert status["offline_ready"] is True
    assert status["peers"] == {"connected": 0, "known": 0}
    assert status["cache"]["used"] == full["cache"]["bytes"]
    # The effective quota follows the disk's free space, which other writers move
    # between the two answers: the same figure, not the same byte.
    quota, full_quota = status["cache"]["quota"], full["cache"]["quota"]
    assert set(status["cache"]) == {"used", "quota"}
    assert (quota is None) == (full_quota is None)
    if quota is not None:
        assert abs(quota - full_quota) <= full_quota // 100
    assert set(status["bytes_from"]) == {"local", "peers", "origin"}
    assert status["corrupt_chunks_rejected"] == 0
    assert status["uptime_s"] >= 0
    assert status["policy"] == {"pin": False, "snapshots": True}
    assert peers == {"peers": [], "connected": 0, "known": 0}

    # The command line: lines for a person, or the same JSON.
    link = ["--token", str(appliance.token), "--appliance", str(appliance.address)]
    text = run_cli(None, "appliance", "status", *link, check=True).stdout
    assert text.startswith(f"appliance {full['node_id']}: offline\n"), text
    assert "volume tools: snapshot 1 of " in text and "policy: pin from desktops refused" in text
    assert str(appliance.home) not in text and "127.0.0.1" not in text
    as_json = json.loads(run_cli(None, "appliance", "status", *link, "--json", check=True).stdout)
    assert set(as_json) == set(status) and as_json["volumes"] == status["volumes"]
    text = run_cli(None, "appliance", "peers", *link, check=True).stdout
    assert text.strip() == "0 connected of 0 known"
    as_json = json.loads(run_cli(None, "appliance", "peers", *link, "--json", check=True).stdout)
    assert as_json == peers


@pytest.mark.unit
def test_the_desktop_view_drops_addresses_ports_and_paths() -> None:
    """desktop_view on a status with peers (the lab has them; here the JSON is written
    out): peers as 16 hex digits, a state and bytes; health from what is wrong."""
    full: dict[str, Any] = {
        "node_id": "ab" * 16,
        "home": "/var/lib/p2pfs",
        "daemon": {"pid": 7, "uptime_s": 12.5, "mountpoint": "/srv/p2pfs"},
        "volumes": [{"name": "tools", "id": "cd" * 16, "seq": 3}],
        "estate": "ef" * 16,
        "port": 7420,
        "peers": [
            {
                "node_id": "12" * 16,
                "address": "10.0.0.5",
                "port": 7420,
                "state": "connected",
                "bytes_from": 100,
                "last_error": "10.0.0.5:7420 refused",
            },
            {
                "node_id": "34" * 16,
                "address": "10.0.0.6",
                "port": 7420,
                "state": "quarantined",
                "bytes_from": 5,
                "quarantine_reason": "bad chunk from 10.0.0.6",
            },
        ],
        "quarantined_peers": 1,
        "cache": {"bytes": 96, "quota": 100},
        "bytes_from": {"local": 1, "peers": 105, "origin": 2},
        "corrupt_chunks_rejected": 1,
        "scrub": {"unhealed": 0},
    }
    pins = [
        {"name": "tools:/a", "complete": True, "bytes": 10},
        {"name": "tools:/b", "complete": False, "bytes": 4},
    ]
    view = desktop_peers(full)
    assert view == {
        "peers": [
            {"peer": "12" * 8, "state": "connected", "bytes_from": 100},
            {"peer": "34" * 8, "state": "quarantined", "bytes_from": 5},
        ],
        "connected": 1,
        "known": 2,
    }
    st = desktop_status(full, pins, {}, allow_pin=True, snapshots=False)
    for answer in (view, st):
        text = json.dumps(answer)
        assert "10.0.0" not in text and "7420" not in text, text
        assert "/var/lib" not in text and "/srv" not in text, text
    assert st["health"] == "degraded"
    assert st["problems"] == [
        "no volume to read yet",  # no heads given
        "1 peer quarantined for sending bad data",
        "1 of 2 pins not complete: not everything pinned reads offline yet",
        "the cache is 96% full",
    ]
    assert st["pins"] == {"count": 2, "complete": 1, "bytes": 14}
    assert st["offline_ready"] is False and st["uptime_s"] == 12.5
    assert st["policy"] == {"pin": True, "snapshots": False}
    assert st["peers"] == {"connected": 1, "known": 2}
    calm = {**full, "peers": full["peers"][:1], "quarantined_peers": 0, "cache": {"bytes": 1}}
    calm_st = desktop_status(calm, [], {}, allow_pin=False, snapshots=True)
    assert (calm_st["health"], calm_st["problems"]) == ("degraded", ["no volume to read yet"])
    alone = {**calm, "peers": []}
    assert desktop_status(alone, [], {}, allow_pin=False, snapshots=True)["health"] == "offline"


# -- .snapshots on the link follows [appliance] desktop_snapshots ------------------------


@pytest.mark.unit
async def test_snapshots_over_the_link_read_byte_identical(tmp_path: Path) -> None:
    with running_appliance(tmp_path, second=True) as app:
        root = await call(app, "list", path=b"tools")
        assert b".snapshots" not in [e["name"] for e in root["entries"]]  # hidden, as mounted
        snapdir = await call(app, "stat", path=b"tools/.snapshots")
        assert (snapdir["kind"], snapdir["mode"]) == ("dir", 0o555)
        listing = await call(app, "list", path=b"tools/.snapshots")
        assert [e["name"] for e in listing["entries"]] == [b"1", b"2"]
        one, two = listing["entries"]
        assert one["snapshot"] != two["snapshot"]
        head = await call(app, "stat", path=b"tools/docs/n0.txt")
        assert head["snapshot"] == two["snapshot"]
        # Snapshot 1 is the first import, byte for byte; snapshot 2 the head.
        for rel, digest in app.first.items():
            data = await call_read_all(app, b"tools/.snapshots/1/" + rel.encode())
            assert hashlib.sha256(data).hexdigest() == digest, rel
        for rel, digest in app.tree.items():
            data = await call_read_all(app, b"tools/.snapshots/2/" + rel.encode())
            assert hashlib.sha256(data).hexdigest() == digest, rel
        assert "docs/n2.txt" in app.first and "docs/n2.txt" not in app.tree
        old = await call(app, "stat", path=b"tools/.snapshots/1/docs/n2.txt")
        assert old["snapshot"] == one["snapshot"]
        link = await call(app, "stat", path=b"tools/.snapshots/1/link")
        assert link["target"] == b"docs/n1.txt"
        with pytest.raises(LinkError) as e:
            await call(app, "stat", path=b"tools/.snapshots/1/added.txt")
        assert e.value.errno == errno.ENOENT
        for missing in (b"tools/.snapshots/3", b"tools/.snapshots/0", b"tools/.snapshots/1x"):
            with pytest.raises(LinkError) as e:
                await call(app, "list", path=missing)
            assert e.value.errno == errno.ENOENT, missing
        assert (await call(app, "status"))["policy"]["snapshots"] is True


@pytest.mark.unit
async def test_snapshots_are_not_offered_when_the_policy_says_no(tmp_path: Path) -> None:
    with running_appliance(tmp_path, snapshots=False, second=True) as app:
        for op, path in (
            ("stat", b"tools/.snapshots"),
            ("list", b"tools/.snapshots"),
            ("stat", b"tools/.snapshots/1"),
            ("open", b"tools/.snapshots/1/big.img"),
        ):
            with pytest.raises(LinkError) as e:
                await call(app, op, path=path)
            assert e.value.errno == errno.ENOENT, (op, path)
        assert (await call(app, "status"))["policy"]["snapshots"] is False
        assert app.status()["desktop_link"]["desktop_snapshots"] is False
        assert await call_read_all(app, b"tools/added.txt") == b"new in snapshot 2\n"


@pytest.mark.mount
def test_the_appliance_mount_hides_snapshots_when_the_policy_says_no(tmp_path: Path) -> None:
    """The mount an appliance's SMB share exports follows the same policy as the link;
    a node that serves no desktops keeps its .snapshots/ whatever the option says."""
    home = tmp_path / "home"
    make_tree(tmp_path / "src", big_mib=1)
    run_cli(home, "init", check=True)
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(tmp_path / "src"), "tools", check=True)
    second_snapshot(home, tmp_path / "src")
    write_config(home, "127.0.0.1:0", snapshots=False)
    with mounted(home, tmp_path / "mnt", read_only=True) as mnt:
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "tools" / ".snapshots")
        with pytest.raises(FileNotFoundError):
            os.stat(mnt / "tools" / ".snapshots" / "1" / "docs" / "n2.txt")
        assert (mnt / "tools" / "added.txt").read_bytes() == b"new in snapshot 2\n"
    (home / "config.toml").write_text("[appliance]\ndesktop_snapshots = false\n")
    with mounted(home, tmp_path / "mnt2", read_only=True) as mnt:
        assert sorted(os.listdir(mnt / "tools" / ".snapshots")) == ["1", "2"]
        assert (mnt / "tools" / ".snapshots" / "1" / "docs" / "n2.txt").is_file()


@pytest.mark.unit
async def test_hostile_bytes_before_the_token_close_only_that_connection(
    appliance: Appliance,
) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    for garbage in (
        b"\xff\xff\xff\xff" + b"x" * 100,  # a frame length far beyond the bound
        wire.encode({"t": "req", "id": 1, "op": "status"}),  # a request before the token
        wire.encode({"t": "auth", "v": 1, "desktop": "alice", "secret": "not bytes"}),
    ):
        with socket.create_connection((appliance.address.host, appliance.address.port)) as raw:
            raw.settimeout(15)
            with ctx.wrap_socket(raw) as tls:
                tls.sendall(garbage)
                answer = b""
                try:
                    while chunk := tls.recv(65536):
                        answer += chunk
                except (ssl.SSLError, OSError):
                    pass
        assert b"status" not in answer and b"node_id" not in answer
    assert (await call(appliance, "status"))["volumes"]
    assert appliance.proc.poll() is None


@pytest.mark.unit
def test_vsock_transport_parses_and_listens() -> None:
    """AF_VSOCK sits behind the same Address interface. Connecting needs vhost-vsock or
    vsock_loopback in the kernel, which this machine lacks: only parsing and binding run."""
    addr = parse_address("vsock:3:7421")
    assert (addr.kind, addr.host, addr.port) == ("vsock", "3", 7421)
    assert parse_address("vsock:any:7421").host == str(0xFFFFFFFF)
    assert parse_address("10.0.0.2:7421") == Address("tcp", "10.0.0.2", 7421)
    assert parse_address("[fd00::2]:9").host == "fd00::2"
    reason = vsock_unavailable()
    if reason:
        pytest.skip(f"AF_VSOCK: {reason}")

    async def listen() -> None:
        listeners = await parse_address("vsock:any:0").listen()
        assert listeners
        for listener in listeners:
            await listener.aclose()

    trio.run(listen)


@pytest.mark.unit
def test_thin_filesystem_offers_what_the_fuse_adapter_calls() -> None:
    """ThinFileSystem is handed to fuse.Operations in place of vfs.FileSystem: every
    ``self.fs.X`` the adapter uses must exist on it (this catches a new handler)."""
    import ast
    import inspect

    used = {
        node.attr
        for node in ast.walk(ast.parse(inspect.getsource(fuse)))
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Attribute)
        and node.value.attr == "fs"
    }
    assert used
    missing = [name for name in sorted(used) if not hasattr(ThinFileSystem, name)]
    missing = [m for m in missing if m != "errors"]  # an instance attribute
    assert not missing, f"ThinFileSystem lacks {missing}"


# -- the thin client, appliance and desktop in two lab namespaces ---------------------


@dataclass
class LabAppliance:
    lab: Lab
    appliance: Host
    desktop: Host
    home: Path
    token: Path
    tree: dict[str, str]
    source: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "ab") as logf:
            argv = [sys.executable, "-m", "p2pfs", "--home", str(self.home), "daemon"]
            self.proc = self.appliance.popen(argv, stdout=logf, stderr=logf)
        wait_listening(self.home, self.proc, self.log)

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None


@pytest.fixture(scope="module")
def lab_appliance(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabAppliance]:
    require_lab()
    work = tmp_path_factory.mktemp("lab-appliance")
    home = work / "home"
    tree = make_tree(work / "src", big_mib=24)
    run_cli(home, "init", check=True)
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(work / "src"), "tools", check=True)
    with Lab(names=["appl", "desk"]) as lab:
        appl, desk = lab.hosts
        listen = f"{appl.address}:7421"
        write_config(home, listen)
        token = work / "desk.token"
        run_cli(home, "appliance", "token", "add", "desk", "--out", str(token), "--address", listen)
        env = LabAppliance(lab, appl, desk, home, token, tree, work / "src", work / "daemon.log")
        try:
            env.start()
            yield env
        finally:
            env.stop()


def thin_mount(env: LabAppliance, mnt: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    mnt.mkdir(exist_ok=True)
    env.desktop.track_mount(mnt)
    argv = [sys.executable, "-m", "p2pfs", "mount", "--token", str(env.token), *extra, str(mnt)]
    return env.desktop.run(argv, capture_output=True, text=True, timeout=120)


def read_error(path: Path) -> str:
    """Read a file in a child process (so a hang could not stall the test): its errno name."""
    code = (
        "import errno, sys\n"
        "try:\n"
        f"    open({str(path)!r}, 'rb').read()\n"
        "except OSError as e:\n"
        "    print(errno.errorcode[e.errno]); sys.exit(0)\n"
        "print('OK')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    return proc.stdout.strip()


@pytest.mark.lab
@pytest.mark.fuse
def test_thin_client_reads_fails_fast_and_unmounts(
    lab_appliance: LabAppliance, tmp_path: Path
) -> None:
    env = lab_appliance
    mnt = tmp_path / "p2pfs"
    proc = thin_mount(env, mnt, "--deadline", "3")
    assert proc.returncode == 0, proc.stderr
    try:
        assert os.path.ismount(mnt)
        assert sorted(os.listdir(mnt)) == ["tools"]
        # Byte-identical reads of every file; names, sizes, modes and the symlink as imported.
        for rel, digest in env.tree.items():
            data = (mnt / "tools" / rel).read_bytes()
            assert hashlib.sha256(data).hexdigest() == digest, rel
            src = (env.source / rel).stat()
            st = (mnt / "tools" / rel).stat()
            assert (st.st_size, st.st_mode & 0o777) == (src.st_size, src.st_mode & 0o777)
        assert sorted(os.listdir(mnt / "tools" / "docs")) == sorted(os.listdir(env.source / "docs"))
        assert os.readlink(mnt / "tools" / "link") == "docs/n1.txt"
        with pytest.raises(OSError) as e:
            (mnt / "tools" / "new").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        blob = os.getxattr(mnt / "tools" / "big.img", "user.p2pfs.id")
        assert len(bytes.fromhex(blob.decode())) == 32

        # The appliance stops: reads fail with EIO (within the deadline), the mount stays.
        env.stop()
        assert read_error(mnt / "tools" / "docs" / "n3.txt") == "EIO"
        assert read_error(mnt / "tools" / "big.img") == "EIO"
        assert os.path.ismount(mnt)
        # It comes back: the next read reconnects.
        env.start()
        assert read_error(mnt / "tools" / "docs" / "n3.txt") == "OK"

        # The cable is cut (no RST, only silence): EIO by the deadline, then back again.
        env.appliance.link_down()
        try:
            assert read_error(mnt / "tools" / "docs" / "n4.txt") == "EIO"
        finally:
            env.appliance.link_up()
        assert read_error(mnt / "tools" / "docs" / "n4.txt") == "OK"
        state = read_state(mnt.absolute())
        assert state is not None
        pid = int(state["pid"])
    finally:
        umount = run_cli(None, "umount", str(mnt), timeout=60)
    assert umount.returncode == 0, umount.stderr
    assert "unmounted" in umount.stdout
    assert not os.path.ismount(mnt)
    assert not cli_alive(pid)  # gone (or a zombie its new parent has yet to reap)


@pytest.mark.lab
@pytest.mark.fuse
def test_thin_mount_refuses_a_wrong_token_before_mounting(
    lab_appliance: LabAppliance, tmp_path: Path
) -> None:
    doc = json.loads(lab_appliance.token.read_text())
    doc["secret"] = "00" * 32
    bad = tmp_path / "bad.token"
    bad.write_text(json.dumps(doc))
    bad.chmod(0o600)
    mnt = tmp_path / "mnt"
    proc = thin_mount(lab_appliance, mnt, "--token", str(bad))
    assert proc.returncode != 0
    assert "refused: no valid token for desktop 'desk'" in proc.stderr
    assert not os.path.ismount(mnt)


# -- Samba: the Windows desktop's read-only share ---------------------------------------


SMB_PASSWORD = "desk-pass-1"


def samba_unavailable() -> str | None:
    for tool in ("smbd", "smbpasswd", "smbclient", "testparm", "unshare"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian packages samba, smbclient)"
    return None


def smbclient(
    host: Host, server: str, workdir: Path, command: str, *, auth: list[str]
) -> subprocess.CompletedProcess[str]:
    client_conf = workdir / "client.conf"
    client_conf.write_text("[global]\n   client min protocol = SMB2_10\n")
    argv = ["smbclient", "-s", str(client_conf), f"//{server}/p2pfs", *auth, "-c", command]
    return host.run(argv, capture_output=True, text=True, timeout=120)


def start_smbd(appl: Host, work: Path, mount: Path, interface: str) -> subprocess.Popen[bytes]:
    proc = start_smbd_in_lab(appl, work, mount, interface, "desk", SMB_PASSWORD)
    # What Samba itself makes of the rendered file (the mount below is read-only too, so
    # a writable share would still refuse writes: check the share's own settings).
    for section, name, value in (
        ("p2pfs", "read only", "Yes"),
        ("p2pfs", "guest ok", "No"),
        ("p2pfs", "valid users", "desk"),
        ("global", "map to guest", "Never"),
        ("global", "bind interfaces only", "Yes"),
        ("global", "restrict anonymous", "2"),
    ):
        argv = ["testparm", "-s", f"--section-name={section}", f"--parameter-name={name}"]
        got = subprocess.run(
            [*argv, str(work / "smb.conf")], capture_output=True, text=True, timeout=60
        )
        assert got.stdout.strip() == value, (section, name, got.stdout, got.stderr)
    return proc


@pytest.mark.lab
@pytest.mark.fuse
def test_samba_shares_the_mount_read_only_to_one_account(tmp_path: Path) -> None:
    require_lab()
    if reason := samba_unavailable():
        if os.environ.get("CI"):
            pytest.fail(f"Samba must run in CI: {reason}")
        pytest.skip(reason)
    tree = make_tree(tmp_path / "src", big_mib=8)
    home = tmp_path / "home"
    run_cli(home, "init", check=True)
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(tmp_path / "src"), "tools", check=True)
    # The desktop's account must reach the mount: not under pytest's 0700 folders.
    shared = Path(tempfile.mkdtemp(prefix="p2pfs-smb-"))
    shared.chmod(0o755)
    mnt = shared / "mnt"
    mnt.mkdir()
    try:
        with Lab(names=["appl", "desk"]) as lab:
            serve_and_check_share(lab, tmp_path, home, mnt, tree)
    finally:
        subprocess.run(["fusermount3", "-u", "-z", str(mnt)], capture_output=True)
        shutil.rmtree(shared, ignore_errors=True)


def serve_and_check_share(
    lab: Lab, tmp_path: Path, home: Path, mnt: Path, tree: dict[str, str]
) -> None:
    appl, desk = lab.hosts
    log = open(tmp_path / "daemon.log", "ab")  # noqa: SIM115
    daemon = appl.popen(
        [sys.executable, "-m", "p2pfs", "--home", str(home), "daemon", "--mount", str(mnt)],
        stdout=log,
        stderr=log,
    )
    log.close()
    appl.track_mount(mnt)
    smbd = None
    try:
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            assert daemon.poll() is None, (tmp_path / "daemon.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        smbd = start_smbd(appl, tmp_path, mnt, f"{appl.address}/24")
        # smbd listens on the host-only address only.
        listening = appl.run(["ss", "-ltnH", "sport = :445"], capture_output=True, text=True)
        local = {line.split()[3].rsplit(":", 1)[0] for line in listening.stdout.splitlines()}
        assert local == {appl.address}, listening.stdout
        auth = tmp_path / "desk.auth"
        auth.write_text(f"username = desk\npassword = {SMB_PASSWORD}\n")
        auth.chmod(0o600)
        good = ["-A", str(auth)]

        # The account reads every file byte-identically.
        out = tmp_path / "got"
        out.mkdir()
        for i, rel in enumerate(sorted(tree)):
            remote = "tools\\" + rel.replace("/", "\\")
            got = smbclient(desk, appl.address, tmp_path, f'get "{remote}" {out}/{i}', auth=good)
            assert got.returncode == 0, got.stdout + got.stderr
            assert hashlib.sha256((out / str(i)).read_bytes()).hexdigest() == tree[rel], rel
        listing = smbclient(desk, appl.address, tmp_path, "ls tools\\docs\\*", auth=good)
        assert "n1.txt" in listing.stdout and "deep" in listing.stdout

        # No anonymous access, no guest, no wrong password.
        for bad, what in (
            (["-N"], "anonymous"),
            (["-U", "guest%"], "guest"),
            (["-U", "desk%wrong-password"], "wrong password"),
            (["-U", f"root%{SMB_PASSWORD}"], "another account"),
        ):
            refused = smbclient(desk, appl.address, tmp_path, "ls", auth=bad)
            assert refused.returncode != 0, what
            assert "NT_STATUS_" in refused.stdout + refused.stderr, what
            assert "n1.txt" not in refused.stdout and "tools" not in refused.stdout, what

        # Every write is refused.
        local_file = tmp_path / "upload.txt"
        local_file.write_text("x")
        for command in (
            f"put {local_file} tools\\new.txt",
            "mkdir tools\\newdir",
            "del tools\\docs\\n1.txt",
            "rename tools\\big.img tools\\big2.img",
        ):
            w = smbclient(desk, appl.address, tmp_path, command, auth=good)
            assert "NT_STATUS_ACCESS_DENIED" in w.stdout + w.stderr, (command, w.stdout, w.stderr)
        assert sorted(os.listdir(mnt / "tools")) == sorted(os.listdir(tmp_path / "src"))
    finally:
        if smbd is not None:
            stop(smbd)
        stop(daemon)
