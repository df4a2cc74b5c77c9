"""The `distrain` command: a thin front door over the Python API and torch's own elastic launcher.

Every user mistake becomes one paragraph on stderr and exit code 2; runtime failures exit 1. No tracebacks
for things the user can fix.
"""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Callable, Dict, Optional, Sequence

from distrain.errors import DistrainError, UsageError

COMMANDS: Dict[str, Callable[[argparse.Namespace], int]] = {}


def command(name: str):
    def deco(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = fn
        return fn

    return deco


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as a UsageError (one paragraph, exit 2) instead of its own exit."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}. Run `{self.prog} --help` for usage.")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distrain", description="Distributed data-parallel training for PyTorch.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("train", help="train from a YAML config (one process, or one rank under torchrun/srun)")
    p.add_argument("config", metavar="CONFIG", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.steps=50")

    p = sub.add_parser("launch", help="start N workers per node with torch's elastic launcher, then train")
    p.add_argument("--nproc-per-node", type=int, default=1, metavar="N", help="workers on this node (default 1)")
    p.add_argument("--nnodes", default="1", metavar="N|MIN:MAX", help="number of nodes (default 1)")
    p.add_argument("--node-rank", type=int, default=None, metavar="R", help="this node's rank (static rendezvous)")
    p.add_argument("--rdzv-endpoint", default=None, metavar="HOST:PORT", help="c10d rendezvous address (multi-node)")
    p.add_argument("--rdzv-id", default="distrain", help="job id shared by all nodes (default distrain)")
    p.add_argument("--max-restarts", type=int, default=0, metavar="K",
                   help="restart the worker group up to K times after a failure (resumes from the latest checkpoint)")
    p.add_argument("--monitor-interval", type=float, default=1.0, help=argparse.SUPPRESS)
    p.add_argument("config", metavar="CONFIG", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")

    p = sub.add_parser("verify", help="prove that N ranks give the same parameters as one rank")
    p.add_argument("config", metavar="CONFIG")
    p.add_argument("overrides", nargs="*", metavar="key=value")
    p.add_argument("--worlds", default="1,2", help="comma-separated world sizes; the first is the reference (default 1,2)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps (default: the config's)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max relative parameter difference (default 1e-5)")

    p = sub.add_parser("config", help="inspect configs")
    config_sub = p.add_subparsers(dest="config_command", metavar="ACTION", parser_class=_Parser)
    show = config_sub.add_parser("show", help="print the resolved config and the batch plan for a world size")
    show.add_argument("config", metavar="CONFIG")
    show.add_argument("overrides", nargs="*", metavar="key=value")
    show.add_argument("--world-size", type=int, default=1, metavar="W", help="world size to plan for (default 1)")
    return parser


def _paragraph(message: str) -> str:
    return textwrap.fill(" ".join(message.split()), width=100)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `distrain` and `python -m distrain`; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args, extra = build_parser().parse_known_args(argv)
        # key=value overrides may come after options (`verify CONFIG --worlds 1,2 train.steps=5`).
        stray = [a for a in extra if "=" not in a or a.startswith("-")]
        if stray or (extra and not hasattr(args, "overrides")):
            raise UsageError(f"distrain: unrecognized arguments: {' '.join(stray or extra)}. "
                             f"Run `distrain --help` for usage.")
        if extra:
            args.overrides = list(args.overrides) + extra
        if not args.command:
            build_parser().print_help()
            return 2
        return COMMANDS[args.command](args)
    except DistrainError as err:
        if _should_report():
            print(f"distrain: error: {_paragraph(str(err))}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("distrain: interrupted", file=sys.stderr)
        return 130


def _should_report() -> bool:
    """Under a launcher every rank hits the same config error: let rank 0 alone say it."""
    return os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) == "0"


@command("train")
def _train(args: argparse.Namespace) -> int:
    from distrain.trainer import Trainer

    trainer = Trainer(args.config, overrides=args.overrides)
    try:
        trainer.fit()
    finally:
        trainer.close()
    return 0


@command("launch")
def _launch(args: argparse.Namespace) -> int:
    from distrain.launcher import launch

    return launch(args)


@command("verify")
def _verify(args: argparse.Namespace) -> int:
    from distrain.strategies import strategy_class
    from distrain.config import load_config
    from distrain.verify import format_table, parse_worlds, verify

    worlds = parse_worlds(args.worlds)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps} is not allowed: it must be at least 1.")
    strategy = strategy_class(load_config(args.config, args.overrides).strategy.name)
    print(f"distrain verify: {args.config} with strategy {strategy.name!r} at world sizes {worlds} ...", flush=True)
    rows = verify(args.config, worlds, args.overrides, steps=args.steps)
    print(format_table(rows, args.tolerance))
    bad = [r for r in rows if r.max_rel_diff > args.tolerance or not r.same_indices]
    if bad and strategy.exact:
        print(f"distrain verify: FAILED: {len(bad)} world size(s) differ from world size {worlds[0]} beyond "
              f"{args.tolerance:g} (or consumed different samples); strategy {strategy.name!r} should be exact.")
        return 1
    if bad:
        print(f"distrain verify: strategy {strategy.name!r} is not exact by design (it does not sync every step); "
              f"differences are reported, not failed.")
        return 0
    print("distrain verify: OK: every world size matches.")
    return 0


@command("config")
def _config(args: argparse.Namespace) -> int:
    from distrain.config import load_config, to_yaml
    from distrain.preflight import preflight

    if args.config_command != "show":
        raise UsageError("distrain config: choose an action: `distrain config show CONFIG [key=value ...]`.")
    if args.world_size < 1:
        raise UsageError(f"--world-size {args.world_size} is not allowed: it must be at least 1.")
    cfg = load_config(args.config, args.overrides)
    plan = preflight(cfg, args.world_size)
    print(to_yaml(cfg).rstrip())
    print(f"# derived for world_size={plan.world_size}: global_batch={plan.global_batch} = micro_batch "
          f"{plan.micro_batch} x grad_accum {plan.grad_accum} x world_size {plan.world_size}")
    return 0

