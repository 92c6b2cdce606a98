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
    return status


if __name__ == "__main__":
    sys.exit(main())
