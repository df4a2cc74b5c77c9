"""The one workload every contestant in a job trains: same model, data, batch, optimizer and precision.

Built once per job from a config file plus overrides; the datasets are shared by all contestants (the
same tensors), every model is built from the same seed, and every loop consumes global step s's samples
from the same global-step sampler, so the contestants differ only in how they distribute the work.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Iterator, List, Sequence, Tuple

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import Dataset

from distrain.config import BatchPlan, batch_plan, load_config
from distrain.data import GlobalStepSampler, build_datasets, fetch_batch, move_to, split_input_target
from distrain.env import ProcessInfo
from distrain.training.losses import default_loss
from distrain.models import build_model
from distrain.optim import build_optimizer, param_groups

REPO = Path(__file__).resolve().parents[1]

# Everything a benchmark run must not do besides training: no checkpoints, no eval, no console output; and
# train.steps far beyond any benchmark, because a strategy may act on the run's last step (local_sgd syncs).
QUIET = ["train.resume=never", "checkpoint.every=0", "checkpoint.every_minutes=0", "checkpoint.at_end=false",
         "metrics.progress=none", "train.eval_every=0", "train.steps=1000000"]


@dataclass
class Workload:
    cfg: DictConfig
    info: ProcessInfo
    device: torch.device
    plan: BatchPlan
    train_data: Dataset
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sampler: GlobalStepSampler
    run_root: Path
    train: SimpleNamespace  # train.* as plain Python values, the way a hand-written loop holds its settings
    _runs: Iterator[int] = field(default_factory=itertools.count)

    @property
    def spec(self) -> Any:
        return getattr(self.train_data, "spec", None)

    def build_model(self) -> nn.Module:
        """The model, initialised from the run seed (identical for every contestant and rank)."""
        torch.manual_seed(self.cfg.run.seed)
        return build_model(self.cfg.model.name, self.cfg.model.kwargs, self.spec)

    def optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        """The optimizer distrain's strategies build, over ``model``'s parameters: the same hyper-parameters and the
        same groups (weight decay off for biases, norms and embeddings, nanoGPT's practice). One group with decay on
        every parameter would be another recipe, and under ZeRO (DeepSpeed, ZeroRedundancyOptimizer), which shards
        each group apart, another number of collectives."""
        return build_optimizer(param_groups(model, self.train), self.train)

    def micro_batches(self, step: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
        """This rank's micro-batches of global step ``step``, on the device (what the Trainer's loop fetches)."""
        return [move_to(split_input_target(fetch_batch(self.train_data, indices)), self.device)
                for indices in self.sampler.micro_batches(step, self.info.rank, self.info.world_size,
                                                          self.plan.micro_batch)]

    def config_for(self, strategy: str, kwargs: Dict[str, Any]) -> DictConfig:
        """This workload's config with another strategy and a fresh run directory."""
        cfg = OmegaConf.create(OmegaConf.to_container(self.cfg, resolve=True))
        cfg.strategy.name = strategy
        cfg.strategy.kwargs = dict(kwargs)
        cfg.run.dir = str(self.run_root)
        cfg.run.name = f"c{next(self._runs)}-{strategy}"
        return cfg

    def describe(self) -> Dict[str, Any]:
        t = self.cfg.train
        n_params = sum(p.numel() for p in self.build_model().parameters())
        return {"model": self.cfg.model.name, "model_kwargs": dict(self.cfg.model.kwargs), "data": self.cfg.data.name,
                "params": n_params, "global_batch": self.plan.global_batch, "micro_batch": self.plan.micro_batch,
                "grad_accum": self.plan.grad_accum, "world_size": self.plan.world_size, "optimizer": t.optimizer,
                "precision": t.precision, "grad_clip": t.grad_clip}


def make_workload(config: str, overrides: Sequence[str], info: ProcessInfo, device: torch.device,
                  scratch: str) -> Workload:
    """Load ``config`` (a path relative to the repo, or absolute) with overrides and build the shared data;
    the contestants' run directories go under ``scratch``."""
    path = Path(config)
    cfg = load_config(path if path.is_absolute() else REPO / path, [*QUIET, *overrides])
    plan = batch_plan(cfg, info.world_size)
    train, _ = build_datasets(cfg.data.name, cfg.data.kwargs, cfg.data.eval_fraction)
    loss_fn = default_loss(train.spec.task)
    return Workload(cfg=cfg, info=info, device=device, plan=plan, train_data=train, loss_fn=loss_fn,
                    sampler=GlobalStepSampler(len(train), plan.global_batch, seed=cfg.run.seed),
                    run_root=Path(scratch),
                    # an OmegaConf read costs ~10 us (lr_at ~100 us): a loop that paid it per step would be slowed
                    train=SimpleNamespace(**OmegaConf.to_container(cfg.train, resolve=True)))
