"""Profiler traces (``metrics.profile``): torch.profiler over steps S..S+N-1, one gzipped Chrome trace per rank.

``metrics.profile.steps > 0`` turns it on: every selected rank runs ``torch.profiler.profile`` with a schedule
that records steps ``start .. start+steps-1`` (the trace's ``ProfilerStep#<step>``, counted from 0 like the loop's
steps) after one warm-up step, and writes ``<run dir>/profile/rank<R>_steps<S>-<E>.json.gz`` (Chrome/Perfetto
JSON; TensorBoard's profiler plugin and https://ui.perfetto.dev read it). distrain's phases show up as named
ranges (``label``): split, forward, backward, grad-sync (the gradient buckets a DDP hook hands to the
collective), optimizer, sync, checkpoint.

Off (the default) it costs nothing: no profiler object exists, and ``label`` asks torch whether a profiler is
recording (one C call) before it makes a range.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, ContextManager, List, Optional

import torch
from omegaconf import DictConfig
from torch.profiler import ProfilerAction, ProfilerActivity

from distrain.config.validation import selected_ranks
from distrain.env import ProcessInfo

_OFF = contextlib.nullcontext()
WARMUP_STEPS = 1  # the step before the first recorded one warms the profiler up (torch's own advice)


def label(name: str) -> ContextManager[Any]:
    """A named range in the trace while a profiler records; otherwise a shared no-op context (no allocation)."""
    return torch.profiler.record_function(name) if torch.autograd._profiler_enabled() else _OFF


class StepProfiler:
    """torch.profiler over the configured steps on this rank; ``step()`` after every training step, ``stop()``
    at the end of fit (whatever the exit path)."""

    def __init__(self, first: int, last: int, path: Path, memory: bool, log: logging.Logger):
        self.first, self.last, self.path, self.log = first, last, path, log
        self.written: Optional[Path] = None
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
        self._prof = torch.profiler.profile(activities=activities, schedule=self._action, on_trace_ready=self._export,
                                            profile_memory=memory, record_shapes=memory, with_stack=False)

    def _action(self, step: int) -> ProfilerAction:
        """What the profiler does in step ``step`` (absolute, from 0: the loop's own numbering)."""
        if step < self.first - WARMUP_STEPS or step > self.last:
            return ProfilerAction.NONE
        if step < self.first:
            return ProfilerAction.WARMUP
        return ProfilerAction.RECORD_AND_SAVE if step == self.last else ProfilerAction.RECORD

    def _export(self, prof: torch.profiler.profile) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.path))  # a .gz name: torch writes it gzipped
        self.written = self.path
        self.log.info(f"profile: steps {self.first}-{self.last} of this rank written to {self.path}")

    def start(self, step: int) -> None:
        """Begin at the loop's ``step`` (0, or the step a resumed run starts at): its ProfilerStep numbers follow."""
        self._prof.step_num = step  # ProfilerStep#<n> and the schedule count the loop's own steps
        self._prof.current_action = self._action(step)
        self._prof.start()

    def step(self) -> None:
        self._prof.step()

    def stop(self) -> None:
        """End the profiler; a window cut short (a failure, a preemption) is exported as far as it got."""
        self._prof.stop()


def build_profiler(profile: DictConfig, info: ProcessInfo, run_dir: Path, start_step: int,
                   log: logging.Logger) -> Optional[StepProfiler]:
    """This rank's StepProfiler, or None when profiling is off, this rank is not selected, or the window is past."""
    if not profile.steps:
        return None
    ranks = selected_ranks(profile.ranks, info.world_size)  # on every rank alike: a bad rank fails them all
    first, last = profile.start, profile.start + profile.steps - 1
    if info.is_main:
        names = ", ".join(_trace_name(r, first, last) for r in ranks)
        log.info(f"profile: steps {first}-{last} on rank(s) {', '.join(map(str, ranks))}; traces: "
                 f"{run_dir / 'profile'}/{{{names}}}")
    if start_step > first:
        log.warning(f"metrics.profile.start={first}: this run resumes at step {start_step}, past it; no trace.")
        return None
    if info.rank not in ranks:
        return None
    profiler = StepProfiler(first, last, run_dir / "profile" / _trace_name(info.rank, first, last),
                            bool(profile.memory), log)
    profiler.start(start_step)
    return profiler


def _trace_name(rank: int, first: int, last: int) -> str:
    return f"rank{rank}_steps{first}-{last}.json.gz"


__all__ = ["StepProfiler", "build_profiler", "label"]
