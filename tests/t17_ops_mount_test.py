"""Running an estate: ``mount -t fuse.p2pfs`` and fstab through the real mount(8), and
``p2pfs doctor`` on each broken setup it must name (root: a link in /sbin, tmpfs,
another user)."""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from harness import force_unmount, mounted, run_cli

from p2pfs.fsutil import pid_alive
from p2pfs.keys import SigningKey

pytestmark = [pytest.mark.mount, pytest.mark.fuse]

SBIN = Path("/sbin")
HELPER_LINK = SBIN / "mount.fuse.p2pfs"
NOBODY = 65534
WAIT_S = 60.0


@pytest.fixture
def root() -> None:
    if os.geteuid() != 0:
        if os.environ.get("CI"):
            pytest.fail("the ops tests must run as root in CI")
        pytest.skip("needs root: a link in /sbin, tmpfs mounts, another user")


@pytest.fixture
def helper(root: None) -> Iterator[Path]:
    """``p2pfs install-mount-helper`` for the test's length; the link always goes after."""
    if HELPER_LINK.is_symlink() or HELPER_LINK.exists():
        pytest.fail(f"{HELPER_LINK} exists before the test: remove it (it is not this test's)")
    try:
        run_cli(None, "install-mount-helper", "--dir", str(SBIN), check=True)
        assert HELPER_LINK.is_symlink()
        yield HELPER_LINK
    finally:
        run_cli(None, "install-mount-helper", "--dir", str(SBIN), "--remove")
        with contextlib.suppress(FileNotFoundError):
            HELPER_LINK.unlink()


def volume_home(home: Path, tmp_path: Path) -> bytes:
    """A volume ``tools`` imported into ``home``; the bytes of its file ``tools/hello.txt``."""
    src = tmp_path / "src"
    src.mkdir()
    data = b"read through mount(8)\n" * 1000
    (src / "hello.txt").write_bytes(data)
    run_cli(home, "volume", "create", "tools", check=True)
    run_cli(home, "import", str(src), "tools", check=True)
    return data


def daemon_pid(home: Path) -> int:
    return int((home / "run" / "daemon.pid").read_text().strip())


