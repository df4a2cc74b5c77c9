"""`distrain config show CONFIG [--world-size W] [key=value ...]`: the resolved config and the batch plan."""

from __future__ import annotations

import argparse

from distrain.commands import add_config_arguments, needs_action
from distrain.errors import UsageError


def register(sub) -> None:
    from distrain.cli import Parser  # lazy: start-up: the CLI parser loads every command, the work loads on use

    p = sub.add_parser("config", help="inspect configs")
    actions = p.add_subparsers(dest="config_command", metavar="ACTION", parser_class=Parser)
    show = actions.add_parser("show", help="print the resolved config and the batch plan for a world size")
    add_config_arguments(show)
    show.add_argument("--world-size", type=int, default=1, metavar="W", help="world size to plan for (default 1)")
    show.set_defaults(handler=run_show)
    p.set_defaults(handler=needs_action("distrain config: choose an action: "
                                        "`distrain config show CONFIG [key=value ...]`."))


def run_show(args: argparse.Namespace) -> int:
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.config import load_config, to_yaml
    from distrain.preflight import check_job

    if args.world_size < 1:
        raise UsageError(f"--world-size {args.world_size} is not allowed: it must be at least 1.")
    cfg = load_config(args.config, args.overrides)
    plan = check_job(cfg, args.world_size)
    print(to_yaml(cfg).rstrip())
    print(f"# derived for world_size={plan.world_size}: global_batch={plan.global_batch} = micro_batch "
          f"{plan.micro_batch} x grad_accum {plan.grad_accum} x world_size {plan.world_size}")
    return 0
