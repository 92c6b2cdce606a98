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
from harness import require_lab, run_cli

from p2pfs.appliance.link_client import ApplianceLink, LinkClient, LinkError, with_link
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
from p2pfs.node.operations import Operations
from p2pfs.trust.desktop import DesktopToken, TokenRefused, load_token

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


def write_config(home: Path, listen: str, *, desktop_pin: bool = False) -> None:
    (home / "config.toml").write_text(
        f'[appliance]\nuser_listen = ["{listen}"]\ndesktop_pin = {str(desktop_pin).lower()}\n'
    )


@dataclass
class Appliance:
    home: Path
    address: Address
    token: Path
    proc: subprocess.Popen[bytes]
    tree: dict[str, str]
    source: Path

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
def running_appliance(work: Path, *, desktop_pin: bool = False) -> Iterator[Appliance]:
    home = work / "home"
    tree = make_tree(work / "src", big_mib=3)
    run_cli(home, "init", check=True)
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(work / "src"), "tools", check=True)
    write_config(home, "127.0.0.1:0", desktop_pin=desktop_pin)
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
        yield Appliance(home, address, work / "alice.token", proc, tree, work / "src")
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
        status = run_cli(None, "appliance", "status", *link, check=True)
        assert json.loads(status.stdout)["desktop_link"]["desktop_pin"] is True


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
        b"tools/.snapshots/1/big.img",
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
    with pytest.raises(LinkError, match="not issued"):
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
