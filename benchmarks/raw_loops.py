"""The reference contestants: training loops written by hand against torch's own engines, nanoGPT-style.

What a user would write without distrain: wrap the model with the engine, set the learning rate, run the
micro-batches with gradient sync only on the last one, clip, step, zero the gradients. They share the
workload (model init, data, sampler, optimizer hyper-parameters) with distrain's side and nothing else.
DeepSpeed and Accelerate loops live in ``benchmarks/engines.py``.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from benchmarks.workload import Workload
from distrain.optim import lr_at


class RawLoop:
    """A hand-written loop: ``step(s)`` trains global step s; subclasses wrap the model and say how to sync."""

    def __init__(self, work: Workload):
        self.work = work
        self.train = work.train  # plain Python values, as a hand-written loop has them

    def no_sync(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if last else self.no_sync()

    def step(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.train)
        batches = self.work.micro_batches(step)
        for i, (inputs, targets) in enumerate(batches):
            with self.sync_context(last=i == len(batches) - 1):
                loss = self.work.loss_fn(self.model(inputs), targets) / len(batches)
                loss.backward()
        if self.train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.train.grad_clip)
        self.optimizer.step()
        self.after_step(step)
        self.optimizer.zero_grad(set_to_none=True)

    def after_step(self, step: int) -> None:
        """Work a loop does after the update, gradients still in place (parameter averaging for local SGD)."""

    def close(self) -> None:
        pass


def _device_ids(work: Workload) -> Optional[List[torch.device]]:
    return [work.device] if work.device.type == "cuda" else None


class RawDDP(RawLoop):
    """torch DistributedDataParallel with its built-in all-reduce (mean), no_sync on all but the last micro-step."""

    def __init__(self, work: Workload, bucket_cap_mb: float = 25.0):
        super().__init__(work)
        self.model = DistributedDataParallel(work.build_model().to(work.device), device_ids=_device_ids(work),
                                             bucket_cap_mb=bucket_cap_mb, gradient_as_bucket_view=True)
        self.optimizer = work.optimizer(self.model)

    def no_sync(self) -> contextlib.AbstractContextManager:
        return self.model.no_sync()


class RawZeRO1(RawDDP):
    """DDP for gradients plus torch's ZeroRedundancyOptimizer, which shards the optimizer state (ZeRO stage 1)."""

    def __init__(self, work: Workload):
        from torch.distributed.optim import ZeroRedundancyOptimizer

        RawLoop.__init__(self, work)
        self.model = DistributedDataParallel(work.build_model().to(work.device), device_ids=_device_ids(work),
                                             gradient_as_bucket_view=True)
        local = work.optimizer(self.model)  # only to read the class, its groups and its defaults
        self.optimizer = ZeroRedundancyOptimizer(local.param_groups, optimizer_class=type(local),
                                                 **{k: v for k, v in local.defaults.items() if k in _HYPER})


_HYPER = ("lr", "betas", "eps", "weight_decay", "momentum")


class RawFSDP(RawLoop):
    """FSDP2 ``fully_shard`` on each unit then the root, the way torch's docs and torchtitan apply it."""

    def __init__(self, work: Workload, reshard_after_forward: bool = True, units: Optional[List[nn.Module]] = None):
        from torch.distributed.fsdp import fully_shard

        super().__init__(work)
        model = work.build_model().to(work.device)
        for unit in (units if units is not None else shard_units(model)):
            fully_shard(unit, reshard_after_forward=reshard_after_forward)
        self.model = fully_shard(model, reshard_after_forward=reshard_after_forward)
        self.optimizer = work.optimizer(self.model)

    def sync_context(self, last: bool) -> contextlib.AbstractContextManager:
        self.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()


def shard_units(model: nn.Module) -> List[nn.Module]:
    """The submodules sharded one at a time: the children of every nn.ModuleList (a GPT's blocks; none in an MLP),
    the usual policy of torch's FSDP2 examples and torchtitan, and the one distrain's fsdp applies by default."""
    return [child for m in model.modules() if isinstance(m, nn.ModuleList) for child in m]


class RawLocalSGD(RawLoop):
    """Local SGD with torch's own engine: no gradient sync, PeriodicModelAverager every ``period`` steps."""

    def __init__(self, work: Workload, period: int):
        from torch.distributed.algorithms.model_averaging.averagers import PeriodicModelAverager

        super().__init__(work)
        self.model = work.build_model().to(work.device)
        self.optimizer = work.optimizer(self.model)
        self.averager = PeriodicModelAverager(period=period, warmup_steps=0)

    def after_step(self, step: int) -> None:
        if dist.get_world_size() > 1:  # torch's averager skips parameters without a gradient: before zero_grad
            self.averager.average_parameters(self.model.parameters())
