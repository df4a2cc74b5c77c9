"""DistributedDataParallel: every rank holds the whole model; gradients are all-reduced in buckets during the
last micro-step's backward (``no_sync`` on the others, so accumulation costs one all-reduce per step).

At world size 1 there is nothing to all-reduce, and the model is not wrapped at all: no buckets, no comm hook, no
reducer hooks on every gradient, the same step as the single strategy.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Dict, List, Optional

from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distrain.config import BatchPlan
from distrain.errors import ConfigError
from distrain.strategies.ddp_join import BackwardJoin, JoinsDDPBackward
from distrain.strategies.placement import Layout
from distrain.strategies.base import Strategy, StrategyContext
from distrain.strategies.comm_hooks import BucketCapMB, ByteCounter, PowerSGDRank, register_comm_hook


class DDPStrategy(JoinsDDPBackward, Strategy):
    """torch's DistributedDataParallel: every rank holds the whole model and optimizer; gradients are averaged in
    buckets while the last micro-batch's backward runs."""

    name = "ddp"
    meta_init = True
    supports_auto_micro_batch = True

    @classmethod
    def layouts(cls) -> List[Layout]:
        return [Layout("ddp", cls.name, speed_rank=0)]

    def __init__(self, ctx: StrategyContext, bucket_cap_mb: BucketCapMB = 25.0, static_graph: bool = False,
                 comm_hook: Optional[str] = None, powersgd_rank: PowerSGDRank = 1, find_unused_parameters: bool = False,
                 gradient_as_bucket_view: bool = True):
        super().__init__(ctx)
        self.ddp_kwargs = dict(bucket_cap_mb=bucket_cap_mb, static_graph=static_graph,
                               find_unused_parameters=find_unused_parameters,
                               gradient_as_bucket_view=gradient_as_bucket_view)
        self.comm_hook = comm_hook
        self.powersgd_rank = powersgd_rank
        self._sent = ByteCounter()
        self.comm_hook_state: Optional[object] = None  # PowerSGD's state, saved per rank (distrain.compression)
        # False: every micro-step runs under no_sync and the caller sums the gradients (QAT's float64 sum,
        # distrain.compression.float64_grads)
        self.engine_reduces_grads = True
        self._join: Optional[BackwardJoin] = None  # micro_batch=auto at W > 1 (distrain.strategies.ddp_join)
        refuse_auto_with(ctx.plan, **{"find_unused_parameters=true": find_unused_parameters,
                                      "static_graph=true": static_graph, "comm_hook=powersgd": comm_hook == "powersgd"})
        if static_graph and ctx.plan.grad_accum > 1:
            # no_sync under static_graph crashes on the first backward, and once past that stops all-reducing
            # (pytorch/pytorch#143580, fix pending in #187732); syncing every micro-step instead would add each
            # earlier micro-step's already-reduced gradient W times over with our SUM reduction.
            raise ConfigError(f"strategy.kwargs.static_graph=true cannot be combined with gradient accumulation "
                              f"(here grad_accum={ctx.plan.grad_accum} at world size {ctx.plan.world_size}): torch's "
                              f"DDP breaks no_sync under a static graph. Set train.micro_batch=null (one micro-batch "
                              f"per rank and step) or strategy.kwargs.static_graph=false.",
                              key="strategy.kwargs.static_graph")

    @classmethod
    def exact_for(cls, kwargs: Dict[str, Any]) -> bool:
        return kwargs.get("comm_hook") is None  # fp16/bf16/PowerSGD hooks compress gradients: lossy by design

    @property
    def comm_bytes(self) -> int:
        """Gradient bytes this rank has all-reduced so far (after compression, when a comm hook compresses)."""
        return self._sent.total

    def count_sent(self, nbytes: int) -> None:
        """Gradient bytes a caller all-reduced itself (engine_reduces_grads False: QAT's float64 sum)."""
        self._sent.total += nbytes

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model on the device, checkpointed and compiled per train.*, in DDP (the model itself at W=1)."""
        model = self._on_device(model)
        self._checkpoint_and_compile(model)  # per block, before DDP (see distrain.models.compile)
        if self.ctx.info.world_size == 1:
            return model
        device_ids = [self.ctx.device] if self.ctx.device.type == "cuda" else None
        ddp = DistributedDataParallel(model, device_ids=device_ids, **self.ddp_kwargs)
        self.grad_reduction, self.comm_hook_state = register_comm_hook(ddp, self.comm_hook, self.powersgd_rank,
                                                                       self._sent)
        if self.ctx.plan.auto:
            self._join = BackwardJoin(ddp, self._sent)
        return ddp

    def setup(self, model: nn.Module) -> None:
        self.model = self.wrap(model)
        self.optimizer = self._build_optimizer(self.module)

    def accumulate(self, last_micro_step: bool) -> ContextManager:
        if self._join is not None:
            self._join.arm()
        if (last_micro_step and self.engine_reduces_grads) or not isinstance(self.model, DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def teardown(self) -> None:
        if self._join is not None:
            self._join.close()

    def drop_step(self) -> None:
        super().drop_step()
        if self._join is not None:
            self._join.reset()


def refuse_auto_with(plan: BatchPlan, **options: bool) -> None:
    """train.micro_batch=auto cannot redo a step under DDP's find_unused_parameters (its extra all-reduce of the
    used parameters) or static_graph (no no_sync), nor under the PowerSGD comm hook, whose error feedback and warm
    start would advance through the dropped attempt (the redone step would not be the step a fixed micro-batch
    takes): one paragraph naming the option. ``options``: the setting as written (``static_graph=true``) -> set."""
    for setting, value in options.items():
        if plan.auto and value:
            name = setting.partition("=")[0]
            why = ("PowerSGD's error feedback and warm-start factors would advance through the attempt that is "
                   "dropped, so the redone step would differ from the one a fixed micro-batch takes"
                   if name == "comm_hook" else
                   f"a rank that runs out of memory rejoins its peers' gradient all-reduces through DDP's reducer, "
                   f"which {name} changes")
            raise ConfigError(f"train.micro_batch=auto cannot be combined with strategy.kwargs.{setting}: {why} "
                              f"(docs/out-of-memory.md). Set a fixed train.micro_batch, or change "
                              f"strategy.kwargs.{name}.", key=f"strategy.kwargs.{name}")
