"""Interleaved timing inside one job: every contestant lives in the same processes and takes turns.

Round r runs one step of each contestant, in an order rotated by r (A B C, B C A, C A B, ...), so neither
machine noise nor position in the round favours anyone. Each step is timed between two barriers (and a
device synchronisation on GPUs): the time is the whole job's step, including the slowest rank.
"""

from __future__ import annotations

import time
from typing import Callable, Dict, List, Mapping

import torch
import torch.distributed as dist

StepFn = Callable[[int], object]


def settle(device: torch.device) -> None:
    """Wait until this rank's queued device work and every other rank have finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def timed_step(fn: StepFn, step: int, device: torch.device) -> float:
    """Seconds for ``fn(step)`` on the whole job (barrier before and after)."""
    settle(device)
    start = time.perf_counter()
    fn(step)
    settle(device)
    return time.perf_counter() - start


def interleaved_rounds(contestants: Mapping[str, StepFn], rounds: int, warmup: int, device: torch.device,
                       first_step: int = 0) -> Dict[str, List[float]]:
    """Step times per contestant over ``rounds`` rounds, after ``warmup`` untimed rounds.

    Every contestant runs global step ``first_step + k`` in round k, so all see the same data in the same
    round. The order is the same on every rank (collectives must match), rotated each round.
    """
    names = list(contestants)
    for k in range(warmup):
        for name in names:
            contestants[name](first_step + k)
    settle(device)
    times: Dict[str, List[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(timed_step(contestants[name], first_step + warmup + r, device))
    return times
