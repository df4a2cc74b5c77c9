"""`distrain bench [SUITE ...] [--smoke]`: the benchmark suites (the same as `python -m benchmarks`)."""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from distrain.errors import UsageError

# The benchmarks live next to the package in a source checkout; an installed wheel does not ship them.
CHECKOUT = Path(__file__).resolve().parents[2]


def _benchmarks_run():
    """benchmarks.run from the source checkout this distrain was installed from, or None."""
    if not (CHECKOUT / "benchmarks" / "run.py").is_file():
        return None
    if str(CHECKOUT) not in sys.path:
        sys.path.insert(0, str(CHECKOUT))
    return importlib.import_module("benchmarks.run")


def register(sub) -> None:
    p = sub.add_parser("bench", help="benchmark distrain against the raw engines; writes BENCHMARKS.md")
    p.lazy_arguments = _add_suite_arguments  # imported only for `distrain bench`, not by every training worker
    p.set_defaults(handler=run)


def _add_suite_arguments(parser) -> None:
    runner = _benchmarks_run()
    if runner is not None:
        runner.add_arguments(parser)


def run(args: argparse.Namespace) -> int:
    runner = _benchmarks_run()
    if runner is None:
        raise UsageError(f"distrain bench needs distrain's source checkout (the benchmarks/ folder next to the "
                         f"distrain package), but {CHECKOUT / 'benchmarks'} does not exist. Clone the repository "
                         f"and install it with `pip install -e .`.")
    return runner.run(args, command="distrain bench " + " ".join(sys.argv[2:]))
