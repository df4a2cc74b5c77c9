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
    from distrain.config import batch_plan, load_config
    from distrain.env import detect

    end_with_launcher()  # a worker of `distrain launch` ends with it, even when it is killed with -9
    # Config mistakes, half-set launcher variables and a batch that does not divide fail here, in 0.3 s, before
    # torch is imported (the Trainer checks all of it again, for the Python API).
    cfg = load_config(args.config, args.overrides)
    batch_plan(cfg, detect().world_size)
    from distrain.training.trainer import Trainer

    with Trainer(cfg) as trainer:
        final = trainer.fit()
    if final.get("preempted") and trainer.info.source == "kubeflow":
        from distrain.env.kubeflow import PREEMPTED_EXIT_CODE

        return PREEMPTED_EXIT_CODE  # checkpoint committed; non-zero: Kubernetes restarts the pod, not "Succeeded"
    return 0
