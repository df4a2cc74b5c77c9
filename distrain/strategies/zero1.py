"""ZeRO-1: DDP for the gradients, torch's ZeroRedundancyOptimizer for the update.

Every rank still holds the whole model and all-reduces whole gradients (exactly as DDP does), but the optimizer
state is partitioned: each rank steps only the parameters it owns, then broadcasts them. Adam's two moments,
which are twice the model, shrink to about 1/W per rank.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from distrain.optim import build_optimizer, param_groups
from distrain.strategies.ddp import DDPStrategy
from distrain.strategies.placement import SHARD, Layout
from distrain.strategies.base import StrategyContext
from distrain.strategies.comm_hooks import BucketCapMB, PowerSGDRank


class ZeRO1Strategy(DDPStrategy):
    name = "zero1"


    @classmethod
    def layouts(cls) -> List[Layout]:
        return [Layout("zero1", cls.name, optimizer=SHARD, gathers_per_step=1.0, speed_rank=2)]

    def __init__(self, ctx: StrategyContext, bucket_cap_mb: BucketCapMB = 25.0, static_graph: bool = False,
                 comm_hook: Optional[str] = None, powersgd_rank: PowerSGDRank = 1, find_unused_parameters: bool = False,
                 gradient_as_bucket_view: bool = True, parameters_as_bucket_view: bool = False):
        super().__init__(ctx, bucket_cap_mb=bucket_cap_mb, static_graph=static_graph, comm_hook=comm_hook,
                         powersgd_rank=powersgd_rank, find_unused_parameters=find_unused_parameters,
                         gradient_as_bucket_view=gradient_as_bucket_view)
        self.parameters_as_bucket_view = parameters_as_bucket_view
        self._param_bytes = 0

    def setup(self, model: nn.Module) -> None:
        self.model = self.wrap(model)
        train = self.ctx.train

        device = self.ctx.device

        def local_optimizer(groups: List[Dict[str, Any]], **_: Any) -> torch.optim.Optimizer:
            # ZeRO hands each rank its partition of every group; build it as every other strategy builds its own.
            return build_optimizer(groups, train, device)

        # ZeRO partitions each weight-decay group (param_groups) and copies its groups' lr into the local
        # optimizer before every step, which is how the schedule's set_lr reaches it. Every other
        # hyper-parameter comes from build_optimizer.
        self.optimizer = ZeroRedundancyOptimizer(param_groups(self.module, train), optimizer_class=local_optimizer,
                                                 parameters_as_bucket_view=self.parameters_as_bucket_view,
                                                 lr=float(train.lr))
        if self.ctx.info.world_size > 1:  # the owners' broadcast after every step (nobody to send to at W=1)
            self._param_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())

    def step(self) -> None:
        super().step()
        self._sent.total += self._param_bytes  # the owners broadcast their updated partitions to everyone

    # --- state -------------------------------------------------------------------------------------
    def state_tensors(self) -> Dict[str, Iterable[torch.Tensor]]:
        tensors = dict(super().state_tensors())
        local = self.optimizer.optim  # this rank's partition: the only optimizer state it holds
        tensors["optimizer"] = [v for s in local.state.values() for v in s.values() if torch.is_tensor(v)]
        return tensors

    def checkpoint_state(self) -> Dict[str, Any]:
        """Model state, and the optimizer state of the parameters this rank owns, keyed by parameter name.

        torch's get_state_dict does not understand ZeroRedundancyOptimizer, so this builds the same layout it
        gives for a plain optimizer ({"state": {fqn: {...}}, "param_groups": [...]}), holding only this rank's
        partition. DCP writes each rank's entries; at load, every rank asks for the names it owns under the *new*
        partition (any world size), and a ddp checkpoint loads into zero1 and back, since the layout is the same.
        """
        # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        local = self.optimizer.optim
        if not local.state:
            _materialize_state(local)  # DCP loads in place, so the template needs tensors of the right shapes
        names = {p: name for name, p in self.module.named_parameters()}
        state = {names[p]: {k: v for k, v in local.state[p].items() if v is not None}
                 for group in local.param_groups for p in group["params"] if p in local.state}
        groups = [{**{k: v for k, v in mine.items() if k != "params"}, "params": [names[p] for p in every["params"]]}
                  for mine, every in zip(local.param_groups, self.optimizer.param_groups)]
        return {"model": get_model_state_dict(self.model), "optim": {"state": state, "param_groups": groups},
                **self._scaler_state()}

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(self.model, state["model"])
        local = self.optimizer.optim
        names = {p: name for name, p in self.module.named_parameters()}
        saved = state["optim"]["state"]
        for group in local.param_groups:
            for p in group["params"]:
                for key, value in saved.get(names[p], {}).items():
                    current = local.state[p].get(key)
                    if torch.is_tensor(current) and torch.is_tensor(value):
                        current.copy_(value)  # (a no-op when DCP already loaded into this very tensor)
                    else:
                        local.state[p][key] = value
        self._load_scaler_state(state)


def _materialize_state(optimizer: torch.optim.Optimizer) -> None:
    """Allocate an optimizer's lazily-created state with one zero-gradient step at lr 0 (parameters unchanged)."""
    lrs = [group["lr"] for group in optimizer.param_groups]
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grads = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    for group in optimizer.param_groups:
        group["lr"] = 0.0
    optimizer.step()
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    for p, grad in zip(params, grads):
        p.grad = grad
