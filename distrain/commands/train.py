"""`distrain train CONFIG [key=value ...]`: one process, or one rank under torchrun/srun."""

from __future__ import annotations

import argparse

from distrain.commands import add_config_arguments
from distrain.env.parent_death import end_with_launcher


def register(sub) -> None:
    p = sub.add_parser("train", help="train from a YAML config (one process, or one rank under torchrun/srun)")
    add_config_arguments(p)
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.config import batch_plan, load_config
    from distrain.env import detect, preempted_exit_code

    end_with_launcher()  # a worker of `distrain launch` ends with it, even when it is killed with -9
    # Config mistakes, half-set launcher variables and a batch that does not divide fail here, in 0.3 s, before
    # torch is imported (the Trainer checks all of it again, for the Python API).
    cfg = load_config(args.config, args.overrides)
    batch_plan(cfg, detect().world_size)
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.training.trainer import Trainer

    with Trainer(cfg) as trainer:
        final = trainer.fit()
    # The checkpoint is committed; the environment says how a preempted process ends (Kubeflow: non-zero, so
    # Kubernetes restarts the pod instead of marking the job "Succeeded").
    return preempted_exit_code(trainer.info) if final.get("preempted") else 0
