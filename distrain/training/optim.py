"""Optimizers and the learning-rate schedule, built from ``train.*``.

The schedule is a pure function of the step (warmup, then constant or cosine), so a resumed run needs no
scheduler state: the lr at step s is ``lr_at(s)`` wherever and however often it restarts.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch
from omegaconf import DictConfig


def build_optimizer(params: Iterable[torch.nn.Parameter], train: DictConfig) -> torch.optim.Optimizer:
    """The optimizer named by train.optimizer over ``params`` (already sharded/wrapped by the strategy)."""
    params = list(params)
    name = train.optimizer
    if name == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay)
    betas = (float(train.betas[0]), float(train.betas[1]))
    if name == "adam":
        return torch.optim.Adam(params, lr=train.lr, betas=betas, eps=train.eps, weight_decay=train.weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=train.lr, betas=betas, eps=train.eps, weight_decay=train.weight_decay)
    raise AssertionError(f"train.optimizer={name!r} passed validation but has no builder")


def optimizer_kwargs(train: DictConfig) -> dict:
    """The same hyper-parameters as keyword arguments, for engines that build the optimizer themselves."""
    if train.optimizer == "sgd":
        return {"lr": train.lr, "momentum": train.momentum, "weight_decay": train.weight_decay}
    return {"lr": train.lr, "betas": [float(b) for b in train.betas], "eps": train.eps,
            "weight_decay": train.weight_decay}


def lr_at(step: int, train: DictConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then constant or cosine decay."""
    base = float(train.lr)
    if step < train.warmup_steps:
        return base * (step + 1) / train.warmup_steps
    if train.lr_schedule == "constant":
        return base
    decay_steps = max(1, train.steps - train.warmup_steps)
    progress = min(1.0, (step - train.warmup_steps) / decay_steps)
    floor = base * train.min_lr_ratio
    return floor + (base - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
