"""The one rule for the names people give: volumes and desktops.

1 to 64 characters of A-Z a-z 0-9 '.' '_' '-', not starting with '.' (hidden, and
'..') or '-' (an option on a command line). The whole string must match (no
trailing newline slips through, as it does past ``re.match`` with ``$``).
"""

from __future__ import annotations

import re

from p2pfs.errors import UsageError

MAX_NAME = 64
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")
RULE = "1-64 letters, digits, '.', '_' or '-', not starting with '.' or '-'"


def name_problem(name: object) -> str | None:
    """Why ``name`` is not a valid name (None if it is)."""
    if not isinstance(name, str):
        return f"a name must be a string, not {type(name).__name__}"
    if not _NAME.fullmatch(name):
        return f"{name[:80]!r} is not a valid name: use {RULE}"
    return None


def check_volume_name(name: str) -> str:
    """``name`` if it is a valid volume name, else UsageError."""
    if (problem := name_problem(name)) is not None:
        raise UsageError(f"invalid volume name: {problem}")
    return name


def check_desktop_name(name: str) -> str:
    """``name`` if it is a valid desktop name, else UsageError."""
    if (problem := name_problem(name)) is not None:
        raise UsageError(f"invalid desktop name: {problem}")
    return name
