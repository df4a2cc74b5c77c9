"""DDP communication hooks by name: compress gradients to fp16/bf16 on the wire, or PowerSGD low-rank."""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime (GradBucket, Future).

from typing import Optional

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from distrain.errors import ConfigError

HOOKS = ("fp16", "bf16", "powersgd")


def sum_allreduce_hook(process_group: Optional[dist.ProcessGroup], bucket: dist.GradBucket
                       ) -> torch.futures.Future[torch.Tensor]:
    """All-reduce a bucket as a SUM (DDP's default divides by the world size; we pre-scale the loss instead)."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


def register_comm_hook(ddp: DistributedDataParallel, name: Optional[str], powersgd_rank: int = 1) -> str:
    """Attach the named hook (None = plain all-reduce); returns how it reduces: "sum" or "mean"."""
    if name is None:
        ddp.register_comm_hook(None, sum_allreduce_hook)
        return "sum"
    if name == "fp16":
        ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)
    elif name == "bf16":
        ddp.register_comm_hook(None, default_hooks.bf16_compress_hook)
    elif name == "powersgd":
        # start_powerSGD_iter >= 2 is PowerSGD's own requirement (warm-up with exact all-reduce).
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                            start_powerSGD_iter=2, min_compression_rate=1,
                                            use_error_feedback=True, warm_start=True)
        ddp.register_comm_hook(state, powerSGD_hook.powerSGD_hook)
    else:
        raise ConfigError(f"strategy.kwargs.comm_hook={name!r} is not a known DDP comm hook. Allowed: "
                          f"{', '.join(HOOKS)} (or null for plain all-reduce).", key="strategy.kwargs.comm_hook")
    return "mean"  # torch's compression hooks divide by the world size themselves
