"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced in buckets during the
last micro-step's backward (``no_sync`` on the others, so accumulation costs one all-reduce per step)."""

from __future__ import annotations

import contextlib
from typing import ContextManager, Optional

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distrain.strategies.base import Strategy, StrategyContext
from distrain.strategies.comm_hooks import register_comm_hook


class DDPStrategy(Strategy):
    name = "ddp"

    def __init__(self, ctx: StrategyContext, bucket_cap_mb: float = 25.0, static_graph: bool = False,
                 comm_hook: Optional[str] = None, powersgd_rank: int = 1, find_unused_parameters: bool = False,
                 gradient_as_bucket_view: bool = True):
        super().__init__(ctx)
        self.ddp_kwargs = dict(bucket_cap_mb=bucket_cap_mb, static_graph=static_graph,
                               find_unused_parameters=find_unused_parameters,
                               gradient_as_bucket_view=gradient_as_bucket_view)
        self.comm_hook = comm_hook
        self.powersgd_rank = powersgd_rank

    def wrap(self, model: nn.Module) -> DistributedDataParallel:
        model = model.to(self.ctx.device)
        device_ids = [self.ctx.device] if self.ctx.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids, **self.ddp_kwargs)
        self.grad_reduction = register_comm_hook(ddp, self.comm_hook, self.powersgd_rank)
        return ddp

    def setup(self, model: nn.Module) -> None:
        self.model = self.wrap(model)
        self.optimizer = self._build_optimizer(self.model.parameters())

    def accumulate(self, last_micro_step: bool) -> ContextManager:
        return contextlib.nullcontext() if last_micro_step else self.model.no_sync()