def wait_gone(pid: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not pid_alive(pid), f"the daemon (pid {pid}) still runs after umount"


def test_mount_t_fuse_p2pfs_then_umount_stops_the_daemon(
    helper: Path, home: Path, tmp_path: Path
) -> None:
    data = volume_home(home, tmp_path)
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        opts = "ro,_netdev,nofail,nosuid,nodev,defaults"
        proc = subprocess.run(
            ["mount", "-t", "fuse.p2pfs", "-o", opts, str(home), str(mp)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        # mount(8) returned: the mount answers now, without waiting for it.
        assert (mp / "tools" / "hello.txt").read_bytes() == data
        mounts = Path("/proc/self/mounts").read_text()
        line = next(x for x in mounts.splitlines() if x.split()[1] == str(mp))
        assert line.split()[2] == "fuse.p2pfs"
        assert "ro" in line.split()[3].split(","), line  # "ro" became --read-only
        with pytest.raises(OSError) as e:
            (mp / "tools" / "new.txt").write_bytes(b"x")
        assert e.value.errno == errno.EROFS
        pid = daemon_pid(home)
        proc = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert not os.path.ismount(mp)
        wait_gone(pid)
        assert "unmounted" in (home / "log" / "daemon.log").read_text()
    finally:
        force_unmount(mp, home)


def test_an_fstab_line_mounts(helper: Path, home: Path, tmp_path: Path) -> None:
    data = volume_home(home, tmp_path)
    mp = tmp_path / "p2pfs"
    mp.mkdir()
    fstab = tmp_path / "fstab"
    # The line docs/admin.md shows; mount(8) keeps x-* to itself, the helper ignores _netdev.
    fstab.write_text(f"{home} {mp} fuse.p2pfs _netdev,x-systemd.automount,allow_other 0 0\n")
    env = {**os.environ, "LIBMOUNT_FSTAB": str(fstab)}
    try:
        proc = subprocess.run(
            ["mount", str(mp)], capture_output=True, text=True, timeout=120, env=env
        )
        assert proc.returncode == 0, proc.stderr
        assert (mp / "tools" / "hello.txt").read_bytes() == data
        line = next(x for x in Path("/proc/self/mounts").read_text().splitlines() if str(mp) in x)
        assert "allow_other" in line
        pid = daemon_pid(home)
        assert subprocess.run(["umount", str(mp)], timeout=60).returncode == 0
        wait_gone(pid)
    finally:
        force_unmount(mp, home)


def test_an_unknown_mount_option_is_refused(helper: Path, home: Path, tmp_path: Path) -> None:
    mp = tmp_path / "mnt"
    mp.mkdir()
    try:
        proc = subprocess.run(
            ["mount", "-t", "fuse.p2pfs", "-o", "ro,uid=1000", str(home), str(mp)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode != 0
        assert "unknown mount option 'uid=1000'" in proc.stderr
        assert not os.path.ismount(mp)
        assert not (home / "run" / "daemon.pid").exists()  # refused before any daemon began
    finally:
        force_unmount(mp, home)


# -- doctor ---------------------------------------------------------------------------


def doctor(home: Path, *args: str) -> tuple[int, dict[str, dict[str, Any]]]:
    proc = run_cli(home, "doctor", "--json", *args, timeout=120)
    checks = json.loads(proc.stdout)
    return proc.returncode, {c["check"]: c for c in checks}


def test_doctor_on_a_healthy_mounted_home(root: None, home: Path, tmp_path: Path) -> None:
    volume_home(home, tmp_path)
    run_cli(home, "estate", "init", check=True)
    with mounted(home, tmp_path / "mnt") as mp:
        rc, checks = doctor(home, "--mount", str(mp))
    for name in ("fuse-device", "home", "certificate", "chunker", "origins"):
        assert checks[name]["status"] == "ok", checks[name]
    assert checks["mountpoint"]["status"] == "ok"
    assert "mounted by this node's daemon" in checks["mountpoint"]["detail"]
    fusermount = shutil.which("fusermount3")
    assert fusermount is not None
    setuid = os.stat(fusermount).st_mode & 0o4000
    assert checks["fusermount3"]["status"] == ("ok" if setuid else "warn")
    assert checks["fuse-conf"]["status"] == "skip"  # no --allow-other asked
    st = os.statvfs(home)
    if st.f_bavail * st.f_frsize > 2 << 30:  # the default floor is 1 GiB
        assert checks["free-space"]["status"] == "ok", checks["free-space"]
    assert checks["clock"]["status"] in ("ok", "warn")
    assert "not measurable" in checks["clock"]["detail"]
    # A lone node of its own estate: no peer is known, which is said, not failed.
    assert checks["peers"]["status"] == "warn", checks["peers"]
    assert checks["mdns"]["status"] in ("ok", "fail")
    if checks["mdns"]["status"] == "fail":
        assert checks["mdns"]["fix"]
    failed = [c for c in checks.values() if not c["ok"]]
    assert rc == (1 if failed else 0)


def test_doctor_as_a_user_without_dev_fuse(root: None, home: Path, tmp_path: Path) -> None:
    # In a mount namespace of its own, /dev/fuse is a root-only node (0600) whatever the
    # host's mode: the host's device is not touched.
    node = tmp_path / "fuse-0600"
    subprocess.run(["mknod", "-m", "0600", str(node), "c", "10", "229"], check=True)
    script = 'mount --bind "$1" /dev/fuse && shift && exec "$@"'
    proc = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            script,
            "sh",
            str(node),
            "setpriv",
            f"--reuid={NOBODY}",
            f"--regid={NOBODY}",
            "--clear-groups",
            sys.executable,
            "-m",
            "p2pfs",
            "--home",
            str(home),
            "doctor",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd="/",
    )
    assert proc.returncode == 1, proc.stderr
    checks = {c["check"]: c for c in json.loads(proc.stdout)}
    fuse = checks["fuse-device"]
    assert fuse["status"] == "fail"
    assert f"does not open read-write for uid {NOBODY}" in fuse["detail"]
    assert "Permission denied" in fuse["detail"]
    assert "chmod 0666 /dev/fuse" in fuse["fix"]
    # The home is root's (0700): named as not readable, not a traceback.
    assert not checks["home"]["ok"] and "ermission denied" in checks["home"]["detail"]


@contextlib.contextmanager
def tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs", str(where)], check=True
    )
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)


def test_doctor_on_a_full_disk(root: None, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "2m") as disk:
        home = disk / "home"
        run_cli(home, "init", check=True)
        rc, checks = doctor(home)
    assert rc == 1
    free = checks["free-space"]
    assert free["status"] == "fail"
    assert "floor min_free 1.0 GiB" in free["detail"]
    assert "the store cannot take a chunk" in free["detail"]
    assert "min_free" in free["fix"]
    assert checks["home"]["status"] == "ok"


@contextlib.contextmanager
def ext4(where: Path, *, journal: bool) -> Iterator[Path]:
    """A small ext4 of its own, with or without a journal, loop-mounted at ``where``."""
    image = where.with_suffix(".img")
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    features = [] if journal else ["-O", "^has_journal"]
    subprocess.run(["mkfs.ext4", "-q", "-F", *features, str(image)], check=True)
    where.mkdir()
    subprocess.run(["mount", "-o", "loop", str(image), str(where)], check=True)
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], capture_output=True)
        image.unlink()


