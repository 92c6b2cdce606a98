"""Appliance mode: a 256 MiB file read from the desktop side, against the appliance's own read.

The appliance (daemon, store, its own FUSE mount, the desktop link, smbd) and the
desktop are two lab hosts. Each read starts with the page cache dropped; the
appliance's verified-chunk memory cache is what it is (the same for every path):

- reference: the appliance reads its own mount;
- thin client: the desktop reads through ``p2pfs mount --appliance`` (TLS + token);
- SMB: the desktop fetches it with ``smbclient get`` from the read-only share.

Printed as MB/s and as ratios against the reference (best of ``--runs``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from p2pfs.lab.netns import Lab, lab_unavailable
from p2pfs.lab.smbd import start_smbd_in_lab

from .common import drop_caches, p2pfs, ratio_line, workdir

MIB = 1024 * 1024
PASSWORD = "bench-pass-1"


def read_file(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        while chunk := f.read(1 << 20):
            n += len(chunk)
    return n


def best(runs: int, fn: object) -> float:
    out = float("inf")
    for _ in range(runs):
        drop_caches()
        t0 = time.perf_counter()
        fn()  # type: ignore[operator]
        out = min(out, time.perf_counter() - t0)
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="bench_appliance")
    parser.add_argument("--size-mib", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    if reason := lab_unavailable():
        print(f"  skipped: the lab is unavailable ({reason})")
        return 1
    if shutil.which("smbd") is None or shutil.which("smbclient") is None:
        print("  samba and smbclient are needed (make setup installs them)")
        return 1
    size = args.size_mib * MIB
    with workdir("appliance") as tmp:
        work = Path(tmp)
        src = work / "src"
        src.mkdir()
        with open(src / "big.bin", "wb") as f:
            for _ in range(args.size_mib):
                f.write(os.urandom(MIB))
        home = work / "home"
        p2pfs(home, "init")
        p2pfs(home, "volume", "create", "tools")
        p2pfs(home, "import", str(src), "tools")
        # smbd reads as the desktop's account: the mount must be reachable by it.
        shared = Path(tempfile.mkdtemp(prefix="p2pfs-bench-smb-"))
        shared.chmod(0o755)
        own, thin = shared / "own", shared / "thin"
        own.mkdir()
        thin.mkdir()
        try:
            with Lab(names=["appl", "desk"]) as lab:
                appl, desk = lab.hosts
                listen = f"{appl.address}:7421"
                (home / "config.toml").write_text(f'[appliance]\nuser_listen = "{listen}"\n')
                token = work / "desk.token"
                p2pfs(
                    home,
                    "appliance",
                    "token",
                    "add",
                    "desk",
                    "--out",
                    str(token),
                    "--address",
                    listen,
                )
                with open(work / "daemon.log", "ab") as log:
                    argv = [sys.executable, "-m", "p2pfs", "--home", str(home), "daemon"]
                    appl.popen([*argv, "--mount", str(own)], stdout=log, stderr=log)
                appl.track_mount(own)
                deadline = time.monotonic() + 60
                while not os.path.ismount(own):
                    if time.monotonic() > deadline:
                        raise SystemExit("the appliance's daemon did not mount")
                    time.sleep(0.05)
                time.sleep(0.5)  # the desktop link starts right after the mount
                desk.track_mount(thin)
                desk.run(
                    [sys.executable, "-m", "p2pfs", "mount", "--token", str(token), str(thin)],
                    check=True,
                    capture_output=True,
                    timeout=120,
                )
                start_smbd_in_lab(appl, work, own, f"{appl.address}/24", "desk", PASSWORD)
                auth = work / "auth"
                auth.write_text(f"username = desk\npassword = {PASSWORD}\n")
                client_conf = work / "client.conf"
                client_conf.write_text("[global]\n   client min protocol = SMB2_10\n")

                share = f"//{appl.address}/p2pfs"
                get = ["-A", str(auth), "-c", "get tools\\big.bin /dev/null"]

                def smb() -> None:
                    desk.run(
                        ["smbclient", "-s", str(client_conf), share, *get],
                        check=True,
                        capture_output=True,
                        timeout=600,
                    )

                assert read_file(own / "tools" / "big.bin") == size  # warm the appliance alike
                t_own = best(args.runs, lambda: read_file(own / "tools" / "big.bin"))
                t_thin = best(args.runs, lambda: read_file(thin / "tools" / "big.bin"))
                t_smb = best(args.runs, smb)
                subprocess.run(
                    [sys.executable, "-m", "p2pfs", "umount", str(thin)], capture_output=True
                )
        finally:
            for m in (thin, own):
                subprocess.run(["fusermount3", "-u", "-z", str(m)], capture_output=True)
            shutil.rmtree(shared, ignore_errors=True)
    mb = size / 1e6
    print(f"reading a {args.size_mib} MiB file (page cache dropped, best of {args.runs})")
    print(f"  appliance, its own mount: {mb / t_own:.0f} MB/s")
    # Issue 14's goals: the thin client at 0.7 and SMB at 0.6 of the appliance's own mount.
    print(ratio_line("thin client (desktop link, TLS)", mb / t_thin, mb / t_own, "MB/s", 0.7))
    print(ratio_line("SMB (smbclient get)", mb / t_smb, mb / t_own, "MB/s", 0.6))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
