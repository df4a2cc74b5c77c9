"""`distrain plan CONFIG --world N [--mem-per-rank GB] [--device-memory-gb GB]`: memory per rank and traffic per step of every strategy."""

from __future__ import annotations

import argparse

from distrain.commands import add_config_arguments
from distrain.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory per rank and communication per step of each strategy; what fits")
    add_config_arguments(p)
    p.add_argument("--world", type=int, required=True, metavar="N", help="number of ranks to plan for")
    p.add_argument("--mem-per-rank", type=float, default=None, metavar="GB",
                   help="memory each rank may use, in GiB; strategies that need more are flagged")
    p.add_argument("--device-memory-gb", type=float, default=None, metavar="GB",
                   help="one device's memory, in GiB: which micro-batch each strategy is expected to fit (compare it "
                        "with what train.micro_batch=auto finds)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from distrain.config import load_config  # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.tools.planner import format_plan, make_plan

    if args.world < 1:
        raise UsageError(f"--world {args.world} is not allowed: it must be at least 1 (the number of ranks).")
    if args.mem_per_rank is not None and args.mem_per_rank <= 0:
        raise UsageError(f"--mem-per-rank {args.mem_per_rank:g} is not allowed: it must be a positive number of GiB.")
    if args.device_memory_gb is not None and args.device_memory_gb <= 0:
        raise UsageError(f"--device-memory-gb {args.device_memory_gb:g} is not allowed: it must be a positive number "
                         f"of GiB.")
    plan = make_plan(load_config(args.config, args.overrides), args.world, args.mem_per_rank,
                     device_memory_gb=args.device_memory_gb)
    print(format_plan(plan))
    return 0 if plan.recommended is not None else 1
