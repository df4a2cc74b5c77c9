"""`distrain verify CONFIG --worlds 1,2,3`: prove that N ranks give the same parameters as one rank."""

from __future__ import annotations

import argparse

from distrain.commands import add_config_arguments
from distrain.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("verify", help="prove that N ranks give the same parameters as one rank")
    add_config_arguments(p)
    p.add_argument("--worlds", default="1,2", help="comma-separated world sizes; the first is the reference (default 1,2)")
    p.add_argument("--steps", type=int, default=None, help="override train.steps (default: the config's)")
    p.add_argument("--tolerance", type=float, default=1e-5, help="max relative parameter difference (default 1e-5)")
    p.add_argument("--full-batch", action="store_true",
                   help="compare every world size with one rank training on the whole global batch per step in one "
                        "forward (catches an objective that changes with micro_batch)")
    p.add_argument("--trainer-args", metavar="MODULE:FUNCTION", default=None,
                   help="your model, data and loss: a function returning distrain.Trainer's keyword arguments "
                        "(model, train_data, loss_fn, step_fn, frozen, items), called on every rank")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from distrain.config import load_config  # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.compression.checks import inexact_compression
    from distrain.strategies import strategy_class
    from distrain.verify import format_table, parse_worlds, verify

    worlds = parse_worlds(args.worlds)
    if args.steps is not None and args.steps < 1:
        raise UsageError(f"--steps {args.steps} is not allowed: it must be at least 1.")
    cfg = load_config(args.config, args.overrides)
    strategy = strategy_class(cfg.strategy.name)
    # e.g. ddp with a compressing comm hook is not exact, nor is QAT where gradients are not summed in float64
    why = (None if strategy.exact_for(cfg.strategy.kwargs) else
           f"strategy {strategy.name!r} with these strategy.kwargs does not sync every step, or compresses what it "
           f"syncs")
    why = why or inexact_compression(cfg)
    exact = why is None
    reference = "one rank on the whole global batch" if args.full_batch else f"world size {worlds[0]}"
    print(f"distrain verify: {args.config} with strategy {strategy.name!r} at world sizes {worlds} against "
          f"{reference} ...", flush=True)
    rows = verify(args.config, worlds, args.overrides, steps=args.steps, trainer_args=args.trainer_args,
                  full_batch=args.full_batch)
    print(format_table(rows, args.tolerance, exact))
    bad = [r for r in rows if r.max_rel_diff > args.tolerance or not r.same_indices]
    wrong_samples = [r for r in rows if not r.same_indices]
    if wrong_samples:  # whatever the strategy, every world size must consume exactly the same samples
        print(f"distrain verify: FAILED: world size(s) {', '.join(str(r.world_size) for r in wrong_samples)} "
              f"consumed different samples than {reference}.")
        return 1
    if bad and exact:
        print(f"distrain verify: FAILED: {len(bad)} world size(s) differ from {reference} beyond "
              f"{args.tolerance:g} (or consumed different samples); strategy {strategy.name!r} should be exact.")
        return 1
    if bad:
        worst = max(bad, key=lambda r: r.max_rel_diff)
        print(f"distrain verify: approximate by design, not exact by design: {why}; measured max relative "
              f"difference {worst.max_rel_diff:.3e} (world size {worst.world_size}), reported, not failed.")
        return 0
    print("distrain verify: OK: every world size matches.")
    return 0
