"""The record of a log step (metrics.jsonl, the trackers, the progress line) and the wall-time window it measures.

A record holds the loss reduced over the global batch, the learning rate, samples seen, the step time and its
split (distrain.telemetry.perf), throughput and MFU, the gradient norm, the bytes sent for sync, every rank's
peak memory and, with straggler tracking, every rank's own step time and the slowest rank
(distrain.telemetry.stragglers). Building it is collective: the loss is reduced over all ranks, and the peak memory
and phase times of every rank are gathered in one small all-reduce.
"""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from distrain import dist
from distrain.telemetry.perf import StepTimer, Throughput, peak_memory_bytes
from distrain.telemetry.stragglers import StragglerTracker


class StepWindow:
    """Wall time per step since the last log step. With ``warmup`` (torch.compile), the first step (optimizer state
    allocated, the model compiled) is no step time: it is timed apart and reported once as compile_warmup_s."""

    def __init__(self, warmup: bool = False) -> None:
        self.warmup_s: Optional[float] = None
        self._first = warmup
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def step_done(self) -> None:
        self.steps += 1
        if self._first:  # the warm-up step: set apart
            self._first = False
            self.warmup_s = time.perf_counter() - self.start
            self.restart()

    def step_time(self) -> Optional[float]:
        """Mean seconds per step of the window; None when it held only the warm-up step."""
        return (time.perf_counter() - self.start) / self.steps if self.steps else None

    def take_warmup(self) -> Optional[float]:
        """The warm-up seconds, once (for the first record after it)."""
        warmup, self.warmup_s = self.warmup_s, None
        return warmup


def gather_rank_numbers(device: torch.device, extra: Sequence[float] = ()) -> Tuple[List[float], List[List[float]]]:
    """Every rank's peak memory in MiB (see distrain.telemetry.perf.peak_memory_bytes) and its ``extra`` numbers,
    gathered with one all-reduce."""
    mine = torch.tensor([peak_memory_bytes(device) / 2**20, *extra], dtype=torch.float64, device=device)
    rows = dist.per_rank_vector(mine)
    return [round(row[0], 1) for row in rows], [row[1:] for row in rows]


class StepRecorder:
    """Builds the record of a log step from the step's numbers, its step timer (``timer``: the loop times its
    phases with it) and the throughput estimate. ``spec``: a built-in dataset's DataSpec (text: tokens/s too);
    ``stragglers``: the metrics config whose straggler_factor and straggler_window compare the ranks' phase times
    (None, factor 0 or a single rank: not compared)."""

    def __init__(self, device: torch.device, global_batch: int, world_size: int, throughput: Throughput,
                 spec: Any = None, stragglers: Any = None):
        self.device, self.global_batch, self.world_size = device, global_batch, world_size
        tracker = None if stragglers is None else StragglerTracker.from_config(stragglers, world_size)
        self.stragglers = tracker if tracker is not None and tracker.enabled else None
        self.timer, self.throughput = StepTimer(device, time_waits=self.stragglers is not None), throughput
        lm = getattr(spec, "task", None) == "lm"
        self.tokens_per_sample: Optional[int] = spec.input_shape[0] if lm else None

    def build(self, step: int, loss_sum: torch.Tensor, lr: float, window: StepWindow,
              grad_norm: Optional[float], comm_bytes: Optional[int]) -> Dict[str, Any]:
        """Collective: the record after ``step`` steps. ``loss_sum``: this rank's share of the step's objective
        (the shares of all ranks add up to the mean); ``grad_norm``: measured this step, or None."""
        loss = dist.all_reduce_sum(loss_sum.detach().clone().double()).item()
        record: Dict[str, Any] = {"step": step, "loss": loss, "lr": lr, "samples": step * self.global_batch}
        warmup = window.take_warmup()
        if warmup is not None:
            record["compile_warmup_s"] = warmup
        step_time = window.step_time()
        if step_time is not None:
            record["step_time_s"], record["samples_per_s"] = step_time, self.global_batch / step_time
            if self.tokens_per_sample:
                record["tokens_per_s"] = record["samples_per_s"] * self.tokens_per_sample
            record.update(self.timer.split(self.world_size))
            record.update(self.throughput.record(record["samples_per_s"]))
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if comm_bytes is not None:  # payload this rank sent for sync since it started (DDP, local SGD)
            record["comm_bytes"] = comm_bytes
        # a record without a measured step (only the warm-up step in its window) has no phase times to compare
        compare = self.stragglers is not None and step_time is not None
        memory, times = gather_rank_numbers(self.device, self.timer.own_times(self.world_size) if compare else ())
        record["peak_mem_mb"], record["peak_mem_mb_ranks"] = max(memory), memory
        if compare:
            record.update(self.stragglers.fields(step, times))
        return record


__all__ = ["StepRecorder", "StepWindow", "gather_rank_numbers"]
