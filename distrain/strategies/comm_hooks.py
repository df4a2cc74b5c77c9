"""DDP communication hooks by name: compress gradients to fp16/bf16 on the wire, or PowerSGD low-rank."""

# No `from __future__ import annotations`: DDP checks the hook's annotations at runtime (GradBucket, Future).

from typing import Annotated, Callable, Optional, Tuple

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook
from torch.nn.parallel import DistributedDataParallel

from distrain.config.options import Range
from distrain.strategies.powersgd_state import PowerSGDMemory
from distrain.telemetry.profiling import label
from distrain.errors import ConfigError

HOOKS = ("fp16", "bf16", "powersgd")
# The typed options of the strategies built on DDP's reducer (ddp, zero1, accelerate), declared once.
BucketCapMB = Annotated[float, Range(gt=0, note="megabytes of gradients per all-reduce bucket")]
PowerSGDRank = Annotated[int, Range(ge=1, note="the rank of PowerSGD's low-rank gradient approximation")]


def sum_allreduce_hook(process_group: Optional[dist.ProcessGroup], bucket: dist.GradBucket
                       ) -> torch.futures.Future[torch.Tensor]:
    """All-reduce a bucket as a SUM (DDP's default divides by the world size; we pre-scale the loss instead)."""
    group = process_group if process_group is not None else dist.group.WORLD
    work = dist.all_reduce(bucket.buffer(), group=group, async_op=True)
    return work.get_future().then(lambda fut: fut.value()[0])


class Rider:
    """A few numbers every rank adds to the all-reduce of a syncing backward's last gradient bucket: the plain SUM
    hook appends them to that bucket's flat buffer and splits them off after, so they are summed across ranks with
    no collective of their own (micro_batch=auto's outcome, ddp_join.Outcome). The compressing hooks do not carry
    them (``carried`` stays False)."""

    def __init__(self, size: int, device: torch.device):
        self.values = torch.zeros(size, dtype=torch.float64, device=device)
        self.carried = False  # whether a last bucket carried ``values`` since ``arm``
        self._flat = torch.zeros(0)

    def flat_for(self, bucket: torch.Tensor) -> torch.Tensor:
        """A flat buffer for ``bucket`` and the values after it, in the bucket's dtype: allocated once (DDP's
        last bucket keeps its size, except once when DDP rebuilds its buckets after the first backward)."""
        size = bucket.numel() + self.values.numel()
        if self._flat.numel() != size or self._flat.dtype != bucket.dtype or self._flat.device != bucket.device:
            self._flat = torch.empty(size, dtype=bucket.dtype, device=bucket.device)
        return self._flat

    def arm(self) -> None:
        """Zeros for the next last bucket (the sum replaces them once it is done)."""
        self.values.zero_()
        self.carried = False


class ByteCounter:
    """Payload bytes handed to gradient collectives, summed over steps (what goes on the wire, per rank); and what
    rides inside a backward's last bucket (``rider``: micro_batch=auto's outcome, ddp_join.py)."""

    def __init__(self) -> None:
        self.total = 0
        self.rider: Optional[Rider] = None


def _riding_sum_hook(counter: ByteCounter) -> Callable:
    """sum_allreduce_hook, whose all-reduce of the backward's last bucket also sums ``counter.rider``."""

    def hook(process_group: Optional[dist.ProcessGroup], bucket: dist.GradBucket
             ) -> torch.futures.Future[torch.Tensor]:
        rider = counter.rider
        if rider is None or not bucket.is_last():
            return sum_allreduce_hook(process_group, bucket)
        buffer, size = bucket.buffer(), bucket.buffer().numel()
        # one copy of the bucket into a flat buffer with room for the rider, and one back into the bucket (whose
        # views are the gradients): cheaper than a second collective's round trip, which the step would wait for
        flat = rider.flat_for(buffer)
        flat[:size].copy_(buffer)
        flat[size:].copy_(rider.values)
        work = dist.all_reduce(flat, group=process_group if process_group is not None else dist.group.WORLD,
                               async_op=True)
        rider.carried = True

        def split(future: torch.futures.Future) -> torch.Tensor:
            rider.values.copy_(flat[size:])
            return buffer.copy_(flat[:size])

        return work.get_future().then(split)

    return hook


def _counted(hook: Callable, counter: ByteCounter, bytes_per_element: Optional[int]) -> Callable:
    """``hook`` that also adds its bucket's payload to ``counter`` (None: the bucket's own dtype)."""

    def counted_hook(state: object, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        counter.total += buffer.numel() * (bytes_per_element or buffer.element_size())
        with label("grad-sync"):  # a named range in metrics.profile traces (a no-op otherwise)
            future = hook(state, bucket)
        return future

    return counted_hook


def _counted_powersgd(counter: ByteCounter, memory: PowerSGDMemory) -> Callable:
    """PowerSGD, counting its low-rank P and Q factors (and uncompressed tensors) after the warm-up; ``memory`` notes
    each bucket's layout (and places a resumed state in it)."""

    def counted_hook(state: powerSGD_hook.PowerSGDState, bucket: dist.GradBucket
                     ) -> torch.futures.Future[torch.Tensor]:
        memory.before_hook(bucket)
        buffer = bucket.buffer()
        if state.iter < state.start_powerSGD_iter:  # warm-up: a plain all-reduce of the whole bucket
            counter.total += buffer.numel() * buffer.element_size()
            future = powerSGD_hook.powerSGD_hook(state, bucket)
        else:
            before = state.total_numel_after_compression  # PowerSGD's own tally of what it all-reduces
            future = powerSGD_hook.powerSGD_hook(state, bucket)
            counter.total += (state.total_numel_after_compression - before) * buffer.element_size()
        return future

    return counted_hook


def register_comm_hook(ddp: DistributedDataParallel, name: Optional[str], powersgd_rank: int = 1,
                       counter: Optional[ByteCounter] = None) -> Tuple[str, Optional[object]]:
    """Attach the named hook (None = plain all-reduce); returns how it reduces ("sum" or "mean") and the hook's
    state that outlives a step (PowerSGD's error feedback and warm start: distrain.strategies.powersgd_state saves it).

    ``counter``, when given, accumulates the payload bytes every bucket puts on the wire.
    """
    counter = counter if counter is not None else ByteCounter()
    if name is None:
        ddp.register_comm_hook(None, _counted(_riding_sum_hook(counter), counter, None))
        return "sum", None
    state = None
    if name == "fp16":
        ddp.register_comm_hook(None, _counted(default_hooks.fp16_compress_hook, counter, 2))
    elif name == "bf16":
        ddp.register_comm_hook(None, _counted(default_hooks.bf16_compress_hook, counter, 2))
    elif name == "powersgd":
        # start_powerSGD_iter >= 2 is PowerSGD's own requirement (warm-up with exact all-reduce).
        torch_state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=powersgd_rank,
                                                  start_powerSGD_iter=2, min_compression_rate=1,
                                                  use_error_feedback=True, warm_start=True)
        state = PowerSGDMemory(torch_state, ddp.module.parameters())
        ddp.register_comm_hook(torch_state, _counted_powersgd(counter, state))
    else:
        raise ConfigError(f"strategy.kwargs.comm_hook={name!r} is not a known DDP comm hook. Allowed: "
                          f"{', '.join(HOOKS)} (or null for plain all-reduce).", key="strategy.kwargs.comm_hook")
    return "mean", state  # torch's compression hooks divide by the world size themselves
