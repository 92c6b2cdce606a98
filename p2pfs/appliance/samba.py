"""Appliance mode's Samba share of the volumes: smb.conf rendered from its template.

The template is ``files/smb.conf`` inside the package (the image installs it as
/etc/p2pfs/smb.conf); this module renders it. See docs/appliance.md.
"""

from __future__ import annotations

import importlib.resources
import ipaddress
import logging
import re
from pathlib import Path

from p2pfs.errors import UsageError

log = logging.getLogger(__name__)


def smb_template() -> str:
    """The smb.conf template shipped inside the package."""
    return (importlib.resources.files("p2pfs.appliance") / "files" / "smb.conf").read_text()


# A Samba (and Unix) account name: what a desktop's SMB login may be called.
_ACCOUNT = re.compile(r"[a-z_][a-z0-9_-]{0,30}")


def is_account(name: str) -> bool:
    return bool(_ACCOUNT.fullmatch(name))


def render_smb_conf(
    template: str, *, interface: str, mount: Path, users: list[str], state: Path
) -> str:
    """smb.conf for a read-only share of ``mount`` on the host-only ``interface`` only."""
    try:
        ipaddress.ip_interface(interface)
    except ValueError:
        raise UsageError(f"{interface!r} is not an address/prefix like 192.168.56.2/24") from None
    if not users or not all(is_account(u) for u in users):
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
