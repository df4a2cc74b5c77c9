"""Interleaved timing inside one job: every contestant lives in the same processes and takes turns.

Round r runs one step of each contestant, in a fresh random order drawn from a fixed seed (the same on every
rank, since the collectives must match). A fixed or rotated order would give each contestant the same
predecessor every round, and what the previous contestant leaves behind (caches, a reducer's threads) would
bias a pair; shuffling spreads that, and machine noise, evenly. Each step is timed between two barriers (and
a device synchronisation on GPUs): the time is the whole job's step, including the slowest rank.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Mapping, Tuple

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


def timed_step(fn: StepFn, step: int, device: torch.device) -> float:
    """Seconds for ``fn(step)`` on the whole job (barrier before and after)."""
    return _timed(fn, step, device)[0]


def _timed(fn: StepFn, step: int, device: torch.device) -> Tuple[float, float]:
    """(wall seconds of the job's step, main-thread CPU seconds of ``fn(step)`` on this rank)."""
    settle(device)
    start, cpu = time.perf_counter(), time.thread_time()
    fn(step)
    cpu = time.thread_time() - cpu
    settle(device)
    return time.perf_counter() - start, cpu


def interleaved_rounds(contestants: Mapping[str, StepFn], rounds: int, warmup: int, device: torch.device,
                       first_step: int = 0, seed: int = 0) -> Timings:
    """Step times per contestant over ``rounds`` rounds, after ``warmup`` untimed rounds.

    Every contestant runs global step ``first_step + k`` in round k, so all see the same data in the same
    round. Each round's order is a shuffle from ``seed``: identical on every rank, different every round.
    """
    names = list(contestants)
    for k in range(warmup):
        for name in names:
            contestants[name](first_step + k)
    settle(device)
    order = random.Random(seed)
    out = Timings({name: [] for name in names}, {name: [] for name in names})
    for r in range(rounds):
        shuffled = names[:]
        order.shuffle(shuffled)
        for name in shuffled:
            wall, cpu = _timed(contestants[name], first_step + warmup + r, device)
            out.wall[name].append(wall)
            out.cpu[name].append(cpu)
    return out
