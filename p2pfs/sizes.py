"""Byte counts as people write them ("20G", "512MiB", "1.5T") and as we print them."""

from __future__ import annotations

import re

from p2pfs.errors import UsageError

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMGTP]?)(?:I?B)?\s*", re.IGNORECASE)


def parse_size(value: object, what: str) -> int:
    """A byte count: a non-negative integer, or a string like "20G", "512M", "64MiB",
    "1.5T" (binary units; K, M, G, T, P with an optional "B" or "iB"). UsageError naming
    ``what`` otherwise."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str) and (m := _SIZE.fullmatch(value)):
        n = float(m.group(1)) * _UNITS[m.group(2).upper()]
        if n < 2**64:  # a string of 400 digits is inf as a float, which int() refuses
            return int(n)
    raise UsageError(f"{what} must be a size like 20G or 512M, not {value!r}")


def format_size(n: int) -> str:
    """``n`` bytes for a person: "512 B", "1.5 KiB", "20.0 GiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