def test_doctor_warns_of_a_store_that_forgets_its_pins_or_crawls(
    root: None, tmp_path: Path
) -> None:
    found = {}
    for kind in ("ext4", "ext4-nojournal", "tmpfs"):
        where = tmp_path / kind
        with (
            tmpfs(where, "64m") if kind == "tmpfs" else ext4(where, journal=kind == "ext4")
        ) as disk:
            home = disk / "home"
            run_cli(home, "init", check=True)
            _, checks = doctor(home)
        found[kind] = checks["store-fs"]
    assert found["ext4"]["status"] == "ok", found["ext4"]
    assert "the store is on ext4" in found["ext4"]["detail"]
    bare = found["ext4-nojournal"]
    assert bare["status"] == "warn", bare
    assert bare["ok"]  # a warning: the node works, slower
    assert "ext4 without a journal (/dev/loop" in bare["detail"]
    assert "tune2fs -O has_journal /dev/loop" in bare["fix"]
    memory = found["tmpfs"]
    assert memory["status"] == "warn", memory
    assert "every pinned file are gone at the next reboot" in memory["detail"]


def expire_node_cert(home: Path) -> datetime.datetime:
    """Replace the node certificate by the same one, re-signed by the estate CA with its
    validity wholly in the past."""
    estate = home / "estate"
    cert = x509.load_pem_x509_certificate((estate / "node.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((estate / "ca.pem").read_bytes())
    ca_key = SigningKey.load(estate / "ca.key")
    now = datetime.datetime.now(datetime.UTC)
    not_after = now - datetime.timedelta(days=3)
    builder = (
        x509.CertificateBuilder()
        .subject_name(cert.subject)
        .issuer_name(ca.subject)
        .public_key(cert.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=400))
        .not_valid_after(not_after)
    )
    for ext in cert.extensions:
        builder = builder.add_extension(ext.value, critical=ext.critical)
    expired = builder.sign(ca_key.private_key, None)
    (estate / "node.pem").write_bytes(expired.public_bytes(serialization.Encoding.PEM))
    return not_after


def test_doctor_on_an_expired_certificate(root: None, home: Path, tmp_path: Path) -> None:
    run_cli(home, "estate", "init", check=True)
    rc, checks = doctor(home)
    assert checks["certificate"]["status"] == "ok"
    copy = tmp_path / "copy"
    shutil.copytree(home, copy)
    not_after = expire_node_cert(copy)
    rc, checks = doctor(copy)
    assert rc == 1
    cert = checks["certificate"]
    assert cert["status"] == "fail"
    assert f"expired on {not_after:%Y-%m-%d}" in cert["detail"]
    assert "request-join" in cert["fix"] and "estate approve" in cert["fix"]
    assert checks["clock"]["status"] == "warn"  # past its end: expired, or the clock ahead
    # The estate still loads: the daemon would start and be refused by every peer.
    assert run_cli(copy, "estate", "show", "--json", check=True).returncode == 0


def test_doctor_on_a_missing_mountpoint(root: None, home: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such"
    rc, checks = doctor(home, "--mount", str(missing))
    assert rc == 1
    mp = checks["mountpoint"]
    assert mp == {
        "check": "mountpoint",
        "ok": False,
        "status": "fail",
        "detail": f"{missing} does not exist",
        "fix": f"'mkdir -p {missing}'",
    }
    taken = tmp_path / "taken"
    with tmpfs(taken, "1m"):
        rc, checks = doctor(home, "--mount", str(taken))
    assert checks["mountpoint"]["status"] == "fail"
    assert f"something is already mounted on {taken}" in checks["mountpoint"]["detail"]
