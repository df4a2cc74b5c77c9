"""Interleaved timing inside one job: every contestant lives in the same processes and takes turns.

Round r runs one step of each contestant, in an order rotated by r (A B C, B C A, C A B, ...), so neither
machine noise nor position in the round favours anyone. Each step is timed between two barriers (and a
device synchronisation on GPUs): the time is the whole job's step, including the slowest rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping

import torch
import torch.distributed as dist

StepFn = Callable[[int], object]


def settle(device: torch.device) -> None:
    """Wait until this rank's queued device work and every other rank have finished."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


@dataclass
class Timings(Mapping):
    """Per contestant, one sample per timed round: wall seconds of the job's step (barrier to barrier), and the
    CPU seconds this rank's main thread spent in it (the framework's own work: blind to waiting, and so to
    most of the noise other processes cause on a shared machine, but also to time spent in other threads).

    As a mapping it is the wall times: ``timings[name]``.
    """

    wall: Dict[str, List[float]] = field(default_factory=dict)
    cpu: Dict[str, List[float]] = field(default_factory=dict)

    def __getitem__(self, name: str) -> List[float]:
        return self.wall[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.wall)

    def __len__(self) -> int:
        return len(self.wall)


def timed_step(fn: StepFn, step: int, device: torch.device) -> tuple:
    """(wall seconds, main-thread CPU seconds) of ``fn(step)`` on the whole job (barrier before and after)."""
    settle(device)
    start, cpu = time.perf_counter(), time.thread_time()
    fn(step)
    cpu = time.thread_time() - cpu
    settle(device)
    return time.perf_counter() - start, cpu


def interleaved_rounds(contestants: Mapping[str, StepFn], rounds: int, warmup: int, device: torch.device,
                       first_step: int = 0) -> Timings:
    """Step times per contestant over ``rounds`` rounds, after ``warmup`` untimed rounds.

    Every contestant runs global step ``first_step + k`` in round k, so all see the same data in the same
    round. The order is the same on every rank (collectives must match), rotated each round.
    """
    names = list(contestants)
    for k in range(warmup):
        for name in names:
            contestants[name](first_step + k)
    settle(device)
    out = Timings({name: [] for name in names}, {name: [] for name in names})
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = timed_step(contestants[name], first_step + warmup + r, device)
            out.wall[name].append(wall)
            out.cpu[name].append(cpu)
    return out
