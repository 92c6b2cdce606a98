"""smbd in a lab host, sharing a mount read-only as an appliance does (tests, benchmarks)."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

from p2pfs.appliance.samba import render_smb_conf, smb_state_dirs, smb_template
from p2pfs.errors import P2pfsError

from .netns import Host


def start_smbd_in_lab(
    host: Host, work: Path, mount: Path, interface: str, account: str, password: str
) -> subprocess.Popen[bytes]:
    """smbd sharing ``mount`` in a lab host, for tests and benchmarks; returns once it listens.

    It runs in a mount namespace of its own where ``account`` exists (a bind-mounted
    copy of /etc/passwd and /etc/group), so this machine's accounts are never touched;
    the lab starts it in a session of its own (smbd signals its process group on exit).
    """
    state = work / "samba"
    for d in smb_state_dirs(state):
        d.mkdir(parents=True, exist_ok=True)
    (state / "private").chmod(0o700)
    conf = work / "smb.conf"
    conf.write_text(
        render_smb_conf(
            smb_template(), interface=interface, mount=mount, users=[account], state=state
        )
    )
    passwd, group = work / "passwd", work / "group"
    passwd.write_text(
        Path("/etc/passwd").read_text()
        + f"{account}:x:61234:61234::/nonexistent:/usr/sbin/nologin\n"
    )
    group.write_text(Path("/etc/group").read_text() + f"{account}:x:61234:\n")
    script = (
        "set -e\n"
        f"mount --bind {passwd} /etc/passwd\n"
        f"mount --bind {group} /etc/group\n"
        f'printf \'%s\\n%s\\n\' "$PW" "$PW" | smbpasswd -c {conf} -s -a {account} >/dev/null\n'
        f"exec smbd -s {conf} --foreground --no-process-group --debug-stdout -d 1\n"
    )
    log = work / "smbd.log"
    with open(log, "ab") as logf:
        proc = host.popen(
            ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=logf,
            stderr=logf,
            env={**os.environ, "PW": password},
        )
    deadline = time.monotonic() + 60
    while True:
        ss = host.run(["ss", "-ltnH", "sport = :445"], capture_output=True, text=True)
        if ss.stdout.strip():
            return proc
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise P2pfsError(f"smbd did not start:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)
