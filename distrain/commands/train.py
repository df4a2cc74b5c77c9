"""`distrain train CONFIG [key=value ...]`: one process, or one rank under torchrun/srun."""

from __future__ import annotations

import argparse

from distrain.commands import add_config_arguments


def register(sub) -> None:
    p = sub.add_parser("train", help="train from a YAML config (one process, or one rank under torchrun/srun)")
    add_config_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from distrain.trainer import Trainer

    with Trainer(args.config, overrides=args.overrides) as trainer:
        trainer.fit()
    return 0
