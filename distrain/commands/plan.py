"""`distrain plan CONFIG --world N [--nodes M] [--mem-per-rank GB] [--device-memory-gb GB]`: memory per rank and
traffic per step of every strategy (inside and between nodes), and the micro-batch each is expected to fit."""

from __future__ import annotations

import argparse

from distrain.commands import add_config_arguments
from distrain.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("plan", help="memory per rank and communication per step of each strategy; what fits")
    add_config_arguments(p)
    p.add_argument("--world", type=int, required=True, metavar="N", help="number of ranks to plan for")
    p.add_argument("--nodes", type=int, default=1, metavar="M",
                   help="nodes the ranks spread over (default 1): splits the traffic into intra- and inter-node, and "
                        "plans HSDP (fsdp with strategy.kwargs.replicate=auto, one replica per node)")
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
    if args.nodes < 1 or args.world % args.nodes:
        raise UsageError(f"--nodes {args.nodes} is not allowed with --world {args.world}: the nodes must be at least 1 "
                         f"and hold equal numbers of ranks (a divisor of {args.world}).")
    if args.mem_per_rank is not None and args.mem_per_rank <= 0:
        raise UsageError(f"--mem-per-rank {args.mem_per_rank:g} is not allowed: it must be a positive number of GiB.")
    if args.device_memory_gb is not None and args.device_memory_gb <= 0:
        raise UsageError(f"--device-memory-gb {args.device_memory_gb:g} is not allowed: it must be a positive number "
                         f"of GiB.")
    plan = make_plan(load_config(args.config, args.overrides), args.world, args.mem_per_rank,
                     device_memory_gb=args.device_memory_gb, nodes=args.nodes)
    print(format_plan(plan))
    return 0 if plan.recommended is not None else 1
