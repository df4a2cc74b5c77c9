"""Your own model, data and loss, trained by distrain inside Ray Train workers (ray.train.torch.TorchTrainer).

Ray starts the workers and their process group; distrain's Trainer runs in each, on Ray's group and device.
Every checkpoint distrain commits is reported to Ray, and a worker group that Ray restarts after a failure
(``max_failures``) resumes from Ray's latest checkpoint, on exactly the next sample.

    pip install 'distrain[ray]'
    python examples/ray_train.py                    # a local Ray cluster, 2 CPU workers on gloo
    RAY_ADDRESS=ray://head:10001 python examples/ray_train.py --workers 8 --gpus --storage /shared/ray
"""

import argparse

import torch
from torch import nn
from torch.utils.data import TensorDataset

from distrain.integrations.ray import fit


def products(n: int, seed: int) -> TensorDataset:
    """y = x1 * x2 on [-1, 1]^2: any map-style Dataset of (input, target) pairs works."""
    x = torch.rand(n, 2, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return TensorDataset(x, x.prod(dim=1, keepdim=True))


def trainer_kwargs() -> dict:
    """Runs on each Ray worker: the objects distrain.Trainer takes besides the config."""
    return {"model": lambda: nn.Sequential(nn.Linear(2, 64), nn.Tanh(), nn.Linear(64, 1)),
            "train_data": products(2048, seed=0), "eval_data": products(512, seed=1),
            "loss_fn": nn.functional.mse_loss}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--gpus", action="store_true", help="one GPU per worker (NCCL)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--storage", default=None, help="where Ray keeps checkpoints (shared on a multi-node cluster)")
    args = parser.parse_args()
    config = {
        "run": {"name": "ray-products", "dir": "runs"},
        "train": {"global_batch": 64, "micro_batch": 16, "steps": args.steps, "optimizer": "adam", "lr": 0.01,
                  "log_every": 50},
        "checkpoint": {"every": 100},
        "metrics": {"progress": "plain"},
    }
    result = fit(config, num_workers=args.workers, use_gpu=args.gpus, storage_path=args.storage, max_failures=2,
                 trainer_kwargs=trainer_kwargs)
    print(f"final metrics {result.metrics}, Ray's checkpoint {result.checkpoint.path}")
