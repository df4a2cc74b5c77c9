"""`distrain doctor`: check this machine for distributed training, and say what to do about each problem."""

from __future__ import annotations

import argparse
import json


def register(sub) -> None:
    p = sub.add_parser("doctor", help="check versions, backends, devices, SLURM, ports, /dev/shm and a 2-rank all_reduce")
    p.add_argument("--json", action="store_true", help="print the checks as JSON")
    p.add_argument("--no-smoke-test", action="store_true", help="skip the 2-process gloo all_reduce")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.tools.doctor import format_report, run_checks

    checks = run_checks(smoke_test=not args.no_smoke_test)
    if args.json:
        print(json.dumps([c.as_dict() for c in checks], indent=2))
    else:
        print(format_report(checks))
    return 1 if any(c.status == "fail" for c in checks) else 0
