"""Local SGD and DiLoCo: ranks train on their own, then synchronise parameters every ``sync_every`` steps.

Each rank takes ``sync_every`` (H) optimizer steps on its own slice of the global batch, with no gradient
communication at all, then the ranks average their parameters with one all-reduce: H times fewer bytes than
DDP's per-step gradient all-reduce. ``outer="nesterov"`` is DiLoCo's outer step: the averaged change since the
last sync (the "pseudo-gradient" anchor - average) drives an outer SGD with Nesterov momentum on the anchor
(``outer_lr``, ``outer_momentum``), and every rank restarts from the result. Each rank keeps its own inner
optimizer state, as in DiLoCo.

Not exact by design: between syncs the ranks see different data, so W ranks do not reproduce one rank.
The last step of the run always syncs, so the final model is the one every rank agrees on.
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any, ContextManager, Dict, List

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms.model_averaging.utils import average_parameters

from distrain.config.options import Range
from distrain.errors import CheckpointError, ConfigError
from distrain.strategies.placement import Layout
from distrain.strategies.base import Strategy, StrategyContext

OUTER = ("average", "nesterov")


class LocalSGDStrategy(Strategy):
    name = "local_sgd"
    exact = False
    portable_checkpoint = False  # every rank's own parameters and optimizer state, keyed by rank (checkpoint_state)
    grad_reduction = "mean"  # no gradient reduction at all: each rank's loss is scaled by 1/grad_accum only
    meta_init = True
    supports_auto_micro_batch = True  # nothing rides forward or backward: a failed rank only stops its micro-steps

    @classmethod
    def layouts(cls) -> List[Layout]:
        sync_every = 4  # the planner's example cadence
        return [Layout(f"local_sgd (H={sync_every})", cls.name, {"sync_every": sync_every}, every=sync_every,
                       exact=False, speed_rank=0)]

    def __init__(self, ctx: StrategyContext,
                 sync_every: Annotated[int, Range(ge=1, note="steps between parameter averages, 1 = every step")] = 8,
                 outer: str = "average", outer_lr: Annotated[float, Range(gt=0)] = 0.7,
                 outer_momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9):
        super().__init__(ctx)
        if outer not in OUTER:
            raise ConfigError(f"strategy.kwargs.outer={outer!r} is not an outer step. Allowed: average (plain "
                              f"parameter averaging) or nesterov (DiLoCo).", key="strategy.kwargs.outer")
        self.sync_every = sync_every
        self.last_step = int(ctx.train.steps)  # read once: sync() runs every step, an OmegaConf read costs ~10 us
        self.outer = outer
        self.outer_lr = outer_lr
        self.outer_momentum = outer_momentum
        self.anchor: List[torch.Tensor] = []  # the parameters every rank agreed on at the last sync
        self.outer_optimizer: Any = None
        self._sent = 0

    def setup(self, model: nn.Module) -> None:
        self.model = self._on_device(model)
        for p in self.model.parameters():  # the same start on every rank, whatever each rank's init did
            dist.broadcast(p.data, src=0)
        self._checkpoint_and_compile(self.model)
        self.optimizer = self._build_optimizer(self.model)
        if self.outer == "nesterov":
            self.anchor = [p.detach().clone() for p in self.model.parameters()]
            self.outer_optimizer = torch.optim.SGD(self.anchor, lr=self.outer_lr, momentum=self.outer_momentum,
                                                   nesterov=True)

    @property
    def comm_bytes(self) -> int:
        """Parameter bytes this rank has all-reduced so far (one model's worth per sync)."""
        return self._sent

    # --- the step ----------------------------------------------------------------------------------
    def accumulate(self, last_micro_step: bool) -> ContextManager:
        return contextlib.nullcontext()  # a plain module: gradients never leave the rank

    def sync(self, step: int) -> None:
        done = step + 1
        if done % self.sync_every and done != self.last_step:
            return
        params = list(self.model.parameters())
        # torch's model-averaging utility: one all-reduce of all parameters, flattened.
        average_parameters(iter(params), dist.group.WORLD)
        self._sent += sum(p.numel() * p.element_size() for p in params)
        if self.outer == "average":
            return
        # DiLoCo: pseudo-gradient = anchor - average; an outer Nesterov step moves the anchor; all restart there.
        with torch.no_grad():
            for anchor, p in zip(self.anchor, params):
                anchor.grad = anchor - p
            self.outer_optimizer.step()
            self.outer_optimizer.zero_grad(set_to_none=True)
            for p, anchor in zip(params, self.anchor):
                p.copy_(anchor)

    # --- state -------------------------------------------------------------------------------------
    def state_tensors(self) -> Dict[str, Any]:
        tensors = dict(super().state_tensors())
        if self.outer_optimizer is not None:  # DiLoCo's anchor copy and outer momentum are optimizer state too
            outer = [v for s in self.outer_optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
            tensors["optimizer"] = list(tensors["optimizer"]) + list(self.anchor) + outer
        return tensors

    def checkpoint_state(self) -> Dict[str, Any]:
        """Every rank's own parameters and inner optimizer state (they differ between syncs), keyed by rank.

        A resume therefore needs the same world size; the outer (DiLoCo) state is shared and saved once.
        """
        # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(self.model, self.optimizer)
        rank = f"rank{self.ctx.info.rank}of{self.ctx.info.world_size}"
        state: Dict[str, Any] = {"local": {rank: {"model": model_state, "optim": optim_state}}}
        if self.outer_optimizer is not None:
            state["outer"] = {"anchor": {str(i): a for i, a in enumerate(self.anchor)},
                              "momentum": {str(i): self._momentum(a) for i, a in enumerate(self.anchor)}}
        return state

    def _momentum(self, anchor: torch.Tensor) -> torch.Tensor:
        # Before the first outer step SGD has no buffer; a zero one is equivalent (SGD starts it at the gradient).
        buffer = self.outer_optimizer.state.get(anchor, {}).get("momentum_buffer")
        if buffer is None:
            buffer = torch.zeros_like(anchor)
            self.outer_optimizer.state[anchor]["momentum_buffer"] = buffer
        return buffer

    def load_checkpoint_state(self, state: Dict[str, Any]) -> None:
        # lazy: start-up: DCP takes ~2 s to import, only saves and loads need it
        from torch.distributed.checkpoint.state_dict import set_state_dict

        rank = f"rank{self.ctx.info.rank}of{self.ctx.info.world_size}"
        if rank not in state.get("local", {}):
            raise CheckpointError(f"This local_sgd checkpoint holds no state for {rank}: local SGD ranks differ "
                                  f"between syncs, so it resumes only at the world size it was saved at.")
        mine = state["local"][rank]
        set_state_dict(self.model, self.optimizer, model_state_dict=mine["model"], optim_state_dict=mine["optim"])
        if self.outer_optimizer is not None and "outer" in state:
            for i, anchor in enumerate(self.anchor):
                anchor.copy_(state["outer"]["anchor"][str(i)])
                self._momentum(anchor).copy_(state["outer"]["momentum"][str(i)])
