"""`distrain ray CONFIG --workers N [--gpus] [--storage PATH] [--max-failures K] [key=value ...]`: Ray Train.

Runs distrain's Trainer in N workers of a ``ray.train.torch.TorchTrainer`` on the Ray cluster RAY_ADDRESS names
(or a new local one); see distrain/integrations/ray.py.
"""

from __future__ import annotations

import argparse

from distrain.commands import add_config_arguments
from distrain.errors import UsageError


def register(sub) -> None:
    p = sub.add_parser("ray", help="train with N Ray Train workers (ray.train.torch.TorchTrainer)")
    add_config_arguments(p)
    p.add_argument("--workers", type=int, default=2, metavar="N", help="Ray Train workers (default 2)")
    p.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL); default: CPU workers on gloo")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, metavar="C", help="CPUs per worker (default 1)")
    p.add_argument("--storage", default=None, metavar="PATH",
                   help="where Ray keeps the reported checkpoints (default <run.dir>/ray; shared storage on a "
                        "multi-node cluster)")
    p.add_argument("--max-failures", type=int, default=0, metavar="K",
                   help="worker-group restarts, each resuming from the newest checkpoint (default 0)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    # lazy: start-up: the CLI parser loads every command, the work loads on use
    from distrain.integrations.ray import fit

    if args.max_failures < 0:
        raise UsageError(f"--max-failures {args.max_failures} is not allowed: it must be 0 or more.")
    result = fit(args.config, args.overrides, num_workers=args.workers, use_gpu=args.gpus,
                 resources_per_worker={"CPU": args.cpus_per_worker}, storage_path=args.storage,
                 max_failures=args.max_failures)
    print(f"distrain ray: finished; metrics {result.metrics}; checkpoint {result.checkpoint}")
    return 0
