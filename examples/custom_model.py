"""Your own model, data and loss with distrain's Python API — no subclassing, no distributed code.

Run it in one process:      python examples/custom_model.py
or on 2 CPU workers:        torchrun --nproc-per-node 2 examples/custom_model.py
"""

import torch
from torch import nn
from torch.utils.data import Dataset

import distrain


class Sine(Dataset):
    """y = sin(3x) on [-2, 2]: any map-style Dataset returning (input, target) works."""

    def __init__(self, n: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.rand(n, 1, generator=g) * 4 - 2
        self.y = torch.sin(3 * self.x)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 1))


if __name__ == "__main__":
    config = {
        "run": {"name": "custom-sine", "dir": "runs"},
        "train": {"global_batch": 64, "micro_batch": 16, "steps": 300, "optimizer": "adam", "lr": 0.01,
                  "lr_schedule": "cosine", "log_every": 50},
        "strategy": {"name": "ddp"},
    }
    with distrain.Trainer(config, model=make_model, train_data=Sine(2048, seed=0), eval_data=Sine(512, seed=1),
                          loss_fn=nn.functional.mse_loss) as trainer:
        final = trainer.fit()
        weights = trainer.full_state_dict()  # complete on rank 0, whatever the strategy
        if trainer.info.is_main:
            print(f"final train loss {final['loss']:.4f}, eval loss {final['eval_loss']:.4f}, "
                  f"{len(weights)} tensors in the consolidated state dict")
