"""The appliance image under QEMU, wired into a lab (docs/lab.md): for tests and by hand.

Each NIC of the VM is a tap device opened *inside* a lab namespace and handed to QEMU
as a file descriptor, so nothing appears in this machine's own network namespace: the
LAN NIC (the VM's ``eth0``) is a port of the lab's switch, the host-only NIC (``eth1``)
sits in the desktop's namespace with the desktop's end of the link. The taps vanish
with QEMU. QEMU boots the image's kernel directly (``-kernel``/``-initrd``), with TCG
(no KVM needed), 2 vCPUs, 1 GiB, and its serial console in a file.

``python -m p2pfs.lab.vm --tap NS:NAME[:master=BR][:addr=CIDR] ... -- QEMU ARGS``
is the launcher: it opens the taps (entering each namespace with setns), configures
them with ``ip -n``, and execs QEMU with the descriptors (``-netdev tap,fd=N``, in the
order of ``--tap``; ``{tapfd0}``, ``{tapfd1}`` in QEMU's arguments are replaced).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

from p2pfs.appliance.image import BuiltImage
from p2pfs.errors import P2pfsError

from .netns import Host
from .plumbing import NETNS_DIR

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
CLONE_NEWNET = 0x40000000
BOOT_TIMEOUT = 420.0


def qemu_unavailable() -> str | None:
    for tool, pkg in (("qemu-system-x86_64", "qemu-system-x86"), ("qemu-img", "qemu-utils")):
        if shutil.which(tool) is None:
            return f"{tool} is missing (Debian package {pkg})"
    if not os.path.exists("/dev/net/tun"):
        return "/dev/net/tun is missing"
    return None


# -- the launcher (runs as its own process, then becomes QEMU) -----------------------------


def _setns(path: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


def _open_tap(name: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TAP | IFF_NO_PI))
    os.set_inheritable(fd, True)
    return fd


def _launch(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m p2pfs.lab.vm")
    p.add_argument("--tap", action="append", default=[], metavar="NS:NAME[:master=BR][:addr=CIDR]")
    p.add_argument("qemu", nargs=argparse.REMAINDER)
    args = p.parse_args(argv)
    home_ns = f"/proc/{os.getpid()}/ns/net"
    home_fd = os.open(home_ns, os.O_RDONLY | os.O_CLOEXEC)
    fds: list[int] = []
    for spec in args.tap:
        ns, name, *opts = spec.split(":")
        _setns(str(NETNS_DIR / ns))
        fds.append(_open_tap(name))
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.setns(home_fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), "setns back")
        ip = ["ip", "-n", ns]
        for opt in opts:
            key, _, value = opt.partition("=")
            if key == "master":
                subprocess.run([*ip, "link", "set", name, "master", value], check=True)
            elif key == "addr":
                subprocess.run([*ip, "addr", "add", value, "dev", name], check=True)
        subprocess.run([*ip, "link", "set", name, "up"], check=True)
    qemu = [a for a in args.qemu if a != "--"]
    for i, fd in enumerate(fds):
        qemu = [a.replace(f"{{tapfd{i}}}", str(fd)) for a in qemu]
    os.execvp(qemu[0], qemu)
    return 1  # not reached


# -- the VM ------------------------------------------------------------------------------


class ApplianceVM:
    """One boot of the appliance image with a seed disk; ``stop()`` always cleans up."""

    def __init__(
        self,
        image: BuiltImage,
        seed: Path,
        work: Path,
        *,
        where: Host,
        lan: tuple[str, str] | None = None,
        host_only: tuple[str, str] | None = None,
        cpus: int = 2,
        memory_mib: int = 1024,
    ) -> None:
        """``lan``: (namespace, bridge) for eth0; ``host_only``: (namespace, the desktop's
        CIDR) for eth1; QEMU itself runs in ``where``'s namespace (the lab kills it at exit)."""
        self.image = image
        self.seed = seed
        self.work = work
        self.where = where
        self.lan = lan
        self.host_only = host_only
        self.cpus = cpus
        self.memory_mib = memory_mib
        self.console = work / "console.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.tag = os.urandom(2).hex()

    def start(self) -> ApplianceVM:
        self.work.mkdir(parents=True, exist_ok=True)
        disk = self.work / "disk.qcow2"
        disk.unlink(missing_ok=True)
        backing = ["-F", "raw", "-b", str(self.image.disk)]
        subprocess.run(
            ["qemu-img", "create", "-q", "-f", "qcow2", *backing, str(disk)],
            check=True,
            capture_output=True,
        )
        self.console.write_bytes(b"")
        taps: list[str] = []
        nics: list[str] = []
        for i, (spec, role) in enumerate(((self.lan, "l"), (self.host_only, "h"))):
            if spec is None:
                continue
            ns, extra = spec
            opt = f"master={extra}" if role == "l" else f"addr={extra}"
            taps.append(f"{ns}:p2vm{self.tag}{role}:{opt}")
            n = len(taps) - 1
            nics += ["-netdev", f"tap,id=n{i},fd={{tapfd{n}}}"]
            nics += [
                "-device",
                f"virtio-net-pci,netdev=n{i},mac=52:54:00:9e:{self.tag[:2]}:0{i},addr=0x1{i}",
            ]
        qemu = ["qemu-system-x86_64", "-accel", "tcg", "-cpu", "max", "-smp", str(self.cpus)]
        qemu += ["-m", str(self.memory_mib), "-nodefaults", "-display", "none", "-no-reboot"]
        qemu += ["-monitor", "none", "-serial", f"file:{self.console}"]
        qemu += ["-kernel", str(self.image.kernel), "-initrd", str(self.image.initrd)]
        qemu += ["-append", BuiltImage.CMDLINE + " panic=-1"]
        qemu += ["-drive", f"file={disk},if=virtio,format=qcow2"]
        qemu += ["-drive", f"file={self.seed},if=virtio,format=raw,readonly=on"]
        qemu += nics or ["-nic", "none"]
        argv = [sys.executable, "-m", "p2pfs.lab.vm"]
        for t in taps:
            argv += ["--tap", t]
        log = open(self.work / "qemu.log", "ab")  # noqa: SIM115
        try:
            self.proc = self.where.popen([*argv, "--", *qemu], stdout=log, stderr=log)
        finally:
            log.close()
        return self

    def console_text(self) -> str:
        try:
            return self.console.read_text(errors="replace")
        except OSError:
            return ""

    def wait_console(self, pattern: str, timeout: float = BOOT_TIMEOUT) -> re.Match[str]:
        """Wait until the serial console shows ``pattern`` (a regex)."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern)
        while True:
            text = self.console_text()
            if m := regex.search(text):
                return m
            if self.proc is not None and self.proc.poll() is not None:
                raise P2pfsError(
                    f"the VM exited ({self.proc.returncode}) before {pattern!r}:\n"
                    f"{text[-3000:]}\n{self._qemu_log()}"
                )
            if time.monotonic() > deadline:
                raise P2pfsError(f"no {pattern!r} on the console in {timeout:g} s:\n{text[-3000:]}")
            time.sleep(0.5)

    def _qemu_log(self) -> str:
        with contextlib.suppress(OSError):
            return (self.work / "qemu.log").read_text(errors="replace")[-2000:]
        return ""

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        self.proc = None
        (self.work / "disk.qcow2").unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(_launch(sys.argv[1:]))
