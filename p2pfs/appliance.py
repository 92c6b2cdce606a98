"""Appliance mode's image side: Samba's share of the volumes (and, later, the VM image).

The files an appliance is built from live in ``contrib/appliance/`` of the
repository; this module renders them. See docs/appliance.md.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import subprocess
import time
from pathlib import Path

from .errors import P2pfsError, UsageError
from .lab import Host

log = logging.getLogger(__name__)

CONTRIB = Path(__file__).resolve().parents[1] / "contrib" / "appliance"
SMB_TEMPLATE = CONTRIB / "smb.conf"
_ACCOUNT = re.compile(r"^[a-z_][a-z0-9_-]{0,30}$")


def render_smb_conf(
    template: str, *, interface: str, mount: Path, users: list[str], state: Path
) -> str:
    """smb.conf for a read-only share of ``mount`` on the host-only ``interface`` only."""
    try:
        ipaddress.ip_interface(interface)
    except ValueError:
        raise UsageError(f"{interface!r} is not an address/prefix like 192.168.56.2/24") from None
    if not users or not all(_ACCOUNT.match(u) for u in users):
        raise UsageError("the share needs desktop accounts (lower-case names, at most 31)")
    for path in (mount, state):
        if not path.is_absolute() or any(c in str(path) for c in "\n\r@%"):
            raise UsageError(f"{path} must be an absolute path without @, % or newlines")
    values = {
        "@INTERFACE@": interface,
        "@MOUNT@": str(mount),
        "@USERS@": " ".join(users),
        "@STATE@": str(state),
    }
    text = template
    for key, value in values.items():
        text = text.replace(key, value)
    left = re.findall(r"^[^#]*(@[A-Z_]+@)", text, flags=re.M)
    if left:
        raise UsageError(f"the smb.conf template has unknown placeholders: {sorted(set(left))}")
    return text


def smb_state_dirs(state: Path) -> list[Path]:
    """The folders smbd needs under ``state`` (it does not create them all itself)."""
    names = ("private", "lock", "state", "cache", "run", "ncalrpc", "bind-dns", "log")
    return [state / n for n in names]


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
            SMB_TEMPLATE.read_text(), interface=interface, mount=mount, users=[account], state=state
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
