"""Run every benchmark (``make bench``); ``--only NAME`` runs one."""

from __future__ import annotations

import argparse
import importlib
import sys

BENCHMARKS = [
    "bench_chunking",
    "bench_import",
    "bench_mount",
    "bench_estate",
    "bench_discovery",
    "bench_write",
    "bench_live",
    "bench_appliance",
    "bench_private",
    "bench_origins",
    "sim_estate",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks.run")
    parser.add_argument("--only", choices=BENCHMARKS, action="append")
    args = parser.parse_args(argv)
    status = 0
    for name in args.only or BENCHMARKS:
        print(f"== {name}", flush=True)
        module = importlib.import_module(f"benchmarks.{name}")
        status |= module.main([])
    summary()
    return status


def summary() -> None:
    """Every goal measured in this run, each marked met or missed (issue 14's table)."""
    from .common import ROWS

    if not ROWS:
        return
    width = max(len(r.label) for r in ROWS)
    print("== summary: every goal of this run")
    for r in ROWS:
        print(
            f"  {r.label:<{width}}  {r.measured:<36} goal {r.goal:<10} {'met' if r.met else 'MISSED'}"
        )
    met = sum(r.met for r in ROWS)
    print(f"  {met} of {len(ROWS)} goals met")


if __name__ == "__main__":
    sys.exit(main())
